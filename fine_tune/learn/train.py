"""The fine-tuning loop: build the model, load the pretrained backbone, train with Adam, keep the best epoch.

`train(cfg, splits)` reads top to bottom. It knows nothing of Optuna or MLflow: a sweep passes `on_epoch` (to report
and prune) and a tracker (to log); the defaults do nothing.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fine_tune.archs import SMALL
from fine_tune.config import Config
from fine_tune.errors import CheckpointError
from fine_tune.learn import checkpoints, lora, threads
from fine_tune.learn.data import Split, Splits
from fine_tune.learn.device import pick_device
from fine_tune.learn.features import frozen_features
from fine_tune.learn.memory import PeakMemory
from fine_tune.learn.metrics import accuracy, confusion, macro_f1, per_class_report
from fine_tune.learn.models import Net, build_model, count_params, inference_batch


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class NullTracker:
    """Accepts everything, records nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


@dataclass
class Result:
    status: str  # "finished" or "diverged"
    metrics: dict[str, float]  # the best epoch's val metrics, then test metrics
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch run
    per_class_f1: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)  # sklearn's per-class precision / recall / F1 / support
    confusion: list[list[int]] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    test_true: list[int] = field(default_factory=list)  # per test image, remapped labels
    test_pred: list[int] = field(default_factory=list)  # per test image, for paired tests between runs
    best_epoch: int = 0
    message: str = ""
    model: Net | None = None  # holds the best epoch's weights


def warm_up() -> None:
    """Import now what a process's first run would import inside its timing: building the first Adam optimizer
    imports torch._dynamo (~1-2 s). A worker that reads its data itself gets it with torchvision; one handed its
    splits does not, and paid it inside its first trial (make bench (f) 1.41 -> 1.12x)."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


@torch.no_grad()
def evaluate(model: Net, split: Split, device: torch.device, start: int = 0) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and predicted labels over a split, in large batches (`start`: see `Net.forward`)."""
    model.eval()
    total, preds, batch = 0.0, [], inference_batch(model)
    for i in range(0, len(split), batch):
        x, y = split.x[i:i + batch].to(device), split.y[i:i + batch].to(device)
        logits = model(x, start).float()
        total += F.cross_entropy(logits, y, reduction="sum").item()
        preds.append(logits.argmax(1).cpu())
    return total / len(split), torch.cat(preds).numpy()


def scores(prefix: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 without sklearn's input checks (~2 ms per call: a fifth of a 30-epoch transfer trial,
    spent once per epoch); sklearn's numbers, checked in tests/test_train.py."""
    return {f"{prefix}/accuracy": accuracy(y_true, y_pred), f"{prefix}/f1_macro": macro_f1(y_true, y_pred)}


