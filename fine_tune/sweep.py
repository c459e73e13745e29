"""Optuna studies over the experiment's search space, every trial a child run of the study's MLflow parent run.

The objective is thin: sample -> build config -> `train` -> return the metric, reporting each epoch and
honouring `should_prune`. Rerunning a sweep loads the same study (`load_if_exists`) and adds trials.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from fine_tune import checkpoints
from fine_tune.config import Config
from fine_tune.data import Splits, splits_for
from fine_tune.pretrain import backbone_for
from fine_tune.tracking import StudyTracker
from fine_tune.train import train

GRID_LR_POINTS = 5  # a grid over a continuous lr range takes this many log-spaced points


class TrialDiverged(RuntimeError):
    """A trial's loss became NaN/inf: the trial fails with this reason, the study goes on."""


def storage_url(cfg: Config) -> str:
    return (os.environ.get("OPTUNA_STORAGE") or cfg.sweep.storage
            or f"sqlite:///{Path(cfg.runs_dir).resolve()}/optuna.db")


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats, so a trial whose worker died is failed and re-queued, not left RUNNING."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=10, grace_period=30,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))


def grid_space(cfg: Config) -> dict[str, list]:
    s = cfg.search
    space: dict[str, list] = {}
    if s.lr:
        lo, hi = (math.log10(s.lr.low), math.log10(s.lr.high)) if s.lr.log else (s.lr.low, s.lr.high)
        pts = np.linspace(lo, hi, GRID_LR_POINTS)
        space["lr"] = [float(10 ** p) if s.lr.log else float(p) for p in pts]
    if s.frozen_layers:
        space["frozen_layers"] = list(range(s.frozen_layers.low, s.frozen_layers.high + 1))
    if s.head_size:
        space["head_size"] = list(s.head_size)
    if s.weight_decay:
        space["weight_decay"] = [s.weight_decay.low, s.weight_decay.high]
    if s.batch_size:
        space["batch_size"] = list(s.batch_size)
    if s.epochs:
        space["epochs"] = sorted({s.epochs.low, s.epochs.high})
    return space


