"""The one validated config type: defaults live here, an experiment YAML holds only what differs.

Every field's description doubles as the text of `python -m fine_tune keys`. Errors become a
`ConfigError` with one line naming the key and the problem; the CLI turns that into exit code 2.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from fine_tune import archs
from fine_tune.sections import CurveConfig, DataConfig, PretrainConfig, SweepConfig
from fine_tune.space import Choices, Dimension, Strict, dimension_type

# Fashion-MNIST is fixed: 6,000 training and 1,000 test images per class.
NUM_CLASSES = 10
TRAIN_PER_CLASS = 6000
TEST_PER_CLASS = 1000



STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _study_name(name: str) -> str:
    """A study name is a label that becomes folder names, an MLflow experiment and a registered model's name, and
    goes into search filters: the characters all of them accept, and nothing a path could climb out with."""
    if not STUDY_NAME.fullmatch(name):
        raise ValueError(f"{name[:60]!r} is not a usable study name; use 1-100 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def _known_model(name: str) -> str:
    if not archs.known(name):
        raise ValueError(f"{name!r} is not a model here; use {', '.join(archs.SHOWN)}, another torchvision "
                         "classification model, or hf:<hub id or folder> (`python -m fine_tune models` lists them)")
    return name


class Hyperparameters(Strict):
    """What shapes one fine-tuning run and can be searched: every field here may appear under `search:` (a range
    for numbers, a list of choices for anything), and a sweep samples, logs and reports exactly these. Adding a
    field here makes it searchable everywhere."""

    model: Annotated[str, AfterValidator(_known_model)] = Field(
        "simplenet", description=f"architecture: {', '.join(archs.SHOWN)}, another torchvision classification model, "
                                 "or a Hugging Face text encoder as hf:<hub id or folder> (`python -m fine_tune models` "
                                 "lists them)")
    image_size: int | None = Field(None, ge=8, description="input images are resized to this square size "
                                                           "(default: the model's own, 28 for ours, 224 for torchvision's)")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="Adam learning rate")
    frozen_layers: int = Field(0, ge=0, description="freeze the first k backbone stages")
    head_size: int = Field(0, ge=0, le=65536, description="hidden units of the new head (0 = linear head)")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="Adam weight decay")
    batch_size: int = Field(64, gt=0, le=2**20, description="training batch size")
    epochs: int = Field(10, gt=0, le=10**6, description="maximum training epochs")
    patience: int | None = Field(None, gt=0, description="stop after this many epochs without val/f1_macro gain")
    label_smoothing: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False,
                                   description="label smoothing of the training loss (0 = none)")
    pooling: Literal["mean", "first"] = Field("mean", description="text models: one vector per text from the mean of "
                                                               "its token states or its first token's")
    # How to fine-tune beyond "how many stages to freeze". Kept last: a sweep samples in this order, and whether these
    # apply depends on the model and frozen_layers sampled before them (`inapplicable`).
    lora_rank: int = Field(0, ge=0, le=4096, description="LoRA: rank of low-rank adapters on the unfrozen stages' "
                                                         "Linear and convolution layers, whose own weights then stay "
                                                         "fixed (0 = off: the unfrozen stages train whole)")
    lora_alpha: float | None = Field(None, gt=0, allow_inf_nan=False,
                                     description="LoRA scaling numerator: adapters are scaled by lora_alpha / lora_rank "
                                                 "(null = 2 x lora_rank)")
    lp_epochs: int = Field(0, ge=0, description="LP-FT: first train the head alone on the frozen backbone's cached "
                                                "features for this many epochs, then fine-tune from that head "
                                                "(0 = off; counts within `epochs`)")
    lp_lr: float | None = Field(None, gt=0, allow_inf_nan=False,
                                description="learning rate of LP-FT's head-only phase (null = lr)")
    lr_decay: float = Field(1.0, gt=0, le=1, allow_inf_nan=False,
                            description="layer-wise learning-rate decay: backbone stage i of n trains at "
                                        "lr x lr_decay^(n - i), the last stage at lr x lr_decay (1 = off)")


    def method(self) -> str:
        """How a run of these values fine-tunes, the report's groups: probe (every stage frozen), full, partly frozen,
        LoRA, LP-FT or LP-FT + LoRA."""
        if self.frozen_layers >= archs.stage_count(self.model):
            return "probe"
        base = "LoRA" if self.lora_rank else "full" if self.frozen_layers == 0 else "partly frozen"
        return ("LP-FT + LoRA" if self.lora_rank else "LP-FT") if self.lp_epochs else base


# What each way of fine-tuning needs before it means anything: with every stage frozen (a probe) there is nothing to
# adapt, decay or fine-tune after probing; alpha and the probe phase's lr only matter with a rank and a probe phase.
_NEEDS = {"lora_rank": "unfrozen", "lora_alpha": "lora_rank", "lp_epochs": "unfrozen", "lp_lr": "lp_epochs",
          "lr_decay": "unfrozen"}


def resolved(values: dict) -> dict:
    """`values` (every hyperparameter) with each one that does not apply given those before it at its off value:
    what a trial that sampled `values` trains with."""
    out = dict(values)
    for name, field in Hyperparameters.model_fields.items():
        if not applies(name, out):
            out[name] = field.default
    return out


def applies(name: str, values: dict) -> bool:
    """Whether hyperparameter `name` changes anything given the values before it (a sweep samples it only then, and
    gives it its off value otherwise)."""
    need = _NEEDS.get(name)
    if need is None:
        return True
    if need == "unfrozen":
        return values["frozen_layers"] < archs.stage_count(values["model"])
    return bool(values[need]) and applies(need, values)


# One field per hyperparameter, derived: the search space cannot drift from what a run takes.
_SearchSpaceBase = create_model(
    "_SearchSpaceBase", __base__=Strict,
    **{name: (dimension_type(f.annotation), Field(None, description=f"values of `{name}` to try"))
       for name, f in Hyperparameters.model_fields.items()})


class SearchSpace(_SearchSpaceBase):
    """What Optuna varies; anything left out stays at the config's value."""

    def dimensions(self) -> dict[str, Dimension]:
        """The searched hyperparameters in definition order (the order Optuna samples them in)."""
        return {name: dim for name in Hyperparameters.model_fields if (dim := getattr(self, name)) is not None}

    @field_validator("*")
    @classmethod
    def _usable(cls, dim: Dimension | None, info: ValidationInfo) -> Dimension | None:
        """Every value a trial could be given must be one a run accepts (no negative head, no lr <= 0...)."""
        if dim is None:
            return dim
        field = Hyperparameters.model_fields[info.field_name]
        check = TypeAdapter(Annotated[field.annotation, *field.metadata])
        for value in dim.values():
            try:
                check.validate_python(value, strict=isinstance(dim, Choices))
            except ValidationError as e:
                raise ValueError(f"{value!r} is not a value `{info.field_name}` accepts ({e.errors()[0]['msg']})") from None
        return dim