def prepare_model(cfg: Config, num_classes: int, backbone: str | None = None) -> Net:
    """The model a config describes, its backbone loaded from `backbone` when given, its first layers frozen, LoRA's
    adapters on the rest when `lora_rank` is set (the same model, with the same tensor names, that a run's checkpoint
    holds: the registry rebuilds it with this)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes, cfg.head_size, image_size=cfg.input_size(), pooling=cfg.pooling,
                        initialised=backbone is None)
    if backbone:
        checkpoints.load_backbone(model, backbone)
    model.freeze(cfg.frozen_layers)
    return lora.adapt(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_rank else model


def optimizer_for(cfg: Config, model: Net, device: torch.device, head_only: bool = False) -> torch.optim.Optimizer:
    """Adam over what trains: the head at `lr` (`lp_lr` in LP-FT's head-only phase), backbone stage i of n at
    lr x lr_decay^(n - i): layer-wise decay, since the stages nearest the input hold the most general features.
    Fused: it updates all parameters in one kernel, a quarter of the step time on small models (make bench)."""
    n = len(model.backbone)
    groups = [] if head_only else [
        {"params": params, "lr": cfg.lr * cfg.lr_decay ** (n - i)} for i, stage in enumerate(model.backbone)
        if (params := [p for p in stage.parameters() if p.requires_grad])]
    groups.append({"params": [p for p in model.head.parameters() if p.requires_grad],
                   "lr": (cfg.lp_lr or cfg.lr) if head_only else cfg.lr})
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda"))


PREPARED_MAX_BYTES = 2**30


@torch.no_grad()
def prepared(model: Net, splits: Splits, device: torch.device) -> Splits:
    """The splits scaled and normalised once (`model.prep`) instead of in every batch of every epoch: a fifth of a
    SimpleNet epoch went to it (make bench (b): 0.48 -> 0.62 s). Kept as uint8 when the floats would not fit in
    memory comfortably (a large image set at 224 px)."""
    size = sum(getattr(splits, n).x.numel() for n in ("train", "val", "test")) * 4 * model.prep.channels
    if size > PREPARED_MAX_BYTES:
        return splits
    model.prep.to(device)
    return replace(splits, **{n: Split(model.prep(getattr(splits, n).x.to(device)).cpu(), getattr(splits, n).y,
                                       getattr(splits, n).index) for n in ("train", "val", "test")})


def trainable_state(model: Net) -> dict:
    """The model's state dict with every tensor training can change copied (trained weights, normalisation
    statistics), and the fixed weights shared: the frozen stages' and, under LoRA, the adapted layers' own; they
    cannot change during the run (a frozen text encoder's 22M weights were copied at every best epoch)."""
    fixed = fixed_names(model)
    copy = type(state := model.state_dict())((k, v if k in fixed else v.detach().clone()) for k, v in state.items())
    copy._metadata = getattr(state, "_metadata", None)
    return copy


def fixed_names(model: Net) -> set[str]:
    """The state-dict names of the weights training cannot change: those without gradients."""
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def changing(model: Net, state: dict) -> dict:
    """The entries of a state dict of `model` that training can change: what a resumable state must save (the fixed
    weights come back from the backbone when the run is set up again: a text encoder's 90 MB, written every few
    seconds twice over, was most of what a trial wrote)."""
    fixed = fixed_names(model)
    return type(state)((k, v) for k, v in state.items() if k not in fixed)


def completed(model: Net, state: dict) -> dict:
    """A state dict saved by `changing`, completed with the model's fixed weights (as set up: they never change)."""
    whole = model.state_dict()
    missing = set(whole) - set(state) - fixed_names(model)
    if missing:
        raise CheckpointError(f"the saved state of this run lacks {sorted(missing)[:3]}; delete it to start the run "
                              "over")
    return {**whole, **state}


def cloned(state):
    """A copy of a (nested) state dict that later training steps cannot change: its tensors cloned, its dicts and
    lists new. The same as copy.deepcopy for state dicts at a fifth of the cost (0.14 vs 0.69 ms per epoch for a
    SimpleNet and its Adam state), which a sweep of short trials pays every epoch."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):  # an OrderedDict stays one, with the module versions load_state_dict reads
        copy = type(state)((k, cloned(v)) for k, v in state.items())
        if hasattr(state, "_metadata"):
            copy._metadata = state._metadata
        return copy
    if isinstance(state, (list, tuple)):
        return type(state)(cloned(v) for v in state)
    return state


@dataclass
class Progress:
    """Where a run stands after its last finished epoch: what early stopping, the test and a resumed run read."""

    history: list[dict[str, float]] = field(default_factory=list)  # one dict of metrics per epoch run
    best_f1: float = -math.inf
    best_epoch: int = 0
    best_state: dict | None = None  # the best epoch's weights
    stale: int = 0  # epochs since the best

    def update(self, metrics: dict[str, float], model: Net) -> None:
        self.history.append(metrics)
        if metrics["val/f1_macro"] > self.best_f1:
            self.best_f1, self.best_epoch, self.stale = metrics["val/f1_macro"], len(self.history), 0
            self.best_state = trainable_state(model)
        else:
            self.stale += 1


def reached(history: list[dict[str, float]]) -> dict[str, float]:
    """What a run reached in the epochs of `history`, a finished run's and a pruned one's alike: the best epoch's val
    metrics (the highest val/f1_macro, the earliest on a tie, as `Progress` keeps it), its number and the epochs run."""
    best = max(range(len(history)), key=lambda i: (history[i]["val/f1_macro"], -i))
    return {**{k: history[best][k] for k in ("val/loss", "val/accuracy", "val/f1_macro")}, "best_epoch": best + 1,
            "epochs_run": len(history)}


class Resumable:
    """A run's full state after its last finished epoch (weights, Adam, the batch-order generator, progress) at
    `path`: copied in memory after every epoch, written every `every_s` seconds (one write per epoch took a fifth of a
    sweep of short trials) and when the run is interrupted; a run that finds one continues after that epoch."""

    def __init__(self, path: str | Path | None, every_s: float):
        self.path, self.every_s = path, every_s
        self.latest: dict | None = None
        self.saved_at = time.monotonic()

    def restore(self, model: Net, gen: torch.Generator) -> tuple[Progress, dict | None]:
        """The progress saved at `path` (weights and batch order restored into `model` and `gen`) and the optimizer's
        state, which the caller loads into the optimizer of the phase the run resumes in."""
        if self.path is None or not Path(self.path).is_file():
            return Progress(), None
        st = checkpoints.load_any(self.path)
        model.load_state_dict(completed(model, st["model"]))
        gen.set_state(st["generator"])
        progress = Progress(**{f.name: st[f.name] for f in fields(Progress)})
        if progress.best_state is not None:
            progress.best_state = completed(model, progress.best_state)
        return progress, st["optimizer"]

    def keep(self, model: Net, optimizer: torch.optim.Optimizer, gen: torch.Generator, progress: Progress) -> None:
        if self.path is None:
            return
        self.latest = {"model": changing(model, trainable_state(model)), "optimizer": cloned(optimizer.state_dict()),
                       "generator": gen.get_state(), **{f.name: getattr(progress, f.name) for f in fields(Progress)},
                       "history": list(progress.history),
                       "best_state": changing(model, progress.best_state) if progress.best_state else None}
        if time.monotonic() - self.saved_at >= self.every_s:
            checkpoints.save(self.latest, self.path)
            self.saved_at = time.monotonic()

    def save_now(self) -> None:
        """On Ctrl-C / SIGTERM; the interrupt must go on even if this fails (a retry then replays older state)."""
        if self.latest is not None:
            with contextlib.suppress(Exception):
                checkpoints.save(self.latest, self.path)


def setup(cfg: Config, splits: Splits, backbone: str | None,
          device: torch.device) -> tuple[Net, Splits, int, Splits | None]:
    """The model on `device` and the splits it trains on: the frozen layers' outputs when they are cached (computed
    once: they cannot change during the run), else the images scaled once. Returns the model, the splits, the stage
    the forward pass starts at, and for LP-FT the whole backbone's outputs, which its head-only phase trains on."""
    model = prepare_model(cfg, len(splits.class_names), backbone).to(device)
    if device.type == "cuda" and cfg.model not in SMALL:
        model = model.to(memory_format=torch.channels_last)  # convolutions' fast layout on GPUs
    weights = checkpoints.file_sha256(backbone) if backbone else None  # the frozen layers' weights, named
    # the backbone's outputs before any training: the same features (and cache entry) a probe trial uses; LoRA's
    # adapters start at zero, so they change nothing yet
    probe = (frozen_features(model, len(model.backbone), splits, device, cfg.run_dir() / "feature_cache", weights)
             if cfg.lp_epochs else None)
    if cfg.cache_features and cfg.frozen_layers > 0:
        return model, frozen_features(model, cfg.frozen_layers, splits, device, cfg.run_dir() / "feature_cache",
                                      weights), cfg.frozen_layers, probe
    return model, prepared(model, splits, device), 0, probe


