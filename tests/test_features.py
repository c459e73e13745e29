"""The frozen-feature cache gives the same training as the uncached path, and is shared through the disk."""
import pytest
from helpers import untimed

from fine_tune.learn import checkpoints, features
from fine_tune.learn.data import splits_for
from fine_tune.learn.train import train



@pytest.mark.parametrize("k", [1, 2])
def test_cached_and_uncached_training_match(tiny, tiny_backbone, k):
    cfg = tiny(frozen_layers=k, head_size=16, epochs=3)
    splits = splits_for(cfg)
    cached = train(cfg, splits, tiny_backbone[0])
    plain = train(cfg.model_copy(update={"cache_features": False}), splits, tiny_backbone[0])
    assert [untimed(h) for h in cached.history] == [untimed(h) for h in plain.history]
    assert untimed(cached.metrics) == untimed(plain.metrics)
    assert cached.test_pred == plain.test_pred


def test_features_are_reused_from_disk_by_another_worker(tiny, tiny_backbone, monkeypatch):
    cfg = tiny(frozen_layers=2, epochs=1)
    splits = splits_for(cfg)
    train(cfg, splits, tiny_backbone[0])
    files = list((cfg.run_dir() / "feature_cache").glob("*.pt"))
    assert len(files) == 1
    features._memory.clear()  # a fresh worker process has an empty memory cache

    def no_recompute(*args, **kwargs):
        raise AssertionError("features were recomputed instead of read from disk")

    monkeypatch.setattr(features, "_through", no_recompute)
    again = train(cfg, splits, tiny_backbone[0])
    assert again.status == "finished"

    # a damaged entry is rebuilt, never trusted
    features._memory.clear()
    files[0].write_bytes(b"torn write")
    monkeypatch.undo()
    assert untimed(train(cfg, splits, tiny_backbone[0]).metrics) == untimed(again.metrics)
    assert set(checkpoints.load_any(files[0])) == {"train", "val", "test"}  # and rewritten on disk


def test_different_frozen_weights_get_different_entries(tiny, tiny_backbone):
    cfg = tiny(frozen_layers=1, epochs=1)
    splits = splits_for(cfg)
    train(cfg, splits, tiny_backbone[0])
    train(cfg, splits, None)  # random (seeded) frozen layer instead of the pretrained one
    assert len(list((cfg.run_dir() / "feature_cache").glob("*.pt"))) == 2
