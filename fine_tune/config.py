"""The one validated config type: defaults live here, an experiment YAML holds only what differs.

Every field's description doubles as `python -m fine_tune train --help-config` text. Errors become a
`ConfigError` with one line naming the key and the problem; the CLI turns that into exit code 2.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Fashion-MNIST is fixed: 6,000 training and 1,000 test images per class.
NUM_CLASSES = 10
TRAIN_PER_CLASS = 6000
TEST_PER_CLASS = 1000
BACKBONE_DEPTH = {"simplenet": 2, "cnn": 4}


class ConfigError(ValueError):
    """A bad experiment file or override; its message is the one line the user sees."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PretrainConfig(Strict):
    """The source task the backbone is pretrained on before fine-tuning."""

    classes: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], description="Fashion-MNIST class ids of the source task")
    epochs: int = Field(5, gt=0, description="pretraining epochs")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate for pretraining")
    batch_size: int = Field(128, gt=0, description="pretraining batch size")


class FloatRange(Strict):
    low: float = Field(description="smallest value tried")
    high: float = Field(description="largest value tried")
    log: bool = Field(False, description="sample on a log scale")

    @model_validator(mode="after")
    def _ordered(self) -> "FloatRange":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}); swap them")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class IntRange(Strict):
    low: int = Field(description="smallest value tried")
    high: int = Field(description="largest value tried")

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}); swap them")
        return self


class SearchSpace(Strict):
    """What Optuna varies; anything left out stays at the config's value."""

    lr: FloatRange | None = Field(None, description="learning rate range")
    frozen_layers: IntRange | None = Field(None, description="how many backbone layers to freeze")
    head_size: list[int] | None = Field(None, description="hidden units of the new head (0 = linear head)")
    weight_decay: FloatRange | None = Field(None, description="Adam weight decay range")
    batch_size: list[int] | None = Field(None, description="batch sizes to try")
    epochs: IntRange | None = Field(None, description="epoch budget range")

    @field_validator("head_size", "batch_size")
    @classmethod
    def _nonempty(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("the list of choices is empty; give at least one value")
        if v is not None and min(v) < 0:
            raise ValueError("choices must be >= 0")
        return v


class SweepConfig(Strict):
    """How the Optuna study runs."""

    n_trials: int | None = Field(20, gt=0, description="trials to run in this invocation")
    timeout: float | None = Field(None, gt=0, description="stop starting trials after this many seconds")
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="Optuna sampler (seeded by `seed`)")
    pruner: Literal["median", "halving", "hyperband", "none"] = Field("median", description="Optuna pruner")
    prune_startup_trials: int = Field(3, ge=0, description="median pruner: complete trials before pruning starts")
    prune_warmup_epochs: int = Field(2, ge=0, description="median pruner: epochs a trial runs before it can be pruned")
    objective: Literal["val/f1_macro", "val/accuracy"] = Field("val/f1_macro", description="metric to maximise")
    storage: str | None = Field(None, description="Optuna storage URL (default sqlite:///runs/optuna.db)")
    workers: int = Field(1, ge=1, description="worker processes sharing the study on this machine")
    heartbeat_interval: int = Field(10, gt=0, description="seconds between a running trial's heartbeats")
    grace_period: int = Field(30, gt=0, description="seconds without a heartbeat before a trial is failed and retried")
    state_every_s: float = Field(5.0, ge=0, description="save a running trial's resumable state at most this often, "
                                 "in seconds (0 = every epoch); Ctrl-C / SIGTERM save it too")


