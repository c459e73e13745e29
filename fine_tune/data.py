"""The images: Fashion-MNIST (found offline when possible) or a folder of your own, held in memory as uint8 tensors and
cut into budget / validation / test splits the same way for both.

Fashion-MNIST comes from, in order: the config's `data_dir` or `$FINE_TUNE_DATA`; Debian's `dataset-fashion-mnist`
in /usr/share/datasets/fashion-mnist; installing that package (root with apt); torchvision's download. The files are
extracted under `data/FashionMNIST/raw/`, where torchvision's FashionMNIST reads them.

An image folder (`data: {kind: imagefolder, root: PATH}`) has torchvision's ImageFolder layout: `train/<class>/*`
with optional `val/` and `test/` beside it, or `<class>/*` directly (validation and test are then drawn from it by
`data_seed`). Its images are decoded and resized once, into a uint8 tensor file under `runs/data_cache/` keyed by
the file list, sizes, modification times and the image size, so trials never decode an image again.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fine_tune.errors import DataError  # noqa: F401 - raised here, caught by the CLI

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
TEST_SHARE = 0.2  # of each class, when an image folder has no test/ and test_per_class is not set



@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W); the model scales and normalises it
    y: torch.Tensor  # int64 (N,), remapped to 0..k-1
    index: torch.Tensor  # positions in the source's image set, for audits and cache keys

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    fingerprint: str  # identifies exactly which images (and pixels) are in train and val
    digests: dict[str, str] = field(default_factory=dict)  # per split: its images' indices and pixels, hashed


@dataclass(frozen=True)
class Images:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,), the source's class ids


@dataclass(frozen=True)
class Source:
    """A data set as found: its training images, and its own test and validation images where it has them."""

    train: Images
    test: Images | None
    val: Images | None
    class_names: list[str]


# --- Fashion-MNIST


def _has_files(d: Path) -> bool:
    return all((d / f).is_file() for f in FILES)


def _install_debian_package() -> bool:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE]):
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if _has_files(SYSTEM_DIR):
            return True
    return False


def prepare(data_dir: str | None = None, root: str | Path = "data") -> Path:
    """Make sure the four IDX files sit, verified and extracted, under `root`; return `root`."""
    root = Path(root)
    raw = root / "FashionMNIST" / "raw"
    explicit = data_dir or os.environ.get("FINE_TUNE_DATA")
    # an explicit folder is the user's choice: it is looked at first, even when data/ already holds a copy
    if not explicit and (raw / "train-images-idx3-ubyte").is_file() and (raw / "t10k-labels-idx1-ubyte").is_file():
        return root
    tried = []
    source = None
    if explicit:
        d = Path(explicit)
        if (d / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            return d  # already a torchvision root, extracted
        for cand in (d, d / "FashionMNIST" / "raw"):
            if _has_files(cand):
                source = cand
                break
        if source is None:
            raise DataError(f"{d} does not hold the Fashion-MNIST files ({', '.join(FILES)}); "
                            "point data_dir / FINE_TUNE_DATA at the folder that has them, or unset it")
    elif _has_files(SYSTEM_DIR):
        source = SYSTEM_DIR
    else:
        tried.append(f"{SYSTEM_DIR} (absent)")
        if _install_debian_package():
            source = SYSTEM_DIR
        else:
            tried.append(f"apt-get install {DEBIAN_PACKAGE} (not root, no apt, or it failed)")
    raw.mkdir(parents=True, exist_ok=True)
    if source is not None:
        # Debian recompressed the .gz files, so torchvision's checksums of the originals do not match them;
        # extract them ourselves (atomically) and let torchvision's IDX reader check the magic numbers.
        for f in FILES:
            target = raw / f.removesuffix(".gz")
            if not target.is_file():
                tmp = target.with_suffix(".tmp")
                with gzip.open(source / f, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, target)
        return root
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # torchvision raises URLError, RuntimeError, OSError...
        tried.append(f"torchvision download ({type(e).__name__})")
        raise DataError("Fashion-MNIST not found: tried " + "; ".join(tried) +
                        f". Fix: `sudo apt-get install {DEBIAN_PACKAGE}` or set FINE_TUNE_DATA to a folder "
                        "holding the four .gz files") from None
    return root


@functools.lru_cache(maxsize=2)
def load(data_dir: str | None = None, root: str = "data") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor, tuple[str, ...]]:
    """All of Fashion-MNIST as uint8 images (N, 28, 28) and int64 labels, read once per process.

    The IDX files are parsed once (by torchvision) into one tensor file beside them, keyed by their sizes and
    modification times; every later process maps that file into memory instead, without importing torchvision
    (whose import pulls in torch._dynamo) before its first trial: make bench (i)."""
    from fine_tune import checkpoints

    raw = Path(prepare(data_dir, root)) / "FashionMNIST" / "raw"
    key = hashlib.sha256(b"v1")
    for f in sorted(raw.glob("*-ubyte")):
        st = f.stat()
        key.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = raw.parent / f"tensors-{key.hexdigest()[:16]}.pt"
    if cache.is_file():
        try:
            t = torch.load(cache, mmap=True, weights_only=True)
            return t["train_x"], t["train_y"], t["test_x"], t["test_y"], tuple(t["classes"])
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt from the IDX files, never trusted
            pass
    from torchvision.datasets import FashionMNIST

    tr, te = FashionMNIST(str(raw.parent.parent), train=True), FashionMNIST(str(raw.parent.parent), train=False)
    t = {"train_x": tr.data, "train_y": tr.targets, "test_x": te.data, "test_y": te.targets,
         "classes": list(tr.classes)}
    try:
        checkpoints.save(t, cache)
    except OSError:
        pass  # a read-only data folder: read the IDX files every time
    return t["train_x"], t["train_y"], t["test_x"], t["test_y"], tuple(t["classes"])


def fashion_mnist(data_dir: str | None = None) -> Source:
    tr_x, tr_y, te_x, te_y, names = load(data_dir)
    return Source(Images(tr_x.unsqueeze(1), tr_y), Images(te_x.unsqueeze(1), te_y), None, list(names))


# --- an image folder of your own


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
    from fine_tune import checkpoints

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
        except (checkpoints.CheckpointError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt, never trusted
    decoded = {}
    for part, classes in found.items():
        files = [f for name in names for f in classes.get(name, [])]
        labels = [i for i, name in enumerate(names) for _ in classes.get(name, [])]
        decoded[part] = {"x": _decode(files, image_size), "y": torch.tensor(labels, dtype=torch.long)}
    if cache is not None:
        checkpoints.save({**decoded, "class_names": names}, cache)
    return Source(*(Images(**decoded[p]) if p in decoded else None for p in ("train", "test", "val")), names)


# --- splits


def _per_class(labels: torch.Tensor, classes: list[int], seed: int) -> list[torch.Tensor]:
    """For each class, its indices in a seeded random order (stable across torch versions: randperm on CPU)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)])
    return out


