"""Fashion-MNIST, found offline when possible, held in memory as tensors, cut into budget/val/test splits.

Where the files come from, in order: the config's `data_dir` or `$FINE_TUNE_DATA`; Debian's
`dataset-fashion-mnist` in /usr/share/datasets/fashion-mnist; installing that package (root with apt);
torchvision's download. They are extracted under `data/FashionMNIST/raw/`, where torchvision's FashionMNIST reads them.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# Channel statistics of the Fashion-MNIST training set, so inputs are roughly zero-mean, unit-variance.
MEAN, STD = 0.2860, 0.3530


class DataError(RuntimeError):
    """The data could not be found or read; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32 (N, 1, 28, 28), normalised
    y: torch.Tensor  # int64 (N,), remapped to 0..k-1
    index: torch.Tensor  # positions in the official training or test set, for audits

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    fingerprint: str  # identifies exactly which images are in train and val


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
    from torchvision.datasets import FashionMNIST

    root = Path(root)
    raw = root / "FashionMNIST" / "raw"
    if (raw / "train-images-idx3-ubyte").is_file() and (raw / "t10k-labels-idx1-ubyte").is_file():
        return root
    explicit = data_dir or os.environ.get("FINE_TUNE_DATA")
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
    """All of Fashion-MNIST as uint8 images and int64 labels, read once per process."""
    from torchvision.datasets import FashionMNIST

    r = str(prepare(data_dir, root))
    tr, te = FashionMNIST(r, train=True), FashionMNIST(r, train=False)
    return tr.data, tr.targets, te.data, te.targets, tuple(tr.classes)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def _per_class(labels: torch.Tensor, classes: list[int], seed: int) -> list[torch.Tensor]:
    """For each class, its indices in a seeded random order (stable across torch versions: randperm on CPU)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)])
    return out


def make_splits(classes: list[int], val_per_class: int, budget_per_class: int | None = None,
                test_per_class: int | None = None, data_seed: int = 0, data_dir: str | None = None) -> Splits:
    """Carve a stratified validation set and a per-class labeled budget from the training images.

    Validation and budget are disjoint draws from the same seeded order; the test set is the official test
    images of `classes`, used once at the end of a run and never for selection.
    """
    train_x, train_y, test_x, test_y, names = load(data_dir)
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))

    val_idx, train_idx = [], []
    for order in _per_class(train_y, classes, data_seed):
        val_idx.append(order[:val_per_class])
        end = None if budget_per_class is None else val_per_class + budget_per_class
        train_idx.append(order[val_per_class:end])
    test_idx = [order[:test_per_class] for order in _per_class(test_y, classes, data_seed)]

    def take(x: torch.Tensor, y: torch.Tensor, parts: list[torch.Tensor]) -> Split:
        idx = torch.cat(parts).sort().values
        return Split(_normalise(x[idx]), remap[y[idx]], idx)

    train, val = take(train_x, train_y, train_idx), take(train_x, train_y, val_idx)
    fingerprint = hashlib.sha256(train.index.numpy().tobytes() + b"|" + val.index.numpy().tobytes()
                                 + train_x[train.index].numpy().tobytes()).hexdigest()[:16]
    return Splits(train, val, take(test_x, test_y, test_idx), [names[c] for c in classes], fingerprint)


def splits_for(cfg) -> Splits:
    """The splits a `Config` describes."""
    return make_splits(cfg.classes, cfg.val_per_class, cfg.budget_per_class, cfg.test_per_class,
                       cfg.data_seed, cfg.data_dir)
