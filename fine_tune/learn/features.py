"""Frozen-feature cache: the first k backbone layers are frozen and there is no augmentation, so their output for
an image cannot change during a trial, or between trials that share the checkpoint. Compute it once per
(frozen weights, k, data split) and train only the rest. Kept in memory within a worker, and on disk (keyed by a
content hash) across workers.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from fine_tune.errors import CheckpointError
from fine_tune.learn import checkpoints
from fine_tune.learn.data import Split, Splits
from fine_tune.learn.models import Net, inference_batch

_memory: dict[str, dict[str, torch.Tensor]] = {}


def cache_key(model: Net, k: int, splits: Splits, weights: str | None = None) -> str:
    """Hash of what the cached features depend on: the frozen layers' weights and exactly which examples. `weights`
    names the frozen weights when they are known without reading them (the backbone checkpoint's hash: hashing a
    text encoder's 90 MB took most of a probe trial's time)."""
    h = hashlib.sha256(f"{k}|{model.arch}|".encode())
    if weights is not None:
        h.update(f"checkpoint {weights}|{getattr(model.backbone[k - 1], 'pool', None)}".encode())
    else:
        for name, t in model.backbone[:k].state_dict().items():
            h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    for split in (splits.train, splits.val, splits.test):
        h.update(split.index.numpy().tobytes() + b"|")
    h.update(splits.fingerprint.encode())
    return h.hexdigest()[:24]


def clear_memory() -> None:
    """Forget the features held in this process (the disk cache stays): the next trial starts as cold as a newly
    spawned worker."""
    _memory.clear()


@torch.no_grad()
def _through(model: Net, k: int, x: torch.Tensor, device: torch.device, batch: int) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch):
        out.append(model.through(x[i:i + batch].to(device), 0, k).cpu())
    if out[0].dim() == 3 and len({o.shape[1] for o in out}) > 1:  # a text model's batches, each as long as its
        from fine_tune.learn.encoders import pad_cat                # longest text

        return pad_cat(out)
    return torch.cat(out)


def frozen_features(model: Net, k: int, splits: Splits, device: torch.device,
                    cache_dir: str | Path | None = None, weights: str | None = None) -> Splits:
    """`splits` with each example replaced by the output of the first k (frozen, eval-mode) backbone layers
    (`weights`: see `cache_key`)."""
    key = cache_key(model, k, splits, weights)
    feats = _memory.get(key)
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    on_disk = False
    if feats is None and path is not None and path.is_file():
        try:
            feats, on_disk = checkpoints.load_any(path), True
        except CheckpointError:
            feats = None  # a damaged cache entry is rebuilt, never trusted
    if feats is None:
        was_training = model.training
        model.eval()
        feats = {name: _through(model, k, getattr(splits, name).x, device, inference_batch(model, 4096))
                 for name in ("train", "val", "test")}
        model.train(was_training)
    if path is not None and not on_disk and (_memory.get(key) is None or not path.is_file()):
        checkpoints.save(feats, path)  # other workers (other processes) read it from here
    _memory[key] = feats
    return replace(splits, **{name: Split(feats[name], getattr(splits, name).y, getattr(splits, name).index)
                              for name in ("train", "val", "test")})