def class_ids(source: Source, classes: list[int | str] | None) -> list[int]:
    """The source's ids of `classes` (ids or folder / class names; None = all of them)."""
    if classes is None:
        return list(range(len(source.class_names)))
    ids = []
    for c in classes:
        if isinstance(c, str):
            if c not in source.class_names:
                raise DataError(f"class {c!r} is not in the data (classes: {', '.join(source.class_names)}); "
                                "fix `classes:`")
            ids.append(source.class_names.index(c))
        elif not 0 <= c < len(source.class_names):
            raise DataError(f"class id {c} is out of range; the data has {len(source.class_names)} classes")
        else:
            ids.append(c)
    return ids


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-1] == size and x.shape[-2] == size:
        return x
    from torchvision.transforms.v2.functional import resize

    return resize(x, [size, size], antialias=True)


def shifted(x: torch.Tensor, shift: str, seed: int) -> torch.Tensor:
    """Images under a domain shift: turned a quarter, inverted, or with seeded Gaussian noise (sd 64 of 255)."""
    if shift == "rotate90":
        return torch.rot90(x, 1, dims=(-2, -1)).contiguous()
    if shift == "invert":
        return 255 - x
    if shift == "noise":
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 64
        return (x.float() + noise).round().clamp(0, 255).to(torch.uint8)
    return x


