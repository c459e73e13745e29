"""Shared fixtures: tiny configs on real Fashion-MNIST slices, every output under tmp_path."""
import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from fine_tune.config import Config  # noqa: E402


def tiny_config(tmp_path, **overrides) -> Config:
    """Five target classes, 20 labeled images each, 20 val and 40 test images per class, 2 epochs."""
    fields = dict(study="tiny", classes=[5, 6, 7, 8, 9], budget_per_class=20, val_per_class=20,
                  test_per_class=40, epochs=2, lr=3e-3, runs_dir=str(tmp_path / "runs"))
    fields.update(overrides)
    return Config(**fields)


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_config(tmp_path, **kw)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """A real pretrained SimpleNet backbone: 1 epoch on 100 images per source class (cached for the session)."""
    from fine_tune.pretrain import backbone_for

    tmp = tmp_path_factory.mktemp("pretrain")
    cfg = Config(classes=[5, 6, 7, 8, 9], val_per_class=20, runs_dir=str(tmp / "runs"),
                 pretrain={"classes": [0, 1, 2, 3, 4], "epochs": 1})
    return backbone_for(cfg, log=lambda s: None), cfg


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    """A tiny sweep experiment file for tests that run the CLI as a user would."""
    path.write_text(TINY_YAML.format(study=study, budget=budget, epochs=epochs, n_trials=n_trials, backbone=backbone,
                                     state_every_s=state_every_s))
    return path


def cli_env(**extra):
    """The environment of a CLI subprocess: the repo importable, the extracted data reused, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=ROOT, FINE_TUNE_DATA=os.path.join(ROOT, "data"), MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", **extra)
    return env
