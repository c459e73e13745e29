"""torchvision's pretrained weights, offline-safe: found in torchvision's own cache ($TORCH_HOME/hub/checkpoints, where
its weights API downloads them), checked against the hash in their file name, loaded with `weights_only=True`.

torchvision's builders check a file's hash only while downloading it and then unpickle it with weights_only=False; a
file already in the cache is trusted as it is. Here a cached file must match its name's hash prefix before anything
reads it. With no file and no network (or FINE_TUNE_OFFLINE=1) the error names the exact file and folder to fill.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

from fine_tune.errors import CheckpointError


def resolve(arch: str, name: str):
    """torchvision's weights enum member `name` (e.g. IMAGENET1K_V1, DEFAULT) of architecture `arch`."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
        return enum[name] if name in enum.__members__ else enum.verify(name)
    except (ValueError, KeyError, AttributeError):
        members = ", ".join(torchvision.models.get_model_weights(arch).__members__)
        raise CheckpointError(f"weights {name!r}: {arch} has no such torchvision weights ({members})") from None


def cached_file(weights) -> Path:
    """Where torchvision's weights API keeps this file: <TORCH_HOME>/hub/checkpoints/<file name of its URL>."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def verify(path: Path) -> None:
    """The file's sha256 must start with the hex prefix in its name (`resnet18-f37072fd.pth`), as on download."""
    import torch.hub

    match = torch.hub.HASH_REGEX.search(path.name)
    prefix = match.group(1) if match else ""
    if len(prefix) < 8:
        raise CheckpointError(f"weights file {path} has no sha256 prefix in its name; use torchvision's file name")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise CheckpointError(f"weights file {path} is not the file its name promises (sha256 {digest.hexdigest()[:8]}"
                              f"..., expected {prefix}...); delete it and download it again")


def load(arch: str, name: str) -> tuple[dict, str]:
    """torchvision's state dict for `arch` with weights `name`, and the file it came from. Downloaded once into the
    cache when it is missing and the network allows; verified before it is read."""
    import torch
    import torch.hub

    weights = resolve(arch, name)
    path = cached_file(weights)
    if not path.is_file():
        if os.environ.get("FINE_TUNE_OFFLINE") == "1":
            raise CheckpointError(f"weights {arch} {weights.name}: {path.name} is not in {path.parent} and "
                                  f"FINE_TUNE_OFFLINE=1; download {weights.url} into that folder")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            prefix = torch.hub.HASH_REGEX.search(path.name)
            torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=prefix.group(1) if prefix else None,
                                           progress=False)
        except Exception as e:  # URLError offline, an HTTP error, a full disk...
            raise CheckpointError(f"weights {arch} {weights.name}: {path.name} is not in {path.parent} and could not "
                                  f"be downloaded ({type(e).__name__}); place {weights.url} there (or set "
                                  "TORCH_HOME to a folder whose hub/checkpoints has it)") from None
    verify(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    except Exception as e:
        raise CheckpointError(f"weights file {path} cannot be read ({type(e).__name__}); delete it and download it "
                              "again") from None
