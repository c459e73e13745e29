"""torchvision's architectures as backbones: their stage rule, stage-wise freezing, the frozen-feature cache, training
from an image folder of real Fashion-MNIST PNGs, and torchvision's weights loaded offline through a temporary
TORCH_HOME (a missing file and a file whose hash does not match its name are refused in one line)."""
import hashlib
import json

import pytest
import torch
from helpers import tiny_config, write_image_folder

from fine_tune import archs
from fine_tune.__main__ import main
from fine_tune.errors import CheckpointError
from fine_tune.learn import weights
from fine_tune.learn.data import splits_for
from fine_tune.learn.models import build_model, count_params
from fine_tune.learn.train import train


def test_the_supported_names_are_torchvisions_own():
    import torchvision

    ruled = [n for n in torchvision.models.list_models(module=torchvision.models) if archs.family(n)]
    assert sorted(archs.TORCHVISION) == sorted(ruled)


@pytest.mark.parametrize("arch,features", [("resnet18", 512), ("mobilenet_v3_small", 1024), ("efficientnet_b0", 1280),
                                           ("vit_b_16", 768), ("convnext_tiny", 768)])
def test_five_stages_then_a_new_head(arch, features):
    """Every stage rule gives 5 stages that end in the features the architecture's final Linear layer took; the head
    replaces that layer, and all the architecture's other parameters are in the stages."""
    import torchvision

    model = build_model(arch, 7, head_size=0, image_size=32).eval()  # eval: dropout would make two passes differ
    assert len(model.backbone) == 5 and model.head.in_features == features and model.head.out_features == 7
    original = torchvision.models.get_model(arch, weights=None, **({"image_size": 32} if arch.startswith("vit") else {}))
    final = [m for m in original.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert count_params(model.backbone, False) == count_params(original, False) - count_params(final, False)
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)  # pure unit test: grey images, expanded to RGB
    assert model(x).shape == (2, 7)
    assert torch.equal(model.head(model.through(x)), model(x))


def test_frozen_stages_keep_their_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = build_model("resnet18", 5, head_size=16, frozen_layers=3, image_size=32).train()
    assert [s.training for s in model.backbone] == [False, False, False, True, True]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 5, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for k, v in model.state_dict().items():
        frozen = k.startswith(("backbone.0.", "backbone.1.", "backbone.2."))
        assert torch.equal(before[k], v) == frozen or k.endswith("num_batches_tracked") and not frozen, k


def test_cached_and_uncached_features_train_alike(tmp_path):
    """The frozen-feature cache holds for a torchvision backbone: a linear probe of all five frozen stages computes
    them once, and trains to the same numbers as running them every epoch."""
    cfg = tiny_config(tmp_path, model="resnet18", image_size=32, frozen_layers=5, epochs=3, budget_per_class=10)
    splits = splits_for(cfg)
    cached = train(cfg, splits)
    plain = train(cfg.model_copy(update={"cache_features": False}), splits)
    assert [h["val/f1_macro"] for h in cached.history] == pytest.approx([h["val/f1_macro"] for h in plain.history])
    assert cached.metrics["trainable_params"] == 512 * 5 + 5


def test_train_a_torchvision_backbone_on_an_image_folder(tmp_path):
    """`python -m fine_tune train` on a folder of real Fashion-MNIST PNGs: resnet18 at 32 px, its first three stages
    frozen, the table printed, the checkpoint written; well above chance (0.25) on the folder's own test images."""
    root, _ = write_image_folder(tmp_path / "images", {"Trouser": 1, "Bag": 8, "Sneaker": 7, "Sandal": 5},
                                 per_class=40, test_per_class=25)
    (tmp_path / "e.yaml").write_text(f"study: folder\nmodel: resnet18\nimage_size: 32\ndata: {{kind: imagefolder, "
                                     f"root: {root}}}\nval_per_class: 10\nfrozen_layers: 3\nhead_size: 16\n"
                                     "epochs: 6\nlr: 3.0e-3\n")
    assert main(["train", "--config", str(tmp_path / "e.yaml"), "--json", str(tmp_path / "m.json"),
                 "--set", f"runs_dir={tmp_path / 'runs'}"]) == 0
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["status"] == "finished" and out["test/accuracy"] > 0.5 and len(out["per_class_f1"]) == 4
    assert (tmp_path / "runs" / "train" / "folder" / "best.pt").is_file()
    assert list((tmp_path / "runs" / "data_cache").glob("imagefolder-*.pt"))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FINE_TUNE_OFFLINE", "1")  # never download in a test, even on a machine with internet
    return tmp_path / "torch" / "hub" / "checkpoints"


def weights_experiment(tmp_path):
    (tmp_path / "w.yaml").write_text(f"study: imagenet\nmodel: resnet18\nweights: IMAGENET1K_V1\nimage_size: 32\n"
                                     f"classes: [5, 6, 7, 8, 9]\nbudget_per_class: 5\nval_per_class: 5\n"
                                     f"test_per_class: 5\nepochs: 1\nruns_dir: {tmp_path / 'runs'}\n")
    return str(tmp_path / "w.yaml")


def test_missing_weights_name_the_file_and_the_folder(tmp_path, torch_home, capsys):
    assert main(["train", "--config", weights_experiment(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"resnet18-f37072fd.pth is not in {torch_home}" in err, err
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in err
    assert not (tmp_path / "runs").exists()


def test_a_weights_file_whose_hash_does_not_match_its_name_is_refused(tmp_path, torch_home, capsys):
    """A file in torchvision's cache under the official name but with other contents (here random weights):
    torchvision's own builder would load it silently; we refuse it in one line."""
    torch_home.mkdir(parents=True)
    torch.save(build_model("resnet18", 1000).state_dict(), torch_home / "resnet18-f37072fd.pth")
    assert main(["train", "--config", weights_experiment(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the file its name promises" in err and "Traceback" not in err, err


def test_a_weights_file_that_matches_its_name_becomes_the_backbone(tmp_path, torch_home, monkeypatch):
    """The loading path end to end with a file whose name carries its own hash prefix, as torchvision names its
    files: checked, read with weights_only=True, cut into stages and saved as our backbone checkpoint."""
    import torchvision

    from fine_tune.experiment import load_config
    from fine_tune.learn.pretrain import backbone_for

    torch_home.mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()
    staging = torch_home / "staging.pth"
    torch.save(state, staging)
    named = torch_home / f"resnet18-{hashlib.sha256(staging.read_bytes()).hexdigest()[:8]}.pth"
    staging.rename(named)
    weights.verify(named)
    monkeypatch.setattr(weights, "cached_file", lambda w: named)  # the official name's hash is not ours to forge
    cfg = load_config(weights_experiment(tmp_path))
    backbone = torch.load(backbone_for(cfg, log=lambda s: None), weights_only=True)
    assert torch.equal(backbone["backbone.0.0.weight"], state["conv1.weight"])
    assert torch.equal(backbone["backbone.4.0.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    tampered = bytearray(named.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF  # one byte changed: the name's hash no longer holds
    named.write_bytes(bytes(tampered))
    with pytest.raises(CheckpointError, match="is not the file its name promises"):
        weights.verify(named)