class Config(Strict):
    """One fine-tuning run, or the fixed part of every trial in a sweep."""

    study: str = Field("fine-tune", min_length=1, description="name of the study / MLflow experiment")
    model: Literal["simplenet", "cnn"] = Field("simplenet", description="architecture: simplenet or cnn")
    classes: list[int] = Field(default_factory=lambda: list(range(NUM_CLASSES)), description="Fashion-MNIST class ids of the target task")
    budget_per_class: int | None = Field(None, gt=0, description="labeled training images per class (null = all)")
    val_per_class: int = Field(600, gt=0, description="validation images per class, carved from training images")
    test_per_class: int | None = Field(None, gt=0, description="cap on test images per class (null = all 1000)")
    data_seed: int = Field(0, description="seed for the budget and validation draw (fixed across trials)")
    seed: int = Field(0, description="seed for initialisation and batch order")
    pretrain: PretrainConfig | None = Field(None, description="source task to pretrain the backbone on (null = none)")
    pretrained: str | None = Field(None, description="path of your own backbone checkpoint (overrides pretrain)")
    frozen_layers: int = Field(0, ge=0, description="freeze the first k backbone layers")
    head_size: int = Field(0, ge=0, description="hidden units of the new head (0 = linear head)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay")
    batch_size: int = Field(64, gt=0, description="training batch size")
    epochs: int = Field(10, gt=0, description="maximum training epochs")
    patience: int | None = Field(None, gt=0, description="stop after this many epochs without val/f1_macro gain")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="device (auto: cuda > mps > cpu)")
    amp: bool = Field(False, description="bf16 autocast on CUDA (ignored elsewhere)")
    cache_features: bool = Field(True, description="compute frozen layers' outputs once and train only the rest")
    data_dir: str | None = Field(None, description="where Fashion-MNIST is kept (default: $FINE_TUNE_DATA or data/)")
    runs_dir: str = Field("runs", description="where stores, checkpoints and caches are written")
    search: SearchSpace | None = Field(None, description="Optuna search space (sweeps only)")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Optuna study settings (sweeps only)")

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int]) -> list[int]:
        return _check_classes(v)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        depth = BACKBONE_DEPTH[self.model]
        if self.frozen_layers > depth:
            raise ValueError(f"frozen_layers={self.frozen_layers} but {self.model} has {depth} backbone layers")
        if self.search and self.search.frozen_layers and self.search.frozen_layers.high > depth:
            raise ValueError(
                f"search.frozen_layers.high={self.search.frozen_layers.high} but {self.model} has {depth} backbone layers"
            )
        used = self.val_per_class + (self.budget_per_class or 0)
        if used > TRAIN_PER_CLASS or (self.budget_per_class is None and self.val_per_class >= TRAIN_PER_CLASS):
            raise ValueError(
                f"budget_per_class + val_per_class = {used} exceeds the {TRAIN_PER_CLASS} training images per class"
            )
        if self.test_per_class and self.test_per_class > TEST_PER_CLASS:
            raise ValueError(f"test_per_class={self.test_per_class} exceeds the {TEST_PER_CLASS} test images per class")
        if self.pretrain is not None:
            _check_classes(self.pretrain.classes)
        return self

    def pretrain_key(self) -> str:
        """Hash of everything that shapes the pretrained backbone: the cache key of `make pretrain`."""
        fields = {"model": self.model, "data_seed": self.data_seed, "seed": self.seed,
                  "val_per_class": self.val_per_class, "pretrain": self.pretrain.model_dump() if self.pretrain else None}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def run_dir(self) -> Path:
        return Path(self.runs_dir)


def _check_classes(v: list[int]) -> list[int]:
    if not v:
        raise ValueError("the class list is empty; give at least two class ids from 0-9")
    bad = [c for c in v if not 0 <= c < NUM_CLASSES]
    if bad:
        raise ValueError(f"class ids {bad} are out of range; Fashion-MNIST ids are 0-9")
    if len(set(v)) != len(v):
        raise ValueError("class ids repeat; list each once")
    if len(v) < 2:
        raise ValueError("a classification task needs at least two classes")
    return v


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read an experiment YAML (or just the defaults), apply `key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    where = str(path) if path else "defaults"
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read the experiment file ({e.strerror}); check the path") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: YAML syntax error{at}: {problem}; fix the file's syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of key: value at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lr=0.01")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[leaf] = parsed
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_one_line(e)}") from None


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key; check its spelling (python -m fine_tune keys lists the valid ones)"
    elif err["type"] == "literal_error":
        msg = f"{msg} (got {err['input']!r})"
    elif "input" in err and err["type"] not in ("value_error", "missing"):
        msg = f"{msg} (got {err['input']!r})"
    return f"{key}: {msg}"


def describe_keys() -> str:
    """Every config key with its default and description, for `python -m fine_tune keys`."""
    lines = []
    for model, prefix in ((Config, ""), (PretrainConfig, "pretrain."), (SweepConfig, "sweep."), (SearchSpace, "search.")):
        for name, f in model.model_fields.items():
            if name in ("pretrain", "search", "sweep"):
                continue
            default = f.default if not callable(f.default_factory) else f.default_factory()
            lines.append(f"  {prefix + name:26s} {f.description}  [default: {default!r}]")
    return "\n".join(lines)