def make_sampler(cfg: Config, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
    """A seeded sampler; a resumed study offsets the seed so it does not replay the first run's samples."""
    seed = cfg.seed + trials_so_far
    if cfg.sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sweep.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(cfg), seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    s = cfg.sweep
    return {"median": lambda: optuna.pruners.MedianPruner(s.prune_startup_trials, s.prune_warmup_epochs),
            "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=2),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=2, max_resource=cfg.epochs),
            "none": optuna.pruners.NopPruner}[cfg.sweep.pruner]()


def suggest(trial: optuna.Trial, cfg: Config) -> dict[str, Any]:
    """Sample every hyperparameter named in `search:`; the rest stay at the config's values."""
    s, p = cfg.search, {}
    if s.lr:
        p["lr"] = trial.suggest_float("lr", s.lr.low, s.lr.high, log=s.lr.log)
    if s.frozen_layers:
        p["frozen_layers"] = trial.suggest_int("frozen_layers", s.frozen_layers.low, s.frozen_layers.high)
    if s.head_size:
        p["head_size"] = trial.suggest_categorical("head_size", s.head_size)
    if s.weight_decay:
        p["weight_decay"] = trial.suggest_float("weight_decay", s.weight_decay.low, s.weight_decay.high,
                                                log=s.weight_decay.log)
    if s.batch_size:
        p["batch_size"] = trial.suggest_categorical("batch_size", s.batch_size)
    if s.epochs:
        p["epochs"] = trial.suggest_int("epochs", s.epochs.low, s.epochs.high)
    return p


def context_params(cfg: Config, splits: Splits, backbone: str | None) -> dict[str, Any]:
    """What every trial shares: logged beside the trial's own hyperparameters."""
    return {"model": cfg.model, "classes": cfg.classes, "class_names": "|".join(splits.class_names),
            "budget_per_class": cfg.budget_per_class, "val_per_class": cfg.val_per_class,
            "train_images": len(splits.train), "val_images": len(splits.val), "test_images": len(splits.test),
            "seed": cfg.seed, "data_seed": cfg.data_seed, "data_fingerprint": splits.fingerprint,
            "pretrained": backbone or "none",
            "pretrained_sha256": checkpoints.file_sha256(backbone)[:16] if backbone else "none",
            "objective": cfg.sweep.objective}


class Objective:
    """One trial: sample, train (reporting each epoch to Optuna and MLflow), close the child run."""

    def __init__(self, cfg: Config, splits: Splits, backbone: str | None, tracker: StudyTracker):
        self.cfg, self.splits, self.backbone, self.tracker = cfg, splits, backbone, tracker
        self.context = context_params(cfg, splits, backbone)

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = self.cfg
        params = suggest(trial, cfg)
        trial_cfg = Config.model_validate({**cfg.model_dump(), **params})
        from fine_tune.models import build_model, count_params

        trainable = count_params(build_model(cfg.model, len(self.splits.class_names), trial_cfg.head_size,
                                             trial_cfg.frozen_layers))
        trial.set_user_attr("trainable_params", trainable)
        run = self.tracker.start_trial(trial.number, {**self.context, **trial_cfg.model_dump(
            include={"lr", "frozen_layers", "head_size", "weight_decay", "batch_size", "epochs", "patience"}),
            "trainable_params": trainable})
        trial.set_user_attr("mlflow_run_id", run.run_id)

        def report(epoch: int, metrics: dict[str, float]) -> None:
            trial.report(metrics[cfg.sweep.objective], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        try:
            result = train(trial_cfg, self.splits, self.backbone, tracker=run, on_epoch=report)
        except optuna.TrialPruned as e:
            run.end("KILLED", "PRUNED", str(e))
            raise
        except BaseException as e:  # a crash or Ctrl-C: never leave the run RUNNING
            run.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", "FAIL", repr(e))
            raise
        if result.status != "finished":
            trial.set_user_attr("fail_reason", result.message)
            run.end("FAILED", "FAIL", result.message)
            raise TrialDiverged(result.message)

        value = result.metrics[cfg.sweep.objective]
        for k in ("val/accuracy", "val/f1_macro", "test/accuracy", "test/f1_macro", "best_epoch", "epochs_run"):
            trial.set_user_attr(k, result.metrics[k])
        run.log_result(result)
        if self.tracker.promote(run, result.model, value, cfg.sweep.objective, trial.number):
            trial.set_user_attr("champion", True)
        run.end("FINISHED", "COMPLETE")
        return value


def summary(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    out: dict[str, Any] = {"trials_complete": count[TrialState.COMPLETE], "trials_pruned": count[TrialState.PRUNED],
                           "trials_failed": count[TrialState.FAIL]}
    if count[TrialState.COMPLETE]:
        best = study.best_trial
        out |= {"best_value": best.value, "best_trial": best.number,
                **{f"best_{k}": v for k, v in best.params.items()}}
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def top_table(study: optuna.Study, k: int = 10) -> str:
    """The best finished trials first, then pruned and failed ones; pruned show their last reported value."""
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]

    def shown(t: optuna.trial.FrozenTrial) -> float | None:
        if t.state == TrialState.PRUNED and t.intermediate_values:
            return t.intermediate_values[t.last_step]
        return t.value

    trials.sort(key=lambda t: (t.state != TrialState.COMPLETE, -(shown(t) or -1.0)))
    best = study.best_trial.number if any(t.state == TrialState.COMPLETE for t in trials) else None
    head = f"{'trial':>5s} {'lr':>9s} {'frozen':>6s} {'head':>5s} {'val F1':>7s} {'val acc':>7s}  state"
    rows = [head, "-" * len(head)]
    for t in trials[:k]:
        p = t.params
        rows.append(f"{t.number:5d} {_fmt(p.get('lr'), '9.2e'):>9s} {_fmt(p.get('frozen_layers'), 'd'):>6s} "
                    f"{_fmt(p.get('head_size'), 'd'):>5s} {_fmt(t.user_attrs.get('val/f1_macro', shown(t)), '.4f'):>7s} "
                    f"{_fmt(t.user_attrs.get('val/accuracy'), '.4f'):>7s}  {t.state.name}"
                    + ("  <- best, champion" if t.number == best else ""))
    return "\n".join(rows)


def run_sweep(cfg: Config, n_trials: int | None = None, log: Callable[[str], None] = print,
              progress: bool = True) -> optuna.Study:
    """Run (or resume) the study `cfg.study`: pretrain if needed, then `n_trials` more trials."""
    if cfg.search is None:
        from fine_tune.config import ConfigError

        raise ConfigError(f"search: not set, so there is nothing to sweep; add a `search:` section")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    splits = splits_for(cfg)
    backbone = backbone_for(cfg, log)
    url = storage_url(cfg)
    study = optuna.create_study(study_name=cfg.study, storage=make_storage(url), sampler=make_sampler(cfg),
                                pruner=make_pruner(cfg), direction="maximize", load_if_exists=True)
    done_before = len(study.trials)
    if done_before:
        study.sampler = make_sampler(cfg, done_before)
    study.set_user_attr("objective", cfg.sweep.objective)
    tracker = StudyTracker(cfg.study, cfg.runs_dir)
    n = n_trials or cfg.sweep.n_trials
    log(f"study {cfg.study}: {done_before} trials so far in {url}; running {n or 'unlimited'} more"
        f"{f' (timeout {cfg.sweep.timeout:g}s)' if cfg.sweep.timeout else ''} | MLflow {tracker.uri}")

    bar = tqdm(total=n, desc=cfg.study, unit="trial", disable=not progress, dynamic_ncols=True)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        s = summary(study)
        tracker.summarise(s)
        bar.update(1)
        bar.set_postfix(best=f"{s.get('best_value', float('nan')):.4f}", done=s["trials_complete"],
                        pruned=s["trials_pruned"], failed=s["trials_failed"])

    try:
        study.optimize(Objective(cfg, splits, backbone, tracker), n_trials=n, timeout=cfg.sweep.timeout,
                       callbacks=[after_trial], catch=(TrialDiverged,))
    finally:
        bar.close()
        tracker.close()
    return study
