"""A folder of your own images in torchvision's ImageFolder layout: `train/<class>/*` with optional `val/` and
`test/` beside it, or `<class>/*` directly (validation and test are then drawn from it by `data_seed`). Its images are
decoded and resized once, into a uint8 tensor file under `runs/data_cache/` keyed by the file list, sizes,
modification times and the image size, so trials never decode an image again; only the latest such file of each
(folder, image size) is kept.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from fine_tune.errors import CheckpointError, DataError
from fine_tune.learn.data import Images, Source

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
# What file managers, notebooks and NAS boxes leave in a folder: never a class, never an image of one.
SYSTEM_FOLDERS = ("@eaDir", "__MACOSX", "#recycle", "$RECYCLE.BIN", "System Volume Information")
DECODER = 2  # in the cache key: a change to how images are decoded must not reuse pixels decoded the old way


def _hidden(path: Path, top: Path) -> bool:
    """Whether `path` is, or lies in, a hidden entry below `top` (`.ipynb_checkpoints`, `.DS_Store`, `@eaDir`...)."""
    return any(part.startswith(".") or part in SYSTEM_FOLDERS for part in path.relative_to(top).parts)


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p, folder)):
        files = sorted(f for f in d.rglob("*")
                       if f.suffix.lower() in IMAGE_SUFFIXES and not _hidden(f, d) and f.is_file())
        if not files:
            raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES[:4])}...); add images or "
                            "remove the folder")
        classes[d.name] = files
    if not classes:
        raise DataError(f"{folder} has no class folders; lay it out as {folder}/<class>/<image> (torchvision "
                        "ImageFolder), optionally under train/, val/, test/")
    return classes


def _full_scale(im) -> float:
    """The value of white in a wide greyscale image: 2**bits - 1 by the bit depth a TIFF states, else 16-bit (what
    Pillow gives 16-bit PNG and PGM files as); 1.0 for floating point."""
    if im.mode == "F":
        return 1.0
    bits = (getattr(im, "tag_v2", None) or {}).get(258, 16)  # TIFF BitsPerSample, one value or one per channel
    return float(2 ** (bits[0] if isinstance(bits, tuple) else bits) - 1)


def _rgb(im):
    """`im` as 8-bit RGB. Wide greyscale (16-bit, 32-bit, float) is scaled by its bit depth: `convert("RGB")` clips it
    at 255, so a 16-bit photo turns near-white. Transparency is laid over white, as a viewer shows it: the colour
    stored under a transparent pixel is invisible and arbitrary."""
    import numpy as np
    from PIL import Image

    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        scaled = np.nan_to_num(np.asarray(im, dtype=np.float64)) * (255 / _full_scale(im))
        im = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert("RGB")


def _decode(files: list[Path], image_size: int) -> torch.Tensor:
    """Images decoded to RGB and resized to image_size x image_size, as one uint8 (N, 3, S, S) tensor."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice it; either way the file would take gigabytes to decode
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for i, f in enumerate(files):
            try:
                with Image.open(f) as im:
                    im = _rgb(im).resize((image_size, image_size), Image.Resampling.BILINEAR)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise DataError(f"image {f} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS:,} pixels, "
                                "a possible decompression bomb); resize or remove it") from None
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise DataError(f"image {f} cannot be read ({type(e).__name__}: {str(e)[:80]}); fix or remove "
                                "it") from None
            out[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    return out


def _cache_file(cache_dir: Path, root: Path, image_size: int, found: dict[str, dict[str, list[Path]]]) -> Path:
    """The cache file of `root`'s images as they are now: named by the folder and size, then by its contents."""
    key = hashlib.sha256(f"{image_size}|{DECODER}".encode())
    for part, classes in found.items():
        for name, files in classes.items():
            for f in files:
                st = f.stat()
                key.update(f"{part}|{name}|{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    folder = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return cache_dir / f"imagefolder-{folder}-{image_size}px-{key.hexdigest()[:24]}.pt"


def _prune(cache: Path) -> None:
    """Remove the older cache files of the same folder and size: each holds a full decoded copy of the folder."""
    stem = cache.name.rsplit("-", 1)[0]
    for old in cache.parent.glob(f"{stem}-*.pt"):
        if old != cache:
            old.unlink(missing_ok=True)


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
    cache = _cache_file(Path(cache_dir), root, image_size, found) if cache_dir else None
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
        _prune(cache)
    return Source(*(Images(**decoded[p]) if p in decoded else None for p in ("train", "test", "val")), names)
