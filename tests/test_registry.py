"""The champion in the MLflow Model Registry: what is registered, how it loads, what a kill mid-registration leaves,
and that champions registered by older code still load."""
import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import ROOT, cli_env, own_stores, runs_of, tiny_sweep, wait_for, write_experiment
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from fine_tune.learn import checkpoints
from fine_tune.learn.data import splits_for
from fine_tune.learn.models import build_model
from fine_tune.learn.train import scores
from fine_tune.study.sweep import run_sweep
from fine_tune.track import registry

# The last commit before the rooms move (fine_tune/models.py became fine_tune/learn/models.py): its champions are
# pickled `fine_tune.models.Net`s carrying a copy of that package.
BEFORE_ROOMS = "fea3239"

# Loads a champion in a fresh process, as a user would: both ways the README gives, logits for the images given.
LOAD = """
import json, sys
import mlflow, numpy as np, torch
uri, images = sys.argv[1], np.load(sys.argv[2])
with torch.no_grad():
    logits = mlflow.pytorch.load_model(uri)(torch.from_numpy(images)).numpy()
print(json.dumps({"pytorch": logits.tolist(), "pyfunc": mlflow.pyfunc.load_model(uri).predict(images).tolist()}))
"""


def load_elsewhere(uri: str, tracking_uri: str, images: Path, cwd: Path, **env) -> dict:
    """`LOAD` run in `cwd` with no PYTHONPATH: only what the model carries (and the venv) is importable."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "MLFLOW_TRACKING_URI": tracking_uri,
           "MLFLOW_DISABLE_TELEMETRY": "true", **env}
    done = subprocess.run([sys.executable, "-c", LOAD, uri, str(images)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint_logits(client, run_id: str, images: torch.Tensor) -> np.ndarray:
    """What the trial's own checkpoint predicts, through the current Net."""
    params = client.get_run(run_id).data.params
    model = build_model(params["model"], 5, int(params["head_size"]))
    model.load_state_dict(checkpoints.load(client.download_artifacts(run_id, "checkpoint/best.pt")))
    with torch.no_grad():
        return model.eval()(images).numpy()


def sqlite_uri(runs_dir) -> str:
    return f"sqlite:///{Path(runs_dir).resolve()}/mlflow.db"


# module fixtures: the file's tests run in one of `make test`'s processes (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_registry")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_backbone):
    """A finished two-trial sweep and its registered champion."""
    with own_stores():
        cfg = tiny_sweep(tmp_path_factory.mktemp("registry") / "runs", tiny_backbone[0], n_trials=2)
        study = run_sweep(cfg, progress=False, log=lambda s: None)
    return cfg, study, MlflowClient(sqlite_uri(cfg.runs_dir))


