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
