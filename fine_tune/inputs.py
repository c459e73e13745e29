"""What the runs of a sweep share, resolved once at the entry point: the data splits at each image size the search
space can give a trial, the backbone (checkpoint and hash) of each (model, image size), and what a run of a given
config logs about them (params, config.yaml, dataset inputs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fine_tune import checkpoints
from fine_tune.config import Config, Hyperparameters
from fine_tune.data import Splits, splits_for
from fine_tune.data import prepare as prepare_data
from fine_tune.pretrain import backbone_for
from fine_tune.provenance import config_yaml, datasets
from fine_tune.space import Choices
from fine_tune.tracking import RunTracker, StudyTracker


@dataclass
class Inputs:
    """What the runs of a sweep share, resolved once at the entry point and handed to every worker: the data splits
    at each image size and the backbone of each (model, image size) its search space can give a trial."""

    cfg: Config
    splits: dict[int, Splits]  # by image size
    backbones: dict[tuple[str, int], tuple[str | None, str | None]]  # (model, image size) -> (checkpoint, sha256)

    def for_run(self, cfg: Config) -> tuple[Splits, str | None]:
        """The splits and backbone checkpoint a run of `cfg` (a trial's or a re-run's config) trains on."""
        return self.splits[cfg.input_size()], self.backbones[cfg.model, cfg.input_size()][0]

    def all_datasets(self) -> list[tuple[str, str, str, str]]:
        """The datasets of every image size the study's trials can use."""
        return [d for size, splits in self.splits.items()
                for d in datasets(self.cfg.model_copy(update={"image_size": size}), splits)]

    def record(self, cfg: Config) -> tuple[str, list]:
        """What a run of `cfg` is made of, for `RunTracker.record`: its resolved config and its datasets."""
        return config_yaml(cfg), datasets(cfg, self.splits[cfg.input_size()])

    def open_run(self, tracker: StudyTracker, cfg: Config, name: str, tags: dict[str, str]) -> RunTracker:
        """A child run of `cfg` with its params, config.yaml and dataset inputs."""
        return tracker.start_run(name, tags, self.run_params(cfg), self.record(cfg))

    def run_params(self, cfg: Config) -> dict[str, Any]:
        """The params of a run of `cfg`: its hyperparameters, then the fixed context every run of the study shares."""
        splits = self.splits[cfg.input_size()]
        backbone, sha = self.backbones[cfg.model, cfg.input_size()]
        return {**cfg.model_dump(include=set(Hyperparameters.model_fields)), "image_size": cfg.input_size(),
                "data": cfg.data.root or cfg.data.kind, "classes": cfg.classes,
                "class_names": "|".join(splits.class_names), "budget_per_class": cfg.budget_per_class,
                "val_per_class": cfg.val_per_class, "train_images": len(splits.train), "val_images": len(splits.val),
                "test_images": len(splits.test), "seed": cfg.seed, "data_seed": cfg.data_seed,
                "data_fingerprint": splits.fingerprint, "pretrained": backbone or "none",
                "pretrained_sha256": (sha or "none")[:16], "objective": cfg.sweep.objective}


def single_inputs(cfg: Config, splits: Splits, backbone: str | None, sha: str | None = None) -> Inputs:
    """The inputs of one run: its splits and backbone."""
    if backbone and sha is None:
        sha = checkpoints.file_sha256(backbone)
    return Inputs(cfg, {cfg.input_size(): splits}, {(cfg.model, cfg.input_size()): (backbone, sha)})


def resolve_inputs(cfg: Config, log: Callable[[str], None] = print) -> Inputs:
    """The data splits and backbones `cfg` and its search space describe (backbones made first if not cached)."""
    from fine_tune.stores import check_writable
    from fine_tune.train import check_device

    check_device(cfg.device)
    check_writable(cfg.runs_dir)
    if cfg.data.kind == "fashion_mnist":
        prepare_data(cfg.data_dir)
    space = cfg.search.dimensions() if cfg.search else {}
    models = space["model"].values() if "model" in space else [cfg.model]
    sizes = space["image_size"].values() if "image_size" in space else [cfg.image_size]
    if "image_size" in space and not isinstance(space["image_size"], Choices):
        sizes = range(space["image_size"].low, space["image_size"].high + 1)
    splits, backbones = {}, {}
    for model in models:
        for size in sizes:
            variant = cfg.model_copy(update={"model": model, "image_size": size})
            if variant.input_size() not in splits:
                splits[variant.input_size()] = splits_for(variant)
            backbone = backbone_for(variant, log)
            backbones[model, variant.input_size()] = (backbone, checkpoints.file_sha256(backbone) if backbone else None)
    return Inputs(cfg, splits, backbones)
