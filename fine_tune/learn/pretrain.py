"""Where a run's backbone comes from: a user's checkpoint (`pretrained:`), torchvision's weights (`weights:`), or
the tutorial's `pretrained_model.pth` produced for real (`pretrain:`: train on a source task, cache by config hash).

Every backbone ends up as one of our checkpoints, `runs/pretrained/<model>-<hash>.pt` with a JSON sidecar saying how
it was made, so a trial loads, hashes and caches features the same way whatever its origin. Pretraining uses the same
data seed and validation size as the target task, so no target validation image is ever trained on.
"""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fine_tune.archs import is_text
from fine_tune.config import Config
from fine_tune.learn import checkpoints
from fine_tune.learn.data import splits_for
from fine_tune.learn.models import build_model
from fine_tune.learn.train import train


def source_config(cfg: Config) -> Config:
    """The config of the pretraining run itself: all images of the source classes, whole model trained."""
    p = cfg.pretrain
    return cfg.model_copy(update=dict(classes=p.classes, budget_per_class=None, frozen_layers=0, head_size=0, seed=p.seed,
                                      lr=p.lr, epochs=p.epochs, batch_size=p.batch_size, weight_decay=0.0,
                                      patience=None, label_smoothing=0.0, pretrain=None, pretrained=None,
                                      weights=None, search=None,
                                      data=cfg.data.model_copy(update={"shift": "none"})))


def cache_path(cfg: Config) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", cfg.model)  # a hub id (hf:org/name) as one file name
    return cfg.run_dir() / "pretrained" / f"{name}-{cfg.pretrain_key()}.pt"


def backbone_for(cfg: Config, log: Callable[[str], None] = print) -> str | None:
    """Path of the backbone checkpoint `cfg` fine-tunes from (made first if not cached), or None (from scratch)."""
    if cfg.pretrained:
        # fail now, with a clear line, rather than in every trial
        checkpoints.load_backbone(build_model(cfg.model, 2, image_size=cfg.input_size()), cfg.pretrained)
        return cfg.pretrained
    if cfg.pretrain is None and cfg.weights is None and not is_text(cfg.model):
        return None
    path = cache_path(cfg)
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        if meta.get("sha256") == checkpoints.file_sha256(path):
            what = meta.get("origin") or f"source val accuracy {meta['source_val_accuracy']:.4f}"
            log(f"pretrained backbone: reusing {path} ({what})")
            return str(path)
        log(f"pretrained backbone: {path} does not match its sidecar; making it again")
    made = from_hub(cfg, log) if is_text(cfg.model) else from_torchvision(cfg, log) if cfg.weights else \
        pretrain(cfg, log)
    return str(made)


def from_torchvision(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """torchvision's weights for `cfg.model` (checked, offline-safe) as one of our backbone checkpoints; a ViT's
    position embedding is interpolated to the run's image size."""
    from fine_tune.learn import weights
    from fine_tune.learn.models import Net

    state, source = weights.load(cfg.model, cfg.weights)
    if cfg.model.startswith("vit_") and cfg.input_size() != 224:
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(cfg.input_size(), int(cfg.model.rsplit("_", 1)[1]), state)
    model = Net(cfg.model, 2, image_size=cfg.input_size(), trunk_state=state)
    return _saved_backbone(cfg, model, f"torchvision {cfg.model} {cfg.weights}", Path(source), log)


def from_hub(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """A Hugging Face encoder's own weights (its folder, the hub cache or a packaged copy) as one of our backbones."""
    from fine_tune.learn.encoders import WEIGHTS, model_dir
    from fine_tune.learn.models import Net

    folder = model_dir(cfg.model)
    model = Net(cfg.model, 2, pooling=cfg.pooling, hub_weights=True)
    source = next(folder / f for f in WEIGHTS if (folder / f).is_file())
    return _saved_backbone(cfg, model, f"Hugging Face {cfg.model.removeprefix('hf:')}", source, log)


def _saved_backbone(cfg: Config, model, origin: str, source: Path, log: Callable[[str], None]) -> Path:
    """`model`'s backbone as our checkpoint with a sidecar saying where its weights came from."""
    path = checkpoints.save({k: v for k, v in model.state_dict().items() if k.startswith("backbone.")},
                            cache_path(cfg))
    meta = {"model": cfg.model, "origin": origin, "source_file": str(source),
            "source_sha256": checkpoints.file_sha256(source), "image_size": cfg.input_size(),
            "config_hash": cfg.pretrain_key(), "sha256": checkpoints.file_sha256(path),
            "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    checkpoints.save_json(meta, path.with_suffix(".json"))
    log(f"pretrained backbone: {origin} from {source} saved as {path}")
    return path


def pretrain(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """Train the whole model on the source classes; save its state dict and sidecar atomically."""
    src = source_config(cfg)
    log(f"pretraining {cfg.model} on classes {src.classes} for {src.epochs} epochs ...")
    splits = splits_for(src, holdout_per_class=cfg.pretrain.holdout_per_class)
    result = train(src, splits, on_epoch=lambda e, m: log(f"  epoch {e}: val/accuracy {m['val/accuracy']:.4f}"))
    if result.status != "finished":
        raise RuntimeError(f"pretraining diverged: {result.message}")
    path = cache_path(cfg)
    checkpoints.save(result.model.state_dict(), path)
    meta = {"model": cfg.model, "source_classes": src.classes, "holdout_per_class": cfg.pretrain.holdout_per_class,
            "epochs": src.epochs, "lr": src.lr,
            "batch_size": src.batch_size, "seed": src.seed, "data_seed": src.data_seed,
            "source_val_accuracy": result.metrics["val/accuracy"],
            "source_test_accuracy": result.metrics["test/accuracy"],
            "data_fingerprint": splits.fingerprint, "config_hash": cfg.pretrain_key(),
            "sha256": checkpoints.file_sha256(path),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__}}
    checkpoints.save_json(meta, path.with_suffix(".json"))
    log(f"pretrained backbone: saved {path} (source val accuracy {meta['source_val_accuracy']:.4f})")
    return path
