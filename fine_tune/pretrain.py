"""Produce the tutorial's `pretrained_model.pth` for real: train on a source task, cache by config hash.

The checkpoint is `runs/pretrained/<model>-<hash>.pt` with a JSON sidecar saying how it was made. Pretraining
uses the same data seed and validation size as the target task, so no target validation image is ever trained on.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Callable

import sklearn
import torch

from fine_tune import checkpoints
from fine_tune.config import Config
from fine_tune.data import splits_for
from fine_tune.models import build_model
from fine_tune.train import train


def source_config(cfg: Config) -> Config:
    """The config of the pretraining run itself: all images of the source classes, whole model trained."""
    p = cfg.pretrain
    return cfg.model_copy(update=dict(classes=p.classes, budget_per_class=None, frozen_layers=0, head_size=0,
                                      lr=p.lr, epochs=p.epochs, batch_size=p.batch_size, weight_decay=0.0,
                                      patience=None, pretrain=None, pretrained=None, search=None))


def cache_path(cfg: Config) -> Path:
    return cfg.run_dir() / "pretrained" / f"{cfg.model}-{cfg.pretrain_key()}.pt"


def backbone_for(cfg: Config, log: Callable[[str], None] = print) -> str | None:
    """Path of the backbone checkpoint `cfg` fine-tunes from (pretraining it first if not cached), or None."""
    if cfg.pretrained:
        # fail now, with a clear line, rather than in every trial
        checkpoints.load_backbone(build_model(cfg.model, len(cfg.classes)), cfg.pretrained)
        return cfg.pretrained
    if cfg.pretrain is None:
        return None
    path = cache_path(cfg)
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        if meta.get("sha256") == checkpoints.file_sha256(path):
            log(f"pretrained backbone: reusing {path} (source val accuracy {meta['source_val_accuracy']:.4f})")
            return str(path)
        log(f"pretrained backbone: {path} does not match its sidecar; pretraining again")
    return str(pretrain(cfg, log))


def pretrain(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """Train the whole model on the source classes; save its state dict and sidecar atomically."""
    src = source_config(cfg)
    log(f"pretraining {cfg.model} on classes {src.classes} for {src.epochs} epochs ...")
    splits = splits_for(src)
    result = train(src, splits, on_epoch=lambda e, m: log(f"  epoch {e}: val/accuracy {m['val/accuracy']:.4f}"))
    if result.status != "finished":
        raise RuntimeError(f"pretraining diverged: {result.message}")
    path = cache_path(cfg)
    checkpoints.save(result.model.state_dict(), path)
    meta = {"model": cfg.model, "source_classes": src.classes, "epochs": src.epochs, "lr": src.lr,
            "batch_size": src.batch_size, "seed": src.seed, "data_seed": src.data_seed,
            "source_val_accuracy": result.metrics["val/accuracy"],
            "source_test_accuracy": result.metrics["test/accuracy"],
            "data_fingerprint": splits.fingerprint, "config_hash": cfg.pretrain_key(),
            "sha256": checkpoints.file_sha256(path),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "sklearn": sklearn.__version__}}
    checkpoints.save_json(meta, path.with_suffix(".json"))
    log(f"pretrained backbone: saved {path} (source val accuracy {meta['source_val_accuracy']:.4f})")
    return path
