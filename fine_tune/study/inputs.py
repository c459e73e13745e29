"""What the runs of a sweep share, resolved once at the entry point: the data splits at each image size the search
space can give a trial, the backbone (checkpoint and hash) of each (model, image size), and what a run logs about
them (`run_params`, `run_record`: params, config.yaml, dataset inputs), which single runs use too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fine_tune.config import Config, Hyperparameters
from fine_tune.learn import checkpoints
from fine_tune.learn.data import Splits, splits_for
from fine_tune.learn.fashion import prepare as prepare_data
from fine_tune.learn.pretrain import backbone_for
from fine_tune.track.provenance import config_yaml, datasets

Backbone = tuple[str | None, str | None]  # (checkpoint path, its sha256), (None, None) from scratch


def backbone_of(path: str | None) -> Backbone:
    return path, checkpoints.file_sha256(path) if path else None


def run_params(cfg: Config, splits: Splits, backbone: Backbone) -> dict[str, Any]:
    """The params of a run of `cfg`: its hyperparameters, then the fixed context every run of the study shares."""
    path, sha = backbone
    return {**cfg.model_dump(include=set(Hyperparameters.model_fields)), "image_size": cfg.input_size(),
            "data": cfg.data.root or cfg.data.kind, "classes": cfg.classes,
            "class_names": "|".join(splits.class_names), "budget_per_class": cfg.budget_per_class,
            "val_per_class": cfg.val_per_class, "train_images": len(splits.train), "val_images": len(splits.val),
            "test_images": len(splits.test), "seed": cfg.seed, "data_seed": cfg.data_seed,
            "data_fingerprint": splits.fingerprint, "pretrained": path or "none",
            "pretrained_sha256": (sha or "none")[:16], "objective": cfg.sweep.objective}


def run_record(cfg: Config, splits: Splits) -> tuple[str, list]:
    """What a run of `cfg` is made of, for `RunTracker.record`: its resolved config and its datasets."""
    return config_yaml(cfg), datasets(cfg, splits)


@dataclass
class Inputs:
    """What the runs of a sweep share, resolved once at the entry point and handed to every worker: the data splits
    at each image size and the backbone of each (model, image size) its search space can give a trial."""

    cfg: Config
    splits: dict[int, Splits]  # by image size
    backbones: dict[tuple[str, int], Backbone]  # by (model, image size)

    def for_run(self, cfg: Config) -> tuple[Splits, str | None]:
        """The splits and backbone checkpoint a run of `cfg` (a trial's or a re-run's config) trains on."""
        return self.splits[cfg.input_size()], self.backbones[cfg.model, cfg.input_size()][0]

    def all_datasets(self) -> list[tuple[str, str, str, str]]:
        """The datasets of every image size the study's trials can use."""
        return [d for size, splits in self.splits.items()
                for d in datasets(self.cfg.model_copy(update={"image_size": size}), splits)]

    def run_params(self, cfg: Config) -> dict[str, Any]:
        return run_params(cfg, self.splits[cfg.input_size()], self.backbones[cfg.model, cfg.input_size()])

    def record(self, cfg: Config) -> tuple[str, list]:
        return run_record(cfg, self.splits[cfg.input_size()])


def resolve_inputs(cfg: Config, log: Callable[[str], None] = print) -> Inputs:
    """The data splits and backbones of every (model, image size) a run of `cfg` may get (backbones made first if not
    cached). The caller has run the pre-flight checks."""
    if cfg.data.kind == "fashion_mnist":
        prepare_data(cfg.data_dir)
    splits, backbones = {}, {}
    for variant in cfg.trial_variants():
        if variant.input_size() not in splits:
            splits[variant.input_size()] = splits_for(variant)
        backbones[variant.model, variant.input_size()] = backbone_of(backbone_for(variant, log))
    return Inputs(cfg, splits, backbones)
