"""Fixtures: every test runs with the default stores (under its tmp_path), and one real pretrained backbone is shared
by the session. Helpers live in tests/helpers.py."""
import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub: folders, the cache or packaged weights

from helpers import tiny_config  # noqa: E402

from fine_tune.config import Config  # noqa: E402


@pytest.fixture(autouse=True)
def grouped(request):
    """`make test`'s processes (xdist --dist loadgroup) keep each xdist_group in one process by suffixing the node ids
    of its tests with the group's name: a module fixture is built once, PostgreSQL's tests run one at a time. A
    pytest whose node ids ignore that suffix (9.2: pytest-dev/pytest-xdist#1386) would share them out silently."""
    if (getattr(request.config.option, "loadgroup", False) and request.node.get_closest_marker("xdist_group")
            and "@" not in request.node.nodeid):
        pytest.fail(f"xdist_group is ignored by this pytest ({pytest.__version__}): install requirements.txt's pins, "
                    "or run with -n 0", pytrace=False)


@pytest.fixture(autouse=True)
def default_stores(monkeypatch):
    """A user's OPTUNA_STORAGE / MLFLOW_TRACKING_URI must not leak into a test: each one's stores are its own."""
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_config(tmp_path, **kw)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """A real pretrained SimpleNet backbone: 1 epoch on 100 images per source class (cached for the session)."""
    from fine_tune.learn.pretrain import backbone_for

    tmp = tmp_path_factory.mktemp("pretrain")
    cfg = Config(classes=[5, 6, 7, 8, 9], val_per_class=20, runs_dir=str(tmp / "runs"),
                 pretrain={"classes": [0, 1, 2, 3, 4], "epochs": 1})
    return backbone_for(cfg, log=lambda s: None), cfg
