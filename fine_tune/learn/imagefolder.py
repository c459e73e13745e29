"""A folder of your own images in torchvision's ImageFolder layout: `train/<class>/*` with optional `val/` and
`test/` beside it, or `<class>/*` directly (validation and test are then drawn from it by `data_seed`). Its images are
decoded and resized once, into a uint8 tensor file under `runs/data_cache/` keyed by the file list, sizes,
modification times and the image size, so trials never decode an image again.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fine_tune.errors import CheckpointError, DataError
from fine_tune.learn.data import Images, Source

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES[:4])}...); add images or "
                            "remove the folder")
        classes[d.name] = files
    if not classes:
        raise DataError(f"{folder} has no class folders; lay it out as {folder}/<class>/<image> (torchvision "
                        "ImageFolder), optionally under train/, val/, test/")
    return classes


def _decode(files: list[Path], image_size: int) -> torch.Tensor:
    """Images decoded to RGB and resized to image_size x image_size, as one uint8 (N, 3, S, S) tensor."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"image {f} cannot be read ({type(e).__name__}: {str(e)[:80]}); fix or remove it") from None
        out[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    return out


def image_folder(root: str | Path, image_size: int, cache_dir: str | Path | None = None) -> Source:
    """A folder of images as a Source: decoded once per (files, image size) and cached as one tensor file."""
    from fine_tune.learn import checkpoints

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; set data.root to a folder of <class>/<image> folders")
    parts = {p: root / p for p in ("train", "val", "test") if (root / p).is_dir()}
    if "train" not in parts and parts:
        raise DataError(f"{root} has {'/'.join(parts)}/ but no train/; add train/<class>/ or put the class folders "
                        "directly in it")
    parts = parts or {"train": root}
    found = {name: _class_folders(folder) for name, folder in parts.items()}
    names = list(found["train"])
    for part in ("val", "test"):
        if part in found and set(found[part]) - set(names):
            raise DataError(f"{parts[part]} has classes that train/ lacks ({sorted(set(found[part]) - set(names))}); "
                            "every val/test class needs training images")
    key = hashlib.sha256(str(image_size).encode())
    for part, classes in found.items():
        for name, files in classes.items():
            for f in files:
                st = f.stat()
                key.update(f"{part}|{name}|{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = Path(cache_dir) / f"imagefolder-{key.hexdigest()[:24]}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            stored = checkpoints.load_any(cache)
            return Source(*(Images(**stored[p]) if stored.get(p) else None for p in ("train", "test", "val")),
                          stored["class_names"])
        except (CheckpointError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt, never trusted
    decoded = {}
    for part, classes in found.items():
        files = [f for name in names for f in classes.get(name, [])]
        labels = [i for i, name in enumerate(names) for _ in classes.get(name, [])]
        decoded[part] = {"x": _decode(files, image_size), "y": torch.tensor(labels, dtype=torch.long)}
    if cache is not None:
        checkpoints.save({**decoded, "class_names": names}, cache)
    return Source(*(Images(**decoded[p]) if p in decoded else None for p in ("train", "test", "val")), names)
