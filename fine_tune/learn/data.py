"""The data a run trains on: a source (Fashion-MNIST in fashion.py, an image folder in imagefolder.py) held in memory
as uint8 tensors, cut into budget / validation / test splits the same way for every source.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from fine_tune.errors import DataError

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
    unit: str = "images"  # what one example is, for messages


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
    unit: str = "images"  # what one example is, for messages


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
            raise DataError(f"class {name!r} has {len(order)} training {source.unit}, fewer than the {need} this run "
                            f"needs (test {n_test} + validation and held out {n_val} + budget {budget_per_class or 1}); "
                            f"lower budget_per_class / val_per_class / test_per_class or add {source.unit}")
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
    return Splits(train, val, test, names, fingerprint, digests, source.unit)


def source_for(cfg) -> Source:
    """The data a `Config` names, at the image size its model takes."""
    if cfg.data.is_text():  # tokenized with the model's own tokenizer
        from fine_tune.learn.encoders import model_dir
        from fine_tune.learn.text import text_source

        return text_source(cfg, model_dir(cfg.model))
    if cfg.data.kind == "imagefolder":
        from fine_tune.learn.imagefolder import image_folder

        return image_folder(cfg.data.root, cfg.input_size(), cfg.run_dir() / "data_cache")
    from fine_tune.learn.fashion import fashion_mnist

    return fashion_mnist(cfg.data_dir)


def splits_for(cfg, holdout_per_class: int = 0) -> Splits:
    """The splits a `Config` describes (`holdout_per_class`: see make_splits)."""
    return make_splits(source_for(cfg), cfg.classes, cfg.val_per_class, cfg.budget_per_class, cfg.test_per_class,
                       cfg.data_seed, cfg.input_size(), cfg.data.shift, holdout_per_class)