def test_the_champion_is_an_exported_program_that_predicts_as_its_trial(swept, tmp_path, monkeypatch):
    cfg, study, client = swept
    mlflow.set_tracking_uri(client.tracking_uri)
    versions = client.search_model_versions(f"name='{cfg.study}'")
    assert len(versions) == 1  # registered once, when the sweep ended: not once per improving trial
    champion = client.get_model_version_by_alias(cfg.study, "champion")
    trials = runs_of(cfg.runs_dir, cfg.study).query("`tags.fine_tune.role` == 'trial'")
    best_run = trials[trials["tags.optuna.trial_number"] == str(study.best_trial.number)].iloc[0]
    assert champion.tags["run_id"] == best_run.run_id
    # logged to the trial's run without reopening it: the run stays FINISHED and lists the model
    run = client.get_run(best_run.run_id)
    assert run.info.status == "FINISHED"
    assert champion.source.removeprefix("models:/") in [o.model_id for o in run.outputs.model_outputs]

    # no code travels with it (nothing of fine_tune/, tracked or not), and its weights are no pickle
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{cfg.study}@champion", dst_path=str(tmp_path / "m")))
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "data/model.pt2" in files and not [f for f in files if f.endswith((".py", ".pth", ".pkl"))], files
    info = mlflow.models.get_model_info(str(folder))
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"  # images, as the model takes them
    assert not info.flavors["pytorch"].get("code") and not info.flavors["python_function"].get("code")

    # loaded the two ways the README gives, with pickle refused, it predicts what the trial's checkpoint predicts
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    splits = splits_for(cfg)
    images = splits.val.x
    expected = checkpoint_logits(client, best_run.run_id, images)
    with torch.no_grad():
        logits = mlflow.pytorch.load_model(f"models:/{cfg.study}@champion")(images).numpy()
    assert np.allclose(logits, expected, atol=1e-5)
    assert scores("val", splits.val.y.numpy(), logits.argmax(1))["val/f1_macro"] == pytest.approx(study.best_value)
    assert np.allclose(mlflow.pyfunc.load_model(f"models:/{cfg.study}@champion").predict(images.numpy()), expected,
                       atol=1e-5)
    # and in a fresh process outside the repo, where fine_tune cannot be imported: the model needs none of it
    np.save(tmp_path / "images.npy", images[:7].numpy())
    loaded = load_elsewhere(f"models:/{cfg.study}@champion", client.tracking_uri, tmp_path / "images.npy", tmp_path,
                            MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    for way in ("pytorch", "pyfunc"):
        assert np.allclose(loaded[way], expected[:7], atol=1e-5), way


def test_the_registry_says_what_the_champion_is_and_what_it_scored(swept):
    """The registered model's description names the task, classes, objective and how to load it; the version's
    description and tags give the trial's hyperparameters and val / test metrics; the logged model holds those
    metrics linked to the datasets they were measured on (its page, and the Models tab's Dataset column)."""
    cfg, study, client = swept
    model = client.get_registered_model(cfg.study)
    for said in ("classification of 5 classes", "Sandal", "val/f1_macro", "mlflow.pytorch.load_model", "uint8"):
        assert said in model.description, said
    version = client.get_model_version_by_alias(cfg.study, "champion")
    best = study.best_trial
    for name, value in best.params.items():
        assert version.tags[name] == (f"{value:.4g}" if isinstance(value, float) else str(value)), name
        assert name in version.description
    run = client.get_run(version.tags["run_id"])
    assert float(version.tags["val/f1_macro"]) == pytest.approx(study.best_value, abs=5e-5)
    assert float(version.tags["test/accuracy"]) == pytest.approx(run.data.metrics["test/accuracy"], abs=5e-5)
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    linked = {m.key: m for m in logged.metrics}
    assert linked["best/val/f1_macro"].value == pytest.approx(study.best_value)
    digests = {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert linked["test/accuracy"].dataset_digest == digests["test"]
    assert linked["best/val/f1_macro"].dataset_digest == digests["validation"]


class Planted:
    """What a planted pickle does when it is unpickled: write a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_planted_pickle_in_the_champion_is_refused_not_run(swept, tmp_path, monkeypatch):
    cfg, _, client = swept
    model_id = client.get_model_version_by_alias(cfg.study, "champion").source.removeprefix("models:/")
    archive = Path(local_file_uri_to_path(client.get_logged_model(model_id).artifact_location)) / "data/model.pt2"
    original, marker = archive.read_bytes(), tmp_path / "planted-code-ran"
    torch.save(Planted(marker), archive)  # someone with write access to the artifact store replaces the model
    try:
        monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
        mlflow.set_tracking_uri(client.tracking_uri)
        for load in (mlflow.pytorch.load_model, mlflow.pyfunc.load_model):
            with pytest.raises(MlflowException, match="pickle"):
                load(f"models:/{cfg.study}@champion")
        assert not marker.exists()
    finally:
        archive.write_bytes(original)


def test_registering_again_keeps_what_is_registered(swept):
    cfg, study, client = swept
    run_id, example = client.get_model_version_by_alias(cfg.study, "champion").run_id, splits_for(cfg).val.x[:2]
    best = (study.best_value, cfg.sweep.objective, study.best_trial.number, example)
    assert registry.register_best(client, cfg.study, run_id, *best) is None  # no better than the champion
    assert registry.register_best(client, "another-name", run_id, *best) == "1"  # a second name, same experiment
    for name in (cfg.study, "another-name"):
        assert len(client.search_model_versions(f"name='{name}'")) == 1
        model_id = client.get_model_version_by_alias(name, "champion").source.removeprefix("models:/")
        assert client.get_logged_model(model_id).status == "READY"  # not taken for a killed registration's


def test_a_trial_run_an_older_registration_left_running_is_closed(swept):
    cfg, study, client = swept
    champion = client.get_model_version_by_alias(cfg.study, "champion")
    # what the registration before this one left when killed: the trial's finished run reopened, RUNNING for good
    client.update_run(champion.run_id, status="RUNNING")
    assert registry.register_best(client, cfg.study, champion.run_id, study.best_value, cfg.sweep.objective,
                                  study.best_trial.number, splits_for(cfg).val.x[:2]) is None
    assert client.get_run(champion.run_id).info.status == "FINISHED"


def logged_models(runs_dir) -> int:
    """How many logged models the MLflow store holds (read-only: the sweep may be creating it)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{Path(runs_dir) / 'mlflow.db'}?mode=ro", uri=True)) as db:
            return db.execute("select count(*) from logged_models").fetchone()[0]
    except sqlite3.OperationalError:  # no database or no table yet
        return 0


@pytest.mark.slow
def test_a_kill_while_registering_leaves_no_run_running_nor_an_orphan_model(tmp_path, tiny_backbone):
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="killed")
    with open(tmp_path / "sweep.log", "w") as out:
        sweep = subprocess.Popen([sys.executable, "-m", "fine_tune", "sweep", "--config", "e.yaml"], cwd=tmp_path,
                                 env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: logged_models(tmp_path / "runs"), sweep, "the champion's registration",
                 output=(tmp_path / "sweep.log").read_text, every_s=0.01)
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
    client = MlflowClient(sqlite_uri(tmp_path / "runs"))
    assert not client.search_model_versions("name='killed'")  # killed mid-registration, not after it

    # the next sweep registers the champion and leaves nothing behind: no run RUNNING, no model without a version
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="killed", n_trials=1)
    done = subprocess.run([sys.executable, "-m", "fine_tune", "sweep", "--config", "e.yaml"], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = runs_of(tmp_path / "runs", "killed")
    assert len(runs) == 4 and set(runs.status) == {"FINISHED"}, runs[["tags.mlflow.runName", "status"]]
    experiment = client.get_experiment_by_name("killed").experiment_id
    sources = {v.source for v in client.search_model_versions("name='killed'")}
    assert {f"models:/{m.model_id}" for m in client.search_logged_models([experiment])} == sources
    assert client.get_model_version_by_alias("killed", "champion").source in sources


def old_package(commit: str, into: Path) -> Path:
    """The fine_tune package as it was at `commit`, read from the repo's history (a clone keeps it)."""
    done = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "fine_tune"], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"needs the repo's history (commit {commit}): {done.stderr.decode()[:200]}")
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