def train_epoch(cfg: Config, model: Net, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                start: int, gen: torch.Generator) -> float:
    """One pass over the labeled budget in shuffled in-memory batches; the mean training loss."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and x.device.type == "cuda"
                else contextlib.nullcontext())
    model.train()
    n = len(y)
    order = torch.randperm(n, generator=gen).to(x.device)
    loss_sum = 0.0
    for i in range(0, n, cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        if len(idx) == 1 < n:
            continue  # BatchNorm cannot train on a batch of one image; it is in the next epoch's batches
        with autocast:
            loss = F.cross_entropy(model(x[idx], start).float(), y[idx], label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(idx)
    return loss_sum / n


def train(cfg: Config, splits: Splits, backbone: str | None = None, tracker: Tracker | None = None,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None, state_path: str | Path | None = None,
          state_every_s: float = 5.0) -> Result:
    """Fine-tune per `cfg` on `splits`; return the best epoch's val metrics and its test metrics.

    `on_epoch(epoch, metrics)` runs after each epoch's validation; it may raise (Optuna's TrialPruned) to stop.
    With `state_path` the run is resumable (see `Resumable`).
    """
    tracker = tracker or NullTracker()
    n_threads = threads.apply(cfg)
    device = pick_device(cfg.device)
    if cfg.lora_rank:
        lora.warm_up()
    memory = PeakMemory(device)
    model, splits, start, probe = setup(cfg, splits, backbone, device)
    tracker.log_params({"trainable_params": count_params(model), "method": cfg.method()})
    # A dedicated generator makes the batch order depend on the seed alone, not on what ran before.
    gen = torch.Generator().manual_seed(cfg.seed)
    state = Resumable(state_path, state_every_s)
    progress, optimizer_state = state.restore(model, gen)
    probing = len(progress.history) < cfg.lp_epochs  # LP-FT's first phase: the head alone, on the backbone's output
    optimizer = optimizer_for(cfg, model, device, head_only=probing)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    data, at = (probe, len(model.backbone)) if probing else (splits, start)
    train_x, train_y = data.train.x.to(device), data.train.y.to(device)
    try:
        for epoch in range(len(progress.history) + 1, cfg.epochs + 1):
            if probing and epoch > cfg.lp_epochs:  # LP-FT: the head is probed; fine-tune from it, patience anew
                probing, progress.stale = False, 0
                optimizer, data, at = optimizer_for(cfg, model, device), splits, start
                train_x, train_y = data.train.x.to(device), data.train.y.to(device)
            if cfg.patience is not None and progress.stale >= cfg.patience:
                break  # early stop; checked first, so a run resumed after its last epoch does not train on
            # --- train, then validate: validation is the only thing that drives decisions
            started = time.perf_counter()
            train_loss = train_epoch(cfg, model, optimizer, train_x, train_y, at, gen)
            train_pass = time.perf_counter() - started
            if not math.isfinite(train_loss):
                return Result("diverged", {}, progress.history, class_names=splits.class_names,
                              best_epoch=progress.best_epoch, message=f"loss became {train_loss} in epoch {epoch} "
                                                                      f"(lr={cfg.lr:g}); lower the learning rate")
            val_loss, val_pred = evaluate(model, data.val, device, at)
            metrics = {"train/loss": train_loss, "val/loss": val_loss, **scores("val", data.val.y.numpy(), val_pred),
                       "time/epoch_s": time.perf_counter() - started, "time/train_pass_s": train_pass}
            if cfg.lp_epochs:
                metrics["train/head_only"] = float(probing)  # where LP-FT's phases meet, on the run's one curve
            tracker.log_metrics(metrics, step=epoch)
            progress.update(metrics, model)
            state.keep(model, optimizer, gen, progress)
            if on_epoch is not None:
                on_epoch(epoch, metrics)
        # --- the test set, once, with the best epoch's weights
        model.load_state_dict(progress.best_state)
        _, test_pred = evaluate(model, splits.test, device, start)
    except KeyboardInterrupt:
        state.save_now()
        raise
    return finished(model, splits, progress, test_pred, n_threads, memory.mb())


def finished(model: Net, splits: Splits, progress: Progress, test_pred: np.ndarray, n_threads: int,
             peak_mb: float | None = None) -> Result:
    """A finished run's result: the best epoch's val metrics, the test metrics, per-class scores and the model."""
    y_test = splits.test.y.numpy()
    report = per_class_report(y_test, test_pred, splits.class_names)
    metrics = reached(progress.history) | scores("test", y_test, test_pred)
    metrics |= {"trainable_params": count_params(model), "threads": n_threads,
                "time/train_s": sum(h["time/epoch_s"] for h in progress.history)}
    if peak_mb is not None:
        metrics["memory/peak_mb"] = peak_mb
    return Result("finished", metrics, progress.history,
                  per_class_f1={name: report[name]["f1-score"] for name in splits.class_names}, report=report,
                  confusion=confusion(y_test, test_pred, len(splits.class_names)).tolist(),
                  class_names=splits.class_names, test_true=y_test.tolist(), test_pred=test_pred.tolist(),
                  best_epoch=progress.best_epoch, model=model.cpu())
