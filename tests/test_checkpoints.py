"""Checkpoints: atomic writes, safe loads, and errors that name what does not fit."""
import json

import pytest
import torch

from fine_tune.errors import CheckpointError
from fine_tune.learn import checkpoints
from fine_tune.learn.models import build_model
from fine_tune.learn.pretrain import backbone_for, cache_path


def test_round_trip_restores_the_backbone(tmp_path):
    src = build_model("simplenet", 5)
    path = checkpoints.save(src.state_dict(), tmp_path / "ck.pt")
    dst = build_model("simplenet", 3, head_size=16)
    checkpoints.load_backbone(dst, path)
    for k, v in src.state_dict().items():
        if k.startswith("backbone."):
            assert torch.equal(v, dst.state_dict()[k])
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_wrong_architecture_names_the_mismatch(tmp_path):
    path = checkpoints.save(build_model("simplenet", 5).state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['backbone.0.0.weight'"):
        checkpoints.load_backbone(build_model("cnn", 5), path)


def test_wrong_shape_names_the_key(tmp_path):
    state = build_model("simplenet", 5).state_dict()
    state["backbone.1.0.weight"] = torch.zeros(32, 128)
    path = checkpoints.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"backbone.1.0.weight \(32, 128\) vs model \(64, 128\)"):
        checkpoints.load_backbone(build_model("simplenet", 5), path)


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is corrupt or not a PyTorch state dict"):
        checkpoints.load(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoints.load(tmp_path / "absent.pt")


def test_pickled_code_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1), "evil": print}, tmp_path / "evil.pt")  # needs weights_only=False to load
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch state dict"):
        checkpoints.load(tmp_path / "evil.pt")


def test_pretrained_backbone_is_cached_with_its_sidecar(tiny_backbone):
    path, cfg = tiny_backbone
    meta = json.loads(cache_path(cfg).with_suffix(".json").read_text())
    assert meta["source_classes"] == [0, 1, 2, 3, 4] and meta["source_val_accuracy"] > 0.6
    assert meta["sha256"] == checkpoints.file_sha256(path) and meta["versions"]["torch"] == torch.__version__
    said = []
    assert backbone_for(cfg, log=said.append) == path
    assert said and said[0].startswith("pretrained backbone: reusing")