class Config(Hyperparameters):
    """One fine-tuning run, or the fixed part of every trial in a sweep."""

    study: Annotated[str, AfterValidator(_study_name)] = Field(
        "fine-tune", description="name of the study: the Optuna study, the MLflow experiment, the registered model and "
                                 "folders under runs/ (1-100 letters, digits, '.', '_', '-'; starting with a letter or "
                                 "digit)")
    data: DataConfig = Field(default_factory=DataConfig, description="which images (default Fashion-MNIST)")
    classes: list[StrictInt | StrictStr] | None = Field(None, description="class ids or names of the target task "
                                                                         "(null = all)")
    budget_per_class: int | None = Field(None, gt=0, description="labeled training images per class (null = all)")
    val_per_class: int = Field(600, gt=0, description="validation images per class, carved from training images")
    test_per_class: int | None = Field(None, gt=0, description="cap on test images per class (null = all 1000)")
    data_seed: int = Field(0, ge=0, lt=2**31, description="seed for the budget and validation draw (fixed across "
                                                          "trials)")
    seed: int = Field(0, ge=0, lt=2**31, description="seed of the fine-tuning: initialisation of the head and batch "
                                                     "order (and of the sampler)")
    pretrain: PretrainConfig | None = Field(None, description="source task to pretrain the backbone on (null = none)")
    pretrained: str | None = Field(None, description="path of your own backbone checkpoint (overrides pretrain "
                                                     "and weights)")
    weights: str | None = Field(None, description="torchvision weights of a torchvision model, e.g. IMAGENET1K_V1 or "
                                                  "DEFAULT (cached under $TORCH_HOME/hub/checkpoints)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="device (auto: cuda > mps > cpu)")
    amp: bool = Field(False, description="bf16 autocast on CUDA (ignored elsewhere)")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads per training process (null = auto: 1 "
                                                                 "for our small models, the process's share of the "
                                                                 "cores for torchvision's; FINE_TUNE_THREADS too)")
    lora_targets: list[StrictStr] | None = Field(None, min_length=1, description="LoRA: adapt only the layers whose "
                                                 "name ends with one of these, e.g. [query, value] for a BERT-family "
                                                 "encoder (null = every Linear and convolution of the unfrozen stages)")
    cache_features: bool = Field(True, description="compute frozen layers' outputs once and train only the rest")
    data_dir: str | None = Field(None, description="where Fashion-MNIST is kept (default: $FINE_TUNE_DATA or data/)")
    runs_dir: str = Field("runs", description="where stores, checkpoints and caches are written")
    search: SearchSpace | None = Field(None, description="Optuna search space (sweeps only)")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Optuna study settings (sweeps only)")
    curve: CurveConfig = Field(default_factory=CurveConfig, description="label-efficiency curve settings (make curve)")

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int | str] | None) -> list[int | str] | None:
        return v if v is None else _check_classes(v)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        for model in self.trial_models():  # each must take the frozen stages and image sizes a trial may get
            depth = archs.stage_count(model)
            if self.frozen_layers > depth:
                raise ValueError(f"frozen_layers={self.frozen_layers} but {model} has {depth} backbone layers")
            if self.search and self.search.frozen_layers and max(self.search.frozen_layers.values()) > depth:
                raise ValueError(f"search.frozen_layers.high={max(self.search.frozen_layers.values())} but "
                                 f"{model} has {depth} backbone layers")
            for size in self.trial_sizes():
                problem = archs.size_problem(model, size)
                if problem:
                    raise ValueError(f"image_size {size}: {problem}")
            if self.weights and (model in archs.SMALL or archs.is_text(model)):
                raise ValueError(f"weights: {model} has no torchvision weights; use " +
                                 ("its own (model: hf:<hub id or folder>)" if archs.is_text(model) else
                                  "pretrain: or pretrained:") + " instead")
            if archs.is_text(model) != self.data.is_text():
                raise ValueError(f"model {model} takes {'text' if archs.is_text(model) else 'images'} but data.kind is "
                                 f"{self.data.kind}; pair hf: models with text data, image models with images")
            if archs.is_text(model) and self.pretrain is not None:
                raise ValueError(f"pretrain: {model} comes pretrained (its hub id or folder holds the weights); remove "
                                 "the pretrain: section")
        if self.lora_rank and not applies("lora_rank", self.model_dump()):
            raise ValueError(f"lora_rank={self.lora_rank}: LoRA adapts the unfrozen stages, but frozen_layers="
                             f"{self.frozen_layers} freezes every stage of {self.model}; lower frozen_layers or set "
                             "lora_rank: 0")
        lp, epochs = max(self.trial_values("lp_epochs")), min(self.trial_values("epochs"))
        if lp and lp >= epochs:
            raise ValueError(f"lp_epochs={lp} leaves no epoch to fine-tune in (epochs={epochs}, the probe phase "
                             "included); keep lp_epochs below epochs")
        if self.weights and self.pretrain is not None and not self.pretrained:
            raise ValueError("weights and pretrain both choose the backbone's starting weights; keep one")
        if self.data.kind == "fashion_mnist":  # its sizes are known before any image is read
            for classes in (self.classes, self.pretrain.classes if self.pretrain else None):
                bad = [c for c in classes or [] if isinstance(c, int) and not 0 <= c < NUM_CLASSES]
                if bad:
                    raise ValueError(f"class ids {bad} are out of range; Fashion-MNIST ids are 0-9")
            used = self.val_per_class + (self.budget_per_class or 0)
            if used > TRAIN_PER_CLASS or (self.budget_per_class is None and self.val_per_class >= TRAIN_PER_CLASS):
                raise ValueError(f"budget_per_class + val_per_class = {used} exceeds the {TRAIN_PER_CLASS} training "
                                 "images per class")
            if self.test_per_class and self.test_per_class > TEST_PER_CLASS:
                raise ValueError(f"test_per_class={self.test_per_class} exceeds the {TEST_PER_CLASS} test images per "
                                 "class")
        if self.pretrain is not None:
            _check_classes(self.pretrain.classes)
            shared = set(self.pretrain.classes) & set(self.classes if self.classes is not None else range(NUM_CLASSES))
            if shared and self.budget_per_class and self.budget_per_class > self.pretrain.holdout_per_class:
                raise ValueError(f"the target shares classes {sorted(shared, key=str)} with pretraining, so its "
                                 f"{self.budget_per_class} labeled images per class must come from the "
                                 f"{self.pretrain.holdout_per_class} held out of pretraining; raise "
                                 "pretrain.holdout_per_class")
        return self

    def trial_values(self, name: str) -> list:
        """Every value of hyperparameter `name` a run may get: the searched ones' bounds or choices, else its own."""
        dim = getattr(self.search, name) if self.search else None
        return dim.values() if dim is not None else [getattr(self, name)]

    def trial_models(self) -> list[str]:
        """Every model a run of this config may get: the searched choices, else its own."""
        return list(self.search.model.values()) if self.search and self.search.model else [self.model]

    def trial_sizes(self) -> list[int | None]:
        """Every image size a run may get: each searched choice or every integer of a searched range, else its own
        (None: the model's native size)."""
        dim = self.search.image_size if self.search else None
        if dim is None:
            return [self.image_size]
        return dim.grid() if isinstance(dim, Choices) else list(range(dim.low, dim.high + 1))

    def trial_variants(self) -> list["Config"]:
        """One config per (model, image size) a trial may get: what a sweep resolves data and backbones for."""
        return [self.model_copy(update={"model": m, "image_size": s})
                for m in self.trial_models() for s in self.trial_sizes()]

    def input_size(self) -> int | None:
        """The square size images are resized to for this run's model (None for text)."""
        return self.image_size or archs.native_size(self.model)

    def pretrain_key(self) -> str:
        """Hash of everything that shapes the pretrained backbone: the cache key of `make pretrain`."""
        fields = {"model": self.model, "data_seed": self.data_seed, "val_per_class": self.val_per_class,
                  "pretrain": self.pretrain.model_dump() if self.pretrain else None}
        if self.input_size() != archs.native_size(self.model) or self.data.kind != "fashion_mnist" or self.weights:
            fields |= {"image_size": self.input_size(), "data": self.data.model_dump(exclude={"shift"}),
                       "weights": self.weights}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def run_dir(self) -> Path:
        return Path(self.runs_dir)


def _check_classes(v: list[int | str]) -> list[int | str]:
    if not v:
        raise ValueError("the class list is empty; give at least two class ids or names")
    if len(set(v)) != len(v):
        raise ValueError("class ids repeat; list each once")
    if len(v) < 2:
        raise ValueError("a classification task needs at least two classes")
    return v
