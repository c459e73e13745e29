"""The fine-tuning loop on a few hundred real Fashion-MNIST images."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import untimed

from fine_tune.learn import checkpoints
from fine_tune.learn.data import splits_for
from fine_tune.learn.models import build_model, count_params
from fine_tune.learn.train import cloned, prepare_model, train

ROOT = Path(__file__).resolve().parents[1]


def test_fine_tune_from_a_pretrained_backbone_beats_chance(tiny, tiny_backbone):
    path, _ = tiny_backbone
    cfg = tiny(frozen_layers=1, head_size=32, epochs=4, lr=3e-3)
    seen = []
    result = train(cfg, splits_for(cfg), backbone=path, on_epoch=lambda e, m: seen.append((e, m)))
    assert result.status == "finished" and [e for e, _ in seen] == [1, 2, 3, 4]
    m = result.metrics
    assert m["test/accuracy"] > 0.5 and m["val/f1_macro"] > 0.5  # chance is 0.2 on five classes
    assert set(result.per_class_f1) == {"Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}
    assert sum(map(sum, result.confusion)) == 5 * 40
    # the frozen layer is the pretrained one, untouched by fine-tuning
    pretrained = checkpoints.load(path)
    for k, v in result.model.backbone[0].state_dict().items():
        assert torch.equal(v, pretrained[f"backbone.0.{k}"])


def test_selection_uses_validation_only(tiny):
    cfg = tiny(epochs=5, lr=1e-2)
    result = train(cfg, splits_for(cfg))
    assert all(not k.startswith("test/") for h in result.history for k in h)
    val_f1 = [h["val/f1_macro"] for h in result.history]
    assert result.best_epoch == val_f1.index(max(val_f1)) + 1
    assert result.metrics["val/f1_macro"] == max(val_f1)


def test_same_config_and_seed_give_the_same_metrics(tiny):
    cfg = tiny(epochs=2)
    splits = splits_for(cfg)
    a, b = train(cfg, splits), train(cfg, splits)

    assert [untimed(h) for h in a.history] == [untimed(h) for h in b.history]
    assert untimed(a.metrics) == untimed(b.metrics)
    c = train(cfg.model_copy(update={"seed": 1}), splits)
    assert c.history[-1]["train/loss"] != a.history[-1]["train/loss"]


def test_early_stopping_respects_patience(tiny):
    cfg = tiny(epochs=30, patience=2, lr=3e-2)
    result = train(cfg, splits_for(cfg))
    assert result.metrics["epochs_run"] < 30
    assert result.metrics["epochs_run"] - result.best_epoch == 2


def test_a_diverging_run_ends_with_a_status_not_a_traceback(tiny):
    cfg = tiny(lr=1e12, epochs=3)
    result = train(cfg, splits_for(cfg))
    assert result.status == "diverged" and "lower the learning rate" in result.message


def test_cnn_learns_with_frozen_layers(tiny):
    """Three epochs on 100 images, first two conv blocks frozen: well above chance (0.2), and the frozen blocks (with
    their BatchNorm statistics) unchanged. Measured here: test accuracy 0.655."""
    cfg = tiny(model="cnn", epochs=3, frozen_layers=2)
    initial = prepare_model(cfg, 5).state_dict()
    result = train(cfg, splits_for(cfg))
    assert result.status == "finished" and result.metrics["test/accuracy"] > 0.45
    assert result.metrics["trainable_params"] == count_params(build_model("cnn", 5, frozen_layers=2))
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, initial[k]) == k.startswith(("backbone.0.", "backbone.1.")), k


def test_train_cli_prints_the_table_and_writes_json(tmp_path):
    (tmp_path / "e.yaml").write_text("study: cli\nclasses: [5, 6, 7, 8, 9]\nbudget_per_class: 20\n"
                                     "val_per_class: 20\ntest_per_class: 20\nepochs: 2\n"
                                     "pretrain: {classes: [0, 1, 2, 3, 4], epochs: 1}\n")
    p = subprocess.run([sys.executable, "-m", "fine_tune", "train", "--config", "e.yaml", "--json", "m.json",
                        "--set", "frozen_layers=2"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "FINE_TUNE_DATA": str(ROOT / "data")})
    assert p.returncode == 0, p.stderr
    assert "epoch   2/2" in p.stdout and "per-class test F1" in p.stdout and "Ankle boot" in p.stdout
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["status"] == "finished" and out["trainable_params"] == 64 * 5 + 5
    assert (tmp_path / "runs" / "train" / "cli" / "best.pt").is_file()


def test_epoch_scores_equal_sklearns(tiny):
    """The per-epoch scores are counted without sklearn (for speed); they must be sklearn's numbers."""
    from sklearn.metrics import accuracy_score, f1_score

    from fine_tune.learn.train import evaluate, scores

    cfg = tiny(epochs=1)
    splits = splits_for(cfg)
    result = train(cfg, splits)
    _, pred = evaluate(result.model, splits.val, torch.device("cpu"))
    y = splits.val.y.numpy()
    cases = [(y, pred),  # real predictions after one epoch
             (y, (pred + 1) % 5),  # every prediction wrong
             (y, pred.clip(max=3)),  # a class never predicted
             (y[y != 2], pred[y != 2])]  # a class absent from the labels but predicted
    for y_true, y_pred in cases:
        got = scores("val", y_true, y_pred)
        assert got["val/accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
        assert got["val/f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0),
                                                    abs=1e-12)


def test_per_class_report_and_confusion_equal_sklearns(tiny):
    """The run's test report and confusion matrix are counted without sklearn (its import costs every training
    process ~0.9 s); they must be sklearn's, including a class never predicted and a class with no test image."""
    from sklearn.metrics import classification_report, confusion_matrix

    from fine_tune.learn.metrics import confusion, per_class_report

    cfg = tiny(epochs=1)
    splits = splits_for(cfg)
    result = train(cfg, splits)
    y, pred = np.array(result.test_true), np.array(result.test_pred)
    names = splits.class_names
    for y_true, y_pred in [(y, pred), (y, (pred + 1) % 5), (y, pred.clip(max=3)), (y[y != 2], pred[y != 2])]:
        want = classification_report(y_true, y_pred, labels=list(range(5)), target_names=names, output_dict=True,
                                     zero_division=0)
        got = per_class_report(y_true, y_pred, names)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-12), key
        assert confusion(y_true, y_pred, 5).tolist() == confusion_matrix(y_true, y_pred, labels=list(range(5))).tolist()
    assert result.report == per_class_report(y, pred, names)


def test_cloned_state_is_untouched_by_later_training_steps():
    """The per-epoch snapshot (model and Adam state) must not follow the live objects: pure unit test."""
    from fine_tune.learn.models import build_model

    model = build_model("simplenet", 5, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    x, y = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 5, (8,))

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    step()
    snap = {"model": cloned(model.state_dict()), "optimizer": cloned(optimizer.state_dict())}
    before = {k: v.clone() for k, v in snap["model"].items()}
    exp_avg = snap["optimizer"]["state"][0]["exp_avg"].clone()
    step()
    assert all(torch.equal(before[k], v) for k, v in snap["model"].items())
    assert torch.equal(snap["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the live model did move
    model.load_state_dict(snap["model"])
    optimizer.load_state_dict(snap["optimizer"])  # what a resumed run does with it