def make_splits(source: Source, classes: list[int | str] | None, val_per_class: int,
                budget_per_class: int | None = None, test_per_class: int | None = None, data_seed: int = 0,
                image_size: int | None = None, shift: str = "none", holdout_per_class: int = 0) -> Splits:
    """Carve a stratified validation set and a per-class labeled budget from the training images.

    Validation and budget are disjoint draws from the same seeded order; the test set is the source's own test images
    of `classes` (or, when it has none, a first disjoint draw), used once at the end of a run and never for selection.
    `holdout_per_class` images after validation are skipped (pretraining leaves them to a target's budget).
    """
    ids = class_ids(source, classes)
    remap = torch.full((len(source.class_names),), -1, dtype=torch.long)
    remap[torch.tensor(ids)] = torch.arange(len(ids))
    names = [source.class_names[c] for c in ids]
    val_idx, train_idx, test_idx = [], [], []
    for c, name, order in zip(ids, names, _per_class(source.train.y, ids, data_seed)):
        n_test = 0 if source.test is not None else test_per_class or max(1, int(TEST_SHARE * len(order)))
        n_val = 0 if source.val is not None else val_per_class
        n_val += holdout_per_class  # skipped like validation images, but not returned
        need = n_test + n_val + (budget_per_class or 1)
        if len(order) < need:
            raise DataError(f"class {name!r} has {len(order)} training images, fewer than the {need} this run needs "
                            f"(test {n_test} + validation and held out {n_val} + budget {budget_per_class or 1}); lower "
                            "budget_per_class / val_per_class / test_per_class or add images")
        test_idx.append(order[:n_test])
        val_idx.append(order[n_test:n_test + n_val - holdout_per_class])
        end = None if budget_per_class is None else n_test + n_val + budget_per_class
        train_idx.append(order[n_test + n_val:end])

    def take(images: Images, parts: list[torch.Tensor]) -> Split:
        idx = torch.cat(parts).sort().values
        x = shifted(_resize(images.x[idx], image_size), shift, data_seed + int(idx.sum()))
        return Split(x, remap[images.y[idx]], idx)

    def own(images: Images, cap: int | None) -> Split:  # the source's own val / test images of these classes
        return take(images, [order[:cap] for order in _per_class(images.y, ids, data_seed)])

    train, val = take(source.train, train_idx), (own(source.val, val_per_class) if source.val is not None
                                                  else take(source.train, val_idx))
    test = own(source.test, test_per_class) if source.test is not None else take(source.train, test_idx)
    fingerprint = hashlib.sha256(train.index.numpy().tobytes() + b"|" + val.index.numpy().tobytes()
                                 + train.x.numpy().tobytes()).hexdigest()[:16]
    digests = {name: hashlib.sha256(split.index.numpy().tobytes() + b"|" + split.x.numpy().tobytes()).hexdigest()[:16]
               for name, split in (("train", train), ("val", val), ("test", test))}
    return Splits(train, val, test, names, fingerprint, digests)


def source_for(cfg) -> Source:
    """The data a `Config` names, at the image size its model takes."""
    if cfg.data.kind == "imagefolder":
        return image_folder(cfg.data.root, cfg.input_size(), cfg.run_dir() / "data_cache")
    return fashion_mnist(cfg.data_dir)


def splits_for(cfg, holdout_per_class: int = 0) -> Splits:
    """The splits a `Config` describes (`holdout_per_class`: see make_splits)."""
    return make_splits(source_for(cfg), cfg.classes, cfg.val_per_class, cfg.budget_per_class, cfg.test_per_class,
                       cfg.data_seed, cfg.input_size(), cfg.data.shift, holdout_per_class)
