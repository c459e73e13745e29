"""Every run says what produced it (code, tree, environment, config, data) and `rerun` reproduces it: on a tiny real
sweep, on `train` runs, and on a git checkout made for the test whose tree is dirtied and then committed."""
import subprocess

import mlflow
import pytest
import yaml
from helpers import ROOT, runs_of, tiny_config, tiny_sweep
from mlflow.tracking import MlflowClient

from fine_tune.__main__ import main
from fine_tune.config import Config
from fine_tune.errors import ConfigError
from fine_tune.learn.data import splits_for
from fine_tune.study.single import reproduce, train_once
from fine_tune.study.sweep import run_sweep
from fine_tune.track import provenance


# module fixtures: the file's tests run in one of `make test`'s processes (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_provenance")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_backbone):
    env = pytest.MonkeyPatch()
    env.delenv("OPTUNA_STORAGE", raising=False)
    env.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_sweep(tmp_path_factory.mktemp("prov") / "runs", tiny_backbone[0], study="prov", n_trials=3)
    study = run_sweep(cfg, progress=False, log=lambda s: None)
    yield cfg, study
    env.undo()


def test_trials_carry_source_tags_config_and_datasets(swept):
    cfg, study = swept
    runs = runs_of(cfg.runs_dir, cfg.study)
    parent = runs[runs["tags.fine_tune.role"] == "study"].iloc[0]
    trials = runs[runs["tags.fine_tune.role"] == "trial"]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert set(trials["tags.mlflow.source.git.commit"]) == {commit} and set(trials["tags.mlflow.source.type"]) == {"LOCAL"}
    assert set(trials["tags.mlflow.source.name"]) == {"python -m fine_tune sweep"}
    assert set(trials["tags.fine_tune.env_sha"]) == {parent["tags.fine_tune.env_sha"]}  # referred to, not copied
    client = MlflowClient(f"sqlite:///{cfg.run_dir().resolve()}/mlflow.db")
    env = mlflow.artifacts.load_dict(f"runs:/{parent.run_id}/provenance/environment.json")
    assert env["sha256"] == parent["tags.fine_tune.env_sha"] and env["packages"]["torch"] and env["python"]
    assert not [a for a in client.list_artifacts(trials.run_id.iloc[0]) if a.path == "provenance"]
    splits = splits_for(cfg)
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        inputs = {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
        assert inputs == {"train": splits.digests["train"], "validation": splits.digests["val"],
                          "test": splits.digests["test"]}
        logged = Config.model_validate(yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")))
        assert logged.model_dump() == Config.model_validate({**cfg.model_dump(), **t.params}).model_dump()


def test_rerun_of_the_best_trial_is_identical(swept):
    cfg, study = swept
    run_id = study.best_trial.user_attrs["mlflow_run_id"]
    said = []
    same, text = reproduce(run_id, cfg, log=said.append)
    assert same and "verdict: identical" in text, text
    runs = runs_of(cfg.runs_dir, cfg.study)
    again = runs[runs["tags.fine_tune.rerun_of"] == run_id]
    assert len(again) == 1 and again["tags.fine_tune.role"].iloc[0] == "reproduction"
    assert again["metrics.test/accuracy"].iloc[0] == study.best_trial.user_attrs["test/accuracy"]


def test_rerun_trains_with_the_thread_count_the_run_logged(swept, monkeypatch):
    """The thread count changes floating-point sums: a re-run on a machine set up for more threads still uses the
    run's own count (logged as the metric `threads`)."""
    cfg, study = swept
    run_id = study.best_trial.user_attrs["mlflow_run_id"]
    monkeypatch.setenv("FINE_TUNE_THREADS", "2")
    same, text = reproduce(run_id, cfg, log=lambda s: None)
    runs = runs_of(cfg.runs_dir, cfg.study)
    logged = runs[runs.run_id == run_id]["metrics.threads"].iloc[0]
    again = runs[runs["tags.fine_tune.rerun_of"] == run_id]
    assert logged == 1 and set(again["metrics.threads"]) == {1.0}
    assert same, text


def test_rerun_refuses_what_it_cannot_rebuild(swept):
    cfg, _ = swept
    with pytest.raises(ConfigError, match="is not in"):
        reproduce("0" * 32, cfg)
    client = MlflowClient(f"sqlite:///{cfg.run_dir().resolve()}/mlflow.db")
    foreign = client.create_run(client.get_experiment_by_name(cfg.study).experiment_id)
    client.set_terminated(foreign.info.run_id)
    with pytest.raises(ConfigError, match="was not made by a fine_tune training run"):
        reproduce(foreign.info.run_id, cfg)
    parent = runs_of(cfg.runs_dir, cfg.study).query("`tags.fine_tune.role` == 'study'").run_id.iloc[0]
    with pytest.raises(ConfigError, match="was not made by a fine_tune training run"):
        reproduce(parent, cfg)


def test_train_is_tracked_by_default_and_a_new_seed_reuses_the_backbone(tmp_path, capsys):
    (tmp_path / "e.yaml").write_text(f"study: cli-train\nclasses: [5, 6, 7, 8, 9]\nbudget_per_class: 10\n"
                                     f"val_per_class: 10\ntest_per_class: 10\nepochs: 1\nruns_dir: {tmp_path / 'runs'}\n"
                                     "pretrain: {classes: [0, 1, 2, 3, 4], epochs: 1}\n")
    assert main(["train", "--config", str(tmp_path / "e.yaml")]) == 0
    out = capsys.readouterr().out
    assert "tracked: MLflow run" in out and "pretraining simplenet" in out
    runs = runs_of(tmp_path / "runs", "cli-train")
    assert list(runs["tags.fine_tune.role"]) == ["train"] and "tags.mlflow.parentRunId" not in runs  # no parent
    assert runs["status"].iloc[0] == "FINISHED" and runs["params.seed"].iloc[0] == "0"
    artifacts = {a.path for a in MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db").list_artifacts(
        runs.run_id.iloc[0], "provenance")}
    assert "provenance/environment.json" in artifacts  # a run without a parent carries its own
    assert main(["train", "--config", str(tmp_path / "e.yaml"), "--set", "seed=1"]) == 0
    out = capsys.readouterr().out
    assert "pretrained backbone: reusing" in out and "pretraining" not in out  # the fine-tuning seed never retrains
    assert main(["train", "--config", str(tmp_path / "e.yaml"), "--no-track", "--set", "study=untracked"]) == 0
    assert "tracked: MLflow run" not in capsys.readouterr().out
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db").get_experiment_by_name("untracked") is None


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_a_dirty_tree_is_tagged_with_its_diff_and_rerun_says_the_code_differs(tmp_path, monkeypatch):
    """The checkout is a git repository made for the test: a run made with an uncommitted change is tagged dirty and
    carries the diff; once the change is committed, its rerun warns that the code differs."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "model.py").write_text("width = 1\n")
    git(repo, "add", "model.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    (repo / "model.py").write_text("width = 2\n")
    monkeypatch.setattr(provenance, "REPO", repo)
    provenance._code_state.cache_clear()
    cfg = tiny_config(tmp_path, study="dirty", epochs=1)
    result, run_id = train_once(cfg, track=True, log=lambda s: None)
    client = MlflowClient(f"sqlite:///{cfg.run_dir().resolve()}/mlflow.db")
    tags = client.get_run(run_id).data.tags
    assert tags["fine_tune.git.dirty"] == "true"
    mlflow.set_tracking_uri(client.tracking_uri)
    diff = mlflow.artifacts.load_text(f"runs:/{run_id}/provenance/diff.patch")
    assert "-width = 1" in diff and "+width = 2" in diff

    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "second")
    provenance._code_state.cache_clear()
    warned = []
    same, text = reproduce(run_id, cfg, log=warned.append)
    assert any("the code differs: the run was made at commit" in w for w in warned), warned
    assert any("uncommitted changes" in w for w in warned)
    assert same  # the change did not touch training: the numbers are the same, and the warning says why they could not be
    provenance._code_state.cache_clear()