@pytest.mark.slow
def test_a_champion_pickled_before_the_rooms_move_still_loads(tmp_path, tiny_backbone):
    old = old_package(BEFORE_ROOMS, tmp_path / "old")
    assert (old / "fine_tune/models.py").exists() and not (ROOT / "fine_tune/models.py").exists()
    write_experiment(old / "e.yaml", tiny_backbone[0], study="old", n_trials=1)
    done = subprocess.run([sys.executable, "-m", "fine_tune", "sweep", "--config", "e.yaml"], cwd=old,
                          env={**cli_env(), "PYTHONPATH": str(old)}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(sqlite_uri(old / "runs"))
    champion = client.get_model_version_by_alias("old", "champion")
    mlflow.set_tracking_uri(client.tracking_uri)
    folder = Path(mlflow.artifacts.download_artifacts("models:/old@champion", dst_path=str(tmp_path / "m")))
    assert (folder / "data/model.pth").exists() and (folder / "code/fine_tune/models.py").exists()  # pickled, old
    images = splits_for(tiny_sweep(tmp_path / "runs", tiny_backbone[0])).val.x[:7]
    np.save(tmp_path / "images.npy", images.numpy())
    expected = checkpoint_logits(client, champion.tags["run_id"], images)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (elsewhere, ROOT):  # anywhere, and from the repo root, where today's fine_tune is importable
        loaded = load_elsewhere("models:/old@champion", client.tracking_uri, tmp_path / "images.npy", cwd)
        for way in ("pytorch", "pyfunc"):
            assert np.allclose(loaded[way], expected, atol=1e-5), (cwd, way)
