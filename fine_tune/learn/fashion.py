"""Fashion-MNIST, found offline when possible: the config's `data_dir` or `$FINE_TUNE_DATA`; Debian's
`dataset-fashion-mnist` in /usr/share/datasets/fashion-mnist (`make data` installs it when root has apt: a library
never installs system packages); torchvision's download. The files are extracted under `data/FashionMNIST/raw/`,
where torchvision's FashionMNIST reads them, and mapped from one tensor file after the first read.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
from pathlib import Path

import torch

from fine_tune.errors import DataError
from fine_tune.learn.data import Images, Source

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _has_files(d: Path) -> bool:
    return all((d / f).is_file() for f in FILES)


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
        tried.append(f"{SYSTEM_DIR} (absent: `make data` installs {DEBIAN_PACKAGE} there when run as root)")
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
    from fine_tune.learn import checkpoints

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
