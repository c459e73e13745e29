"""The sections of an experiment's config beside its hyperparameters: which data, the source task a backbone is
pretrained on, how the Optuna study runs and the label-efficiency curve. `config.Config` holds one of each."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictInt, StrictStr, field_validator, model_validator

from fine_tune.names import METHODS
from fine_tune.space import Strict


class PretrainConfig(Strict):
    """The source task the backbone is pretrained on before fine-tuning."""

    classes: list[StrictInt | StrictStr] = Field(default_factory=lambda: [0, 1, 2, 3, 4],
                                     description="class ids or names of the source task")
    epochs: int = Field(5, gt=0, description="pretraining epochs")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate for pretraining")
    batch_size: int = Field(128, gt=0, description="pretraining batch size")
    seed: int = Field(0, ge=0, lt=2**31, description="seed of the pretraining run: it alone decides the backbone (the "
                                                     "fine-tuning `seed` never retrains it)")
    holdout_per_class: int = Field(0, ge=0, description="training images per class (after validation) kept out of "
                                                        "pretraining: a target of the same classes draws its labels "
                                                        "from them, so it never fine-tunes on a pretraining image")


TEXT_KINDS = ("text", "fortunes")


class DataConfig(Strict):
    """Which examples: Fashion-MNIST or a folder of your own images; labeled text (a CSV / JSONL file or a folder per
    class of .txt files) or Debian's fortunes by topic."""

    kind: Literal["fashion_mnist", "imagefolder", "text", "fortunes"] = Field(
        "fashion_mnist", description="fashion_mnist, imagefolder, text (CSV / JSONL / class folders) or fortunes")
    root: str | None = Field(None, description="imagefolder: the folder holding train/ (and val/, test/) or the class "
                                               "folders; text: a CSV or JSONL file, or a folder of <class>/*.txt; "
                                               "fortunes: the topic files' folder (default /usr/share/games/fortunes)")
    text_column: str = Field("text", min_length=1, description="text: the column (or JSON key) holding the text")
    label_column: str = Field("label", min_length=1, description="text: the column (or JSON key) holding the label")
    max_length: int = Field(128, ge=2, le=8192, description="text: tokens kept per text (longer texts are cut)")
    shift: Literal["none", "rotate90", "invert", "noise"] = Field(
        "none", description="a domain shift applied to the target task's images (never to the pretraining source)")

    @model_validator(mode="after")
    def _root(self) -> "DataConfig":
        if self.kind in ("imagefolder", "text") and not self.root:
            raise ValueError(f"kind {self.kind} needs root: " + ("the folder of <class>/<image> folders"
                             if self.kind == "imagefolder" else "a CSV or JSONL file, or a folder of <class>/*.txt"))
        if self.kind in TEXT_KINDS and self.shift != "none":
            raise ValueError("shift applies to images only; remove it for text")
        return self

    def is_text(self) -> bool:
        return self.kind in TEXT_KINDS


class SweepConfig(Strict):
    """How the Optuna study runs."""

    n_trials: int | None = Field(20, gt=0, description="trials to run in this invocation")
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False,
                                  description="stop starting trials after this many seconds")
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="Optuna sampler (seeded by `seed`)")
    pruner: Literal["median", "halving", "hyperband", "none"] = Field("median", description="Optuna pruner")
    prune_startup_trials: int = Field(3, ge=0, description="median pruner: complete trials before pruning starts")
    prune_warmup_epochs: int = Field(2, ge=0, description="median pruner: epochs a trial runs before it can be pruned")
    objective: Literal["val/f1_macro", "val/accuracy"] = Field("val/f1_macro", description="metric to maximise")
    storage: str | None = Field(None, description="Optuna storage URL (default sqlite:///runs/optuna.db)")
    workers: int = Field(1, ge=1, description="worker processes sharing the study on this machine")
    heartbeat_interval: int = Field(10, gt=0, description="seconds between a running trial's heartbeats")
    grace_period: int = Field(30, gt=0, description="seconds without a heartbeat before a trial is failed and retried")
    max_wait: float = Field(600, gt=0, allow_inf_nan=False,
                            description="seconds a worker waits, beyond three grace periods, on a store that went "
                            "away (the Optuna database, the tracking server) or on other workers' stalled trials, "
                            "before the sweep stops")
    state_every_s: float = Field(5.0, ge=0, allow_inf_nan=False,
                                 description="save a running trial's resumable state at most this often, "
                                 "in seconds (0 = every epoch); Ctrl-C / SIGTERM save it too")

    @model_validator(mode="after")
    def _heartbeat(self) -> "SweepConfig":
        # a grace period of less than two heartbeats would let one late heartbeat fail a healthy trial
        if self.grace_period < 2 * self.heartbeat_interval:
            raise ValueError(f"grace_period ({self.grace_period} s) must be at least twice heartbeat_interval "
                             f"({self.heartbeat_interval} s), or workers fail each other's healthy trials")
        return self


class CurveConfig(Strict):
    """The label-efficiency curve (`make curve`): each budget, each arm, each seed is one tracked run."""

    budgets: list[int] = Field(default_factory=lambda: [5, 10, 20, 50, 100, 500], min_length=1,
                               description="labeled images per class, one point of the curve each")
    seeds: int = Field(3, ge=1, description="runs per point: seed and data_seed 0..seeds-1 (init, order, label draw)")
    probe_lr: float = Field(1e-2, gt=0, description="learning rate of the linear probe (a head alone learns faster)")
    arms: list[str] = Field(default_factory=lambda: ["fine-tuned", "from scratch", "linear probe"], min_length=1,
                            description="the ways compared at each budget: fine-tuned (the study's best trial), from "
                                        "scratch, linear probe, or a method (full, partly frozen, probe, LoRA, LP-FT, "
                                        "LP-FT + LoRA: the study's best trial of that method)")

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        known = ("fine-tuned", "from scratch", "linear probe", *METHODS)
        unknown = [a for a in v if a not in known]
        if unknown:
            raise ValueError(f"unknown arm {unknown[0]!r}; use {', '.join(known)}")
        if len(set(v)) != len(v):
            raise ValueError("arms repeat; list each once")
        return v

    @field_validator("budgets")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if min(v) < 1 or len(set(v)) != len(v):
            raise ValueError("budgets must be distinct and at least 1")
        return sorted(v)
