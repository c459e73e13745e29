"""The fine-tuning loop: build the model, load the pretrained backbone, train with Adam, keep the best epoch.

`train(cfg)` reads top to bottom. It knows nothing of Optuna or MLflow: a sweep passes `on_epoch` (to report
and prune) and a tracker (to log); the defaults do nothing.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fine_tune.archs import SMALL
from fine_tune.config import Config
from fine_tune.learn import checkpoints, threads
from fine_tune.learn.data import Split, Splits, splits_for
from fine_tune.learn.device import pick_device
from fine_tune.learn.features import frozen_features
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
    """The model a config describes, its backbone loaded from `backbone` when given, its first layers frozen."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes, cfg.head_size, image_size=cfg.input_size())
    if backbone:
        checkpoints.load_backbone(model, backbone)
    return model.freeze(cfg.frozen_layers)


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


def train(cfg: Config, splits: Splits | None = None, backbone: str | None = None,
          tracker: Tracker | None = None, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
          state_path: str | Path | None = None, state_every_s: float = 5.0) -> Result:
    """Fine-tune per `cfg`; return the best epoch's val metrics and its test metrics.

    `on_epoch(epoch, metrics)` runs after each epoch's validation; it may raise (Optuna's TrialPruned) to stop.
    With `state_path`, the full training state after the last finished epoch is saved there atomically every
    `state_every_s` seconds (0: every epoch) and when the run is interrupted (KeyboardInterrupt), and a run that finds one
    there continues after that epoch instead of starting over.
    """
    tracker = tracker or NullTracker()
    n_threads = threads.apply(cfg)
    splits = splits or splits_for(cfg)
    device = pick_device(cfg.device)
    model = prepare_model(cfg, len(splits.class_names), backbone).to(device)
    if device.type == "cuda" and cfg.model not in SMALL:
        model = model.to(memory_format=torch.channels_last)  # convolutions' fast layout on GPUs
    tracker.log_params({"trainable_params": count_params(model)})
    start = 0  # where the forward pass begins: after the frozen layers when their outputs are cached
    if cfg.cache_features and cfg.frozen_layers > 0:
        splits = frozen_features(model, cfg.frozen_layers, splits, device, cfg.run_dir() / "feature_cache")
        start = cfg.frozen_layers
    else:
        splits = prepared(model, splits, device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and device.type == "cuda"
                else contextlib.nullcontext())
    params = [p for p in model.parameters() if p.requires_grad]
    # fused Adam updates all parameters in one kernel: a quarter of the step time on small models (make bench)
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    # A dedicated generator makes the batch order depend on the seed alone, not on what ran before.
    gen = torch.Generator().manual_seed(cfg.seed)
    train_x, train_y = splits.train.x.to(device), splits.train.y.to(device)
    n = len(train_y)

    best_f1, best_epoch, best_state, stale = -math.inf, 0, None, 0
    history: list[dict[str, float]] = []
    if state_path is not None and Path(state_path).is_file():
        st = checkpoints.load_any(state_path)
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        history, best_state = st["history"], st["best_state"]
        best_f1, best_epoch, stale = st["best_f1"], st["best_epoch"], st["stale"]
    snapshot, saved_at = None, time.monotonic()
    try:
        for epoch in range(len(history) + 1, cfg.epochs + 1):
            if cfg.patience is not None and stale >= cfg.patience:
                break  # early stop; checked first, so a run resumed after its last epoch does not train on
            # --- one pass over the labeled budget, in-memory batches
            start_time = time.perf_counter()
            model.train()
            order = torch.randperm(n, generator=gen).to(device)
            loss_sum = 0.0
            for i in range(0, n, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                if len(idx) == 1 < n:
                    continue  # BatchNorm cannot train on a batch of one image; it is in the next epoch's batches
                with autocast:
                    loss = F.cross_entropy(model(train_x[idx], start).float(), train_y[idx],
                                           label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(idx)
            train_loss = loss_sum / n
            train_pass = time.perf_counter() - start_time
            if not math.isfinite(train_loss):
                msg = f"loss became {train_loss} in epoch {epoch} (lr={cfg.lr:g}); lower the learning rate"
                return Result("diverged", {}, history, class_names=splits.class_names, best_epoch=best_epoch,
                              message=msg)

            # --- validation: the only thing that drives decisions
            val_loss, val_pred = evaluate(model, splits.val, device, start)
            metrics = {"train/loss": train_loss, "val/loss": val_loss,
                       **scores("val", splits.val.y.numpy(), val_pred),
                       "time/epoch_s": time.perf_counter() - start_time, "time/train_pass_s": train_pass}
            history.append(metrics)
            tracker.log_metrics(metrics, step=epoch)
            if metrics["val/f1_macro"] > best_f1:
                best_f1, best_epoch, stale = metrics["val/f1_macro"], epoch, 0
                best_state = cloned(model.state_dict())
            else:
                stale += 1
            # --- resumable state: copied in memory after every epoch, written every state_every_s seconds (one write
            # per epoch took a fifth of a sweep of short trials) and on Ctrl-C / SIGTERM (below)
            if state_path is not None:
                snapshot = {"model": cloned(model.state_dict()),
                            "optimizer": cloned(optimizer.state_dict()), "generator": gen.get_state(),
                            "history": list(history), "best_state": best_state, "best_f1": best_f1,
                            "best_epoch": best_epoch, "stale": stale}
                if time.monotonic() - saved_at >= state_every_s:
                    checkpoints.save(snapshot, state_path)
                    saved_at = time.monotonic()
            if on_epoch is not None:
                on_epoch(epoch, metrics)

        # --- the test set, once, with the best epoch's weights
        model.load_state_dict(best_state)
        _, test_pred = evaluate(model, splits.test, device, start)
    except KeyboardInterrupt:
        if snapshot is not None:
            try:
                checkpoints.save(snapshot, state_path)
            except Exception:  # noqa: BLE001 - the interrupt must go on (the retry then replays from older state)
                pass
        raise
    y_test = splits.test.y.numpy()
    report = per_class_report(y_test, test_pred, splits.class_names)
    best = history[best_epoch - 1]
    metrics = {k: best[k] for k in ("val/loss", "val/accuracy", "val/f1_macro")}
    metrics |= scores("test", y_test, test_pred)
    metrics |= {"best_epoch": best_epoch, "epochs_run": len(history), "trainable_params": count_params(model),
                "time/train_s": sum(h["time/epoch_s"] for h in history), "threads": n_threads}
    return Result("finished", metrics, history,
                  per_class_f1={name: report[name]["f1-score"] for name in splits.class_names}, report=report,
                  confusion=confusion(y_test, test_pred, len(splits.class_names)).tolist(),
                  class_names=splits.class_names, test_true=y_test.tolist(), test_pred=test_pred.tolist(), best_epoch=best_epoch,
                  model=model.cpu())
