"""What several test files share: the tiny real-data configs, the tiny sweep, and how a test runs the CLI."""
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import mlflow
import optuna
import pytest

from fine_tune.config import Config
from fine_tune.track.stores import optuna_storage

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], object], proc: subprocess.Popen | None = None, what: str = "the awaited moment",
             bound_s: float = 900.0, output: Callable[[], str] | None = None, every_s: float = 0.05):
    """Wait on observed progress: return `check()`'s first true value; fail at once if `proc` ended first. The bound
    is only for a hang: a loaded CI machine (2 cores, load 4+) once took more than the two minutes a fixed wait
    allowed, so no fixed guess of its speed is made."""
    deadline = time.monotonic() + bound_s
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            said = output() if output else (proc.stderr.read() if proc.stderr else "")
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}: {said[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress to {what} in {bound_s:.0f} s")
        time.sleep(every_s)


@contextlib.contextmanager
def own_stores():
    """The default stores (under the runs dir) for a module-scoped fixture, which conftest's per-test `default_stores`
    does not cover: a user's OPTUNA_STORAGE / MLFLOW_TRACKING_URI set aside meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("OPTUNA_STORAGE", raising=False)
        yield


def untimed(metrics: dict) -> dict:
    """A run's metrics without its measurements (times, memory): what the same seed must reproduce exactly."""
    return {k: v for k, v in metrics.items() if not k.startswith(("time/", "memory/"))}


def tiny_config(tmp_path, **overrides) -> Config:
    """Five target classes, 20 labeled images each, 20 val and 40 test images per class, 2 epochs."""
    fields = dict(study="tiny", classes=[5, 6, 7, 8, 9], budget_per_class=20, val_per_class=20,
                  test_per_class=40, epochs=2, lr=3e-3, runs_dir=str(tmp_path / "runs"))
    fields.update(overrides)
    return Config(**fields)


SEARCH = {"lr": {"low": 1e-3, "high": 3e-2, "log": True}, "frozen_layers": {"low": 0, "high": 2},
          "head_size": [0, 16]}


def tiny_sweep(runs_dir, backbone: str, study: str = "tiny-sweep", n_trials: int = 3, **overrides) -> Config:
    """The tiny study every sweep test runs: the tiny config, a user's backbone, a three-hyperparameter space,
    no pruner (so every trial completes unless a test says otherwise)."""
    fields = dict(study=study, classes=[5, 6, 7, 8, 9], budget_per_class=20, val_per_class=20, test_per_class=40,
                  epochs=2, pretrained=backbone, runs_dir=str(runs_dir), search=SEARCH,
                  sweep={"n_trials": n_trials, "pruner": "none"})
    fields.update(overrides)
    return Config(**fields)


TINY_YAML = """study: {study}
classes: [5, 6, 7, 8, 9]
budget_per_class: {budget}
val_per_class: 20
test_per_class: 40
epochs: {epochs}
pretrained: {backbone}
search:
  lr: {{low: 1.0e-3, high: 3.0e-2, log: true}}
  frozen_layers: {{low: 0, high: 2}}
  head_size: [0, 16]
sweep: {{n_trials: {n_trials}, pruner: none, heartbeat_interval: 1, grace_period: 3, state_every_s: {state_every_s}}}
"""


def write_experiment(path, backbone, study="cli-sweep", budget=20, epochs=2, n_trials=2, state_every_s=5.0):
    """The tiny sweep as an experiment file, for tests that run the CLI as a user would."""
    path.write_text(TINY_YAML.format(study=study, budget=budget, epochs=epochs, n_trials=n_trials, backbone=backbone,
                                     state_every_s=state_every_s))
    return path


def cli_env(**extra):
    """The environment of a CLI subprocess: the repo importable, the extracted data reused, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=str(ROOT), FINE_TUNE_DATA=str(ROOT / "data"), MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", **extra)
    return env


def run_cli(cwd, *args, timeout=600, **env) -> subprocess.CompletedProcess:
    """`python -m fine_tune ARGS` in `cwd`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fine_tune", *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def runs_of(runs_dir, study: str):
    """Every MLflow run of `study` in the SQLite store under `runs_dir`, as mlflow.search_runs gives them."""
    mlflow.set_tracking_uri(f"sqlite:///{Path(runs_dir).resolve()}/mlflow.db")
    return mlflow.search_runs(experiment_names=[study])


def study_in(runs_dir, study: str) -> optuna.Study:
    """The Optuna study `study` in the SQLite storage under `runs_dir`."""
    return optuna.load_study(study_name=study, storage=optuna_storage(f"sqlite:///{Path(runs_dir).resolve()}/optuna.db"))


def write_image_folder(root, classes: dict[str, int], per_class: int, test_per_class: int = 0, flat: bool = False):
    """Real Fashion-MNIST test images of `classes` ({folder name: class id}) written as PNG files in torchvision's
    ImageFolder layout (`train/` and `test/`, or the class folders directly when `flat`); returns the root and the
    pixels written, keyed by (part, class, position in that class's sorted files)."""
    from PIL import Image

    from fine_tune.learn.fashion import load

    _, _, images, labels, _ = load()
    root = Path(root)
    written = {}
    for name, cid in classes.items():
        rows = (labels == cid).nonzero().flatten()
        for part, start, count in (("train", 0, per_class), ("test", per_class, test_per_class)):
            folder = root / name if flat else root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = images[rows[start + i]]
                Image.fromarray(pixels.numpy(), mode="L").save(folder / f"{i:04d}.png")
                written[(part, name, i)] = pixels.unsqueeze(0)
    return root, written
