"""`make rerun` on this machine's terms: the local paths come from here, never from the logged config (which may name
another machine's folders), and what it reads back from a store (the thread count, a replaced config.yaml) is checked
like a config before it is used."""
import math
import shutil
from pathlib import Path

import pytest
from helpers import ROOT, run_cli, runs_of, tiny_config
from mlflow.tracking import MlflowClient

from fine_tune.config import Config
from fine_tune.errors import CheckpointError, ConfigError, TrackingError
from fine_tune.study.single import reproduce, train_once


def other_machine(root: Path) -> Path:
    """A folder standing for another machine: its own data folder (the same Fashion-MNIST files), removed later."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "FashionMNIST").symlink_to(ROOT / "data" / "FashionMNIST")
    return root


def test_rerun_writes_under_this_machines_runs_dir_and_pretrains_a_gone_backbone_again(tmp_path):
    """A run made on another machine, in a shared store: its config.yaml names that machine's runs_dir and data_dir,
    gone here. `rerun --config` works on this machine's folders, pretrains the backbone again (the cached one was the
    other machine's) with the same hash and reproduces the numbers; nothing is written where the config said."""
    store = f"sqlite:///{tmp_path}/shared/mlflow.db"
    there = other_machine(tmp_path / "other-machine")
    cfg = tiny_config(there, study="moved", epochs=1, data_dir=str(there / "data"),
                      pretrain={"classes": [0, 1, 2, 3, 4], "epochs": 1})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", store)
        _, run_id = train_once(cfg, track=True, log=lambda s: None)
    shutil.rmtree(there)
    here = tmp_path / "here"
    here.mkdir()
    (here / "e.yaml").write_text("runs_dir: local-runs\n")
    p = run_cli(here, "rerun", run_id, "--config", "e.yaml", MLFLOW_TRACKING_URI=store)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "verdict: identical" in p.stdout and "is not on this machine; making it again" in p.stdout
    assert not there.exists()  # nothing written where the logged config said
    assert list((here / "local-runs" / "pretrained").glob("*.pt"))
    client = MlflowClient(store)
    again = client.search_runs([client.get_experiment_by_name("moved").experiment_id],
                               f"tags.`fine_tune.rerun_of` = '{run_id}'")
    assert len(again) == 1 and again[0].data.params["pretrained_sha256"] == \
        client.get_run(run_id).data.params["pretrained_sha256"]


def test_rerun_finds_your_own_checkpoint_by_hash_at_this_machines_path_only(tmp_path, tiny_backbone):
    """The run fine-tuned a checkpoint of the user's at another machine's path: the logged path is only a hint; the
    checkpoint is taken from `pretrained:` of this machine's config when its hash matches, and refused in one line
    when it is nowhere here."""
    there = tmp_path / "other-machine"
    there.mkdir()
    theirs = shutil.copy(tiny_backbone[0], there / "backbone.pt")
    _, run_id = train_once(tiny_config(tmp_path, study="own", epochs=1, pretrained=str(theirs)), track=True,
                           log=lambda s: None)
    shutil.rmtree(there)
    runs = str(tmp_path / "runs")
    with pytest.raises(CheckpointError, match="not on this machine; copy it here and point `pretrained:`"):
        reproduce(run_id, Config(runs_dir=runs), log=lambda s: None)
    mine = shutil.copy(tiny_backbone[0], tmp_path / "my-copy.pt")
    same, text = reproduce(run_id, Config(runs_dir=runs, pretrained=str(mine)), log=lambda s: None)
    assert same, text
    runs = runs_of(runs, "own")
    assert list(runs[runs["tags.fine_tune.rerun_of"] == run_id]["params.pretrained"]) == [str(mine)]


# module fixtures: the file's tests run in one of `make test`'s processes (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_rerun")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone):
    """One tracked `train` run on the tiny task, and this machine's config (the same runs_dir)."""
    env = pytest.MonkeyPatch()
    env.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tmp_path_factory.mktemp("rerun"), study="rerun", epochs=1, pretrained=tiny_backbone[0])
    _, run_id = train_once(cfg, track=True, log=lambda s: None)
    yield cfg, run_id, MlflowClient(f"sqlite:///{cfg.run_dir().resolve()}/mlflow.db")
    env.undo()


@pytest.mark.parametrize("step, value", [(10**6, 0.0), (10**6 + 1, math.nan), (10**6 + 2, 2.5)])
def test_a_thread_count_from_the_store_that_is_not_one_is_ignored_with_a_warning(trained, step, value):
    """`threads` read back from the store is checked like the config key: 0, NaN or 2.5 (written there by anyone
    with access) is left out with a warning, and the re-run trains on this machine's count instead of crashing."""
    cfg, run_id, client = trained
    client.log_metric(run_id, "threads", value, step=step)
    said = []
    same, text = reproduce(run_id, cfg, log=said.append)
    assert any(f"the run logged threads={value:g}, which is not a thread count" in s for s in said), said
    again = [r for r in client.search_runs([client.get_run(run_id).info.experiment_id])
             if r.data.tags.get("fine_tune.rerun_of") == run_id]
    assert again and again[0].info.status == "FINISHED" and again[0].data.metrics["threads"] >= 1
    assert "verdict:" in text


def test_a_yaml_bomb_in_a_replaced_config_yaml_is_refused_at_once(trained):
    """A config.yaml replaced in the store by nested aliases ("billion laughs") is refused in one line, like an
    experiment file, before anything expands it."""
    cfg, run_id, client = trained
    logged = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "config.yaml"
    original = logged.read_text()
    logged.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")))
    try:
        with pytest.raises(ConfigError, match=r"its config.yaml does not load \(.*aliases \(at most 20\)"):
            reproduce(run_id, cfg, log=lambda s: None)
    finally:
        logged.write_text(original)


def test_rerun_still_refuses_a_down_server_and_a_pruned_run_in_one_line(trained, monkeypatch):
    """What the local paths changed must not loosen: a tracking server that is down, and a trial pruned (KILLED)."""
    cfg, run_id, client = trained
    pruned = client.create_run(client.get_run(run_id).info.experiment_id,
                               tags={"fine_tune.role": "trial", "fine_tune.reason": "pruned at epoch 1"})
    client.set_terminated(pruned.info.run_id, "KILLED")
    with pytest.raises(ConfigError, match="ended KILLED \\(pruned at epoch 1\\); only finished runs"):
        reproduce(pruned.info.run_id, cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:1 is unreachable \(.*Connection refused\)"):
        reproduce(run_id, cfg)
