"""Checkpoints written atomically and read safely (`weights_only=True`), with errors a user can act on."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fine_tune.errors import CheckpointError


def _atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write through a temp file in the same folder, then rename: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save(obj: Any, path: str | Path) -> Path:
    def write(tmp: str) -> None:
        # through a file object: given a path, torch names the archive's folder after it (here the random temp
        # name), and the same tensors saved twice would hash differently (`make rerun` finds backbones by hash)
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return _atomic(path, write)


def save_json(obj: Any, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def file_sha256(path: str | Path) -> str:
    """The file's sha256, read once per version of the file in a process (its size and modification time)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_any(path: str | Path) -> Any:
    """`torch.load(..., weights_only=True)`: tensors and plain containers only, never pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check `pretrained:` or run `make pretrain`")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch state dict ({reason}); "
                              "delete it and rerun `make pretrain`, or point `pretrained:` at a good file") from None


def load(path: str | Path) -> dict:
    """A model state dict (optionally wrapped as {"state_dict": ...}); any failure is a one-line CheckpointError."""
    obj = load_any(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors; save `model.state_dict()`")
    return obj


@functools.lru_cache(maxsize=2)
def _backbone_state(path: str, size: int, mtime_ns: int) -> dict:
    """A backbone checkpoint read once per version of the file in a process: every trial of a worker starts from it
    (reading a text encoder's 90 MB took a fifth of a probe trial). Only copied from, never changed."""
    return load(path)


def load_backbone(model: nn.Module, path: str | Path) -> None:
    """Copy the `backbone.*` weights of a checkpoint into `model`; the head stays new."""
    st = Path(path).stat() if Path(path).is_file() else None
    state = _backbone_state(str(Path(path).resolve()), st.st_size, st.st_mtime_ns) if st else load(path)
    want = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    have = {k: v for k, v in state.items() if k.startswith("backbone.")}
    missing = sorted(set(want) - set(have))
    shapes = [f"{k} {tuple(have[k].shape)} vs model {tuple(want[k].shape)}"
              for k in sorted(set(want) & set(have)) if have[k].shape != want[k].shape]
    if missing or shapes:
        detail = "; ".join(([f"missing keys {missing[:4]}{'...' if len(missing) > 4 else ''}"] if missing else [])
                           + ([f"shape mismatch {', '.join(shapes[:3])}"] if shapes else []))
        raise CheckpointError(f"checkpoint {path} does not fit this model's backbone: {detail}; "
                              "use a checkpoint pretrained for the same `model:`")
    model.load_state_dict({**model.state_dict(), **{k: have[k] for k in want}})
