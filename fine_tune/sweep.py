"""Optuna studies over the experiment's search space, every trial a child run of the study's MLflow parent run.

The objective is thin: sample -> build config -> `train` -> return the metric, reporting each epoch and
honouring `should_prune`. Rerunning a sweep loads the same study (`load_if_exists`) and adds trials.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
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
from fine_tune.data import prepare as prepare_data
from fine_tune.pretrain import backbone_for
from fine_tune.tracking import (StudyTracker, check_reachable, close_run, default_uri, interrupt, rearm, shielded,
                                warm_up)
from fine_tune.train import train

GRID_LR_POINTS = 5  # a grid over a continuous lr range takes this many log-spaced points


class TrialDiverged(RuntimeError):
    """A trial's loss became NaN/inf: the trial fails with this reason, the study goes on."""


def storage_url(cfg: Config) -> str:
    return (os.environ.get("OPTUNA_STORAGE") or cfg.sweep.storage
            or f"sqlite:///{Path(cfg.runs_dir).resolve()}/optuna.db")


class StorageError(RuntimeError):
    """The Optuna storage cannot be reached; the message names the URL and the fix."""


class CloseStaleTrial:
    """A trial whose worker stopped heartbeating: close its MLflow run as FAILED, then re-queue it.

    Optuna's retry callback enqueues a copy with the same params and user attrs (so the retry finds the MLflow
    run id and the epoch checkpoint of the trial it continues).
    """

    def __init__(self, tracking_uri: str | None, max_retry: int = 2):
        self.tracking_uri = tracking_uri
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and self.tracking_uri:
            close_run(self.tracking_uri, run_id, "FAILED", "FAIL",
                      f"worker stopped heartbeating during trial {trial.number}; the trial was re-queued")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry(study, trial)


def make_storage(url: str, tracking_uri: str | None = None, heartbeat: int = 10,
                 grace: int = 30) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats, so a trial whose worker died is failed and re-queued, not left RUNNING."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # SQLite serialises writers; with several local workers a write may wait, so wait long instead of failing.
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat,
                                              grace_period=grace,
                                              heartbeat_stale_trial_callback=CloseStaleTrial(tracking_uri))
    except Exception as e:  # sqlalchemy's OperationalError, ArgumentError, a missing driver...
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise StorageError(f"Optuna storage {url} is unusable ({first}); start the database or fix OPTUNA_STORAGE "
                           "/ sweep.storage") from None


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


class CompleteTrialsOnce(optuna.pruners.BasePruner):
    """Optuna's median pruner, reading the study's complete trials only when their number changed.

    MedianPruner reads every complete trial at every epoch of every trial: ~3 ms per epoch, a third of a transfer
    trial's epoch. Between two completions the answer is the same, so this keeps the list and asks the database
    only for a count (one COUNT query); a trial completed by another worker is seen at the next epoch, as before.
    The decisions are the median pruner's own (tests/test_sweep.py checks them against it).
    """

    def __init__(self, pruner: optuna.pruners.BasePruner):
        self.pruner, self.count, self.complete = pruner, None, []

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        count = _counts(study)[TrialState.COMPLETE]
        if count != self.count:
            self.count, self.complete = count, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return self.pruner.prune(_WithCompleteTrials(study, self.complete), trial)


class _WithCompleteTrials:
    """The study as a pruner sees it, answering "the complete trials" from a list in hand."""

    def __init__(self, study: optuna.Study, complete: list):
        self._study, self._complete = study, complete

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        if not deepcopy and states is not None and tuple(states) == (TrialState.COMPLETE,):
            return self._complete
        return self._study.get_trials(deepcopy=deepcopy, states=states)

    def __getattr__(self, name: str):
        return getattr(self._study, name)


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    s = cfg.sweep
    return {"median": lambda: CompleteTrialsOnce(optuna.pruners.MedianPruner(s.prune_startup_trials,
                                                                             s.prune_warmup_epochs)),
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


def worker_id() -> str:
    """host:pid of this process, as trials and re-runs record who runs them."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Objective:
    """One trial: sample, train (reporting each epoch to Optuna and MLflow), close the child run.

    A retried trial (its worker died, or the sweep was interrupted) continues the original trial's MLflow run
    from its last epoch checkpoint instead of starting over.
    """

    def __init__(self, cfg: Config, splits: Splits, backbone: str | None, tracker: StudyTracker,
                 on_start: Callable[[], None] = lambda: None):
        self.cfg, self.splits, self.backbone, self.tracker, self.on_start = cfg, splits, backbone, tracker, on_start
        self.context = context_params(cfg, splits, backbone)

    def state_path(self, number: int) -> Path:
        return self.cfg.run_dir() / "trial_state" / self.cfg.study / f"t{number:03d}.pt"

    def __call__(self, trial: optuna.Trial) -> float:
        from fine_tune.models import build_model, count_params

        self.on_start()  # the trial exists in the storage now: other workers may claim theirs
        cfg = self.cfg
        params = suggest(trial, cfg)
        trial_cfg = Config.model_validate({**cfg.model_dump(), **params})
        trial.set_user_attr("worker", worker_id())  # who runs it, for debugging
        frozen = _frozen(trial)
        original = frozen.system_attrs.get("failed_trial")  # set on a retry: the number of the trial it continues
        state = self.state_path(trial.number if original is None else original)

        inherited = set(frozen.intermediate_values)  # a retry replays epochs Optuna already holds

        def report(epoch: int, metrics: dict[str, float]) -> None:
            if epoch not in inherited:
                trial.report(metrics[cfg.sweep.objective], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        run = None
        try:  # everything that creates, feeds or closes the run: an interrupt anywhere here is handled below
            with shielded():  # the run and the trial's record of it appear together
                if original is not None and "mlflow_run_id" in trial.user_attrs:
                    run = self.tracker.reopen(trial.user_attrs["mlflow_run_id"], trial.number)
                else:
                    trainable = count_params(build_model(cfg.model, len(self.splits.class_names),
                                                         trial_cfg.head_size, trial_cfg.frozen_layers))
                    trial.set_user_attr("trainable_params", trainable)
                    run = self.tracker.start_trial(trial.number, {**self.context, **trial_cfg.model_dump(
                        include={"lr", "frozen_layers", "head_size", "weight_decay", "batch_size", "epochs",
                                 "patience"}), "trainable_params": trainable})
                    trial.set_user_attr("mlflow_run_id", run.run_id)
            if original is not None:  # a retry: its run may hold epochs of the attempt that stopped
                run.backfill(checkpoints.load_any(state)["history"] if state.is_file() else [])
            result = train(trial_cfg, self.splits, self.backbone, tracker=run, on_epoch=report, state_path=state)
            if result.status != "finished":
                trial.set_user_attr("fail_reason", result.message)
                raise TrialDiverged(result.message)
            value = result.metrics[cfg.sweep.objective]
            for k in ("val/accuracy", "val/f1_macro", "test/accuracy", "test/f1_macro", "best_epoch", "epochs_run"):
                trial.set_user_attr(k, result.metrics[k])
            run.log_result(result)
            if self.tracker.promote(run, result.model, value, cfg.sweep.objective, trial.number):
                trial.set_user_attr("champion", True)
                run.log_confusion_png(result)
            run.end("FINISHED", "COMPLETE")
        except (optuna.TrialPruned, TrialDiverged) as e:
            if isinstance(e, optuna.TrialPruned):
                run.end("KILLED", "PRUNED", str(e))
            else:
                run.end("FAILED", "FAIL", str(e))
            state.unlink(missing_ok=True)
            raise
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: keep the epoch checkpoint, queue the trial again
            with shielded():
                if run is not None:
                    run.end("KILLED", "FAIL", f"interrupted ({type(e).__name__}); re-queued, resumes from its last epoch")
                requeue(trial, original if original is not None else trial.number)
            raise
        except BaseException as e:  # a crash: never leave the run RUNNING
            if run is not None:
                run.end("FAILED", "FAIL", repr(e))
            raise
        state.unlink(missing_ok=True)
        return value


def _frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return trial.study._storage.get_trial(trial._trial_id)  # this one trial, not the whole study


def requeue(trial: optuna.Trial, original: int) -> None:
    """Queue an interrupted trial again, marked as a retry of `original`, as Optuna's retry callback would; the
    epochs it reported so far go with it."""
    trial.study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=dict(trial.user_attrs), system_attrs={"failed_trial": original},
        intermediate_values=dict(_frozen(trial).intermediate_values)))


def best_of(trials: list) -> optuna.trial.FrozenTrial:
    """The best complete trial of a list in hand (the study maximises; ties go to the earliest): study.best_trial
    would read it from the storage and deep-copy it again."""
    return max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))


def summary(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    out: dict[str, Any] = {"trials_complete": count[TrialState.COMPLETE], "trials_pruned": count[TrialState.PRUNED],
                           "trials_failed": count[TrialState.FAIL]}
    if count[TrialState.COMPLETE]:
        best = best_of(trials)
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
    best = best_of(trials).number if any(t.state == TrialState.COMPLETE for t in trials) else None
    head = f"{'trial':>5s} {'lr':>9s} {'frozen':>6s} {'head':>5s} {'val F1':>7s} {'val acc':>7s}  state"
    rows = [head, "-" * len(head)]
    for t in trials[:k]:
        p = t.params
        rows.append(f"{t.number:5d} {_fmt(p.get('lr'), '9.2e'):>9s} {_fmt(p.get('frozen_layers'), 'd'):>6s} "
                    f"{_fmt(p.get('head_size'), 'd'):>5s} {_fmt(t.user_attrs.get('val/f1_macro', shown(t)), '.4f'):>7s} "
                    f"{_fmt(t.user_attrs.get('val/accuracy'), '.4f'):>7s}  {t.state.name}"
                    + ("  <- best, champion" if t.number == best else ""))
    return "\n".join(rows)


class WorkerDied(RuntimeError):
    """A worker process ended abnormally (killed, out of memory)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (the trial is closed and re-queued) but exiting with 143."""


def _on_signal(signum, frame):
    interrupt(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())


@contextlib.contextmanager
def interruptible(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """Ctrl-C and SIGTERM stop the sweep cleanly: never inside a store write, and the trial is re-queued."""
    rearm()
    previous = {sig: signal.signal(sig, _on_signal) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def study_storage(cfg: Config) -> optuna.storages.BaseStorage:
    """The study's storage, with the config's heartbeat and a stale-trial callback that closes MLflow runs."""
    return make_storage(storage_url(cfg), tracking_uri=default_uri(cfg.runs_dir),
                        heartbeat=cfg.sweep.heartbeat_interval, grace=cfg.sweep.grace_period)


def open_study(cfg: Config, seed_offset: int = 0) -> optuna.Study:
    """Create or load the study; a resumed or parallel sampler is reseeded so it does not replay samples."""
    study = optuna.create_study(study_name=cfg.study, storage=study_storage(cfg), sampler=make_sampler(cfg),
                                pruner=make_pruner(cfg), direction="maximize", load_if_exists=True)
    if len(study.trials) or seed_offset:
        study.sampler = make_sampler(cfg, len(study.trials) + seed_offset)
    study.set_user_attr("objective", cfg.sweep.objective)  # reports read it from the store
    return study


def work(cfg: Config, target: int, max_trials: int, threads: int | None = None, worker: int = 0,
         study: optuna.Study | None = None, tracker: StudyTracker | None = None, backbone: str | None = None,
         progress: bool = False, log: Callable[[str], None] = print) -> None:
    """One worker: run trials of the study until it holds `target` finished (complete or pruned) trials.

    The parent run is the launcher's to close; a worker only adds child runs under it.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    # Optuna would log a traceback per failed trial; we say it in one line below and keep the reason in MLflow.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    splits = splits_for(cfg)
    backbone = backbone or backbone_for(cfg, log)
    study = study or open_study(cfg, seed_offset=1000 * worker)
    tracker = tracker or StudyTracker(cfg.study, cfg.runs_dir)
    warm_up()
    bar = tqdm(total=target, initial=_finished(study), desc=cfg.study, unit="trial", disable=not progress,
               dynamic_ncols=True)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        s = summary(study)
        tracker.summarise(s)
        if trial.state == TrialState.FAIL:
            bar.write(f"trial {trial.number} failed: {trial.user_attrs.get('fail_reason', 'see its MLflow run')}")
        bar.n = s["trials_complete"] + s["trials_pruned"]
        bar.set_postfix(best=f"{s.get('best_value', float('nan')):.4f}", done=s["trials_complete"],
                        pruned=s["trials_pruned"], failed=s["trials_failed"])

    # Workers claim trials under a lock (check the count, then ask) so that together they run exactly `target`
    # finished trials; in-flight trials of other workers count as claimed until they finish or go stale.
    lock = ClaimLock(storage_url(cfg), cfg.study, cfg.runs_dir)
    objective = Objective(cfg, splits, backbone, tracker, on_start=lock.release)
    started, attempts, waited_since, last_seen = time.monotonic(), 0, None, -1
    # How long to wait on other workers' trials: a trial of this study, or a dead worker's grace period, at most.
    patience_s = 3 * (cfg.sweep.grace_period + cfg.sweep.heartbeat_interval) + 600
    try:
        while attempts < max_trials and not (cfg.sweep.timeout and time.monotonic() - started > cfg.sweep.timeout):
            lock.acquire()
            counts = _counts(study)  # one read: a trial may finish between two
            finished, running = sum(counts[s] for s in FINISHED), counts[TrialState.RUNNING]
            if finished >= target:
                break
            if finished + running >= target:  # wait for the others' trials (or for a dead worker's to go stale)
                lock.release()
                if waited_since is None or finished != last_seen:  # progress resets the clock
                    waited_since, last_seen = time.monotonic(), finished
                if time.monotonic() - waited_since > patience_s:
                    log(f"stopping: {running} trial(s) of other workers made no progress for {patience_s:.0f}s")
                    break
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
                time.sleep(1.0)
                continue
            waited_since = None
            study.optimize(objective, n_trials=1, callbacks=[after_trial], catch=(TrialDiverged,))
            lock.release()
            attempts += 1
    finally:
        lock.release()
        lock.close()
        bar.close()


class ClaimLock:
    """A cross-process lock around "count the trials, then ask for one": a PostgreSQL advisory lock on
    PostgreSQL (workers on any machine), a file lock beside the local stores otherwise."""

    def __init__(self, url: str, study: str, runs_dir: str):
        self.held, self.conn, self.file = False, None, None
        self.key = int.from_bytes(hashlib.sha256(study.encode()).digest()[:8], "big", signed=True)
        if url.startswith("postgresql"):
            import sqlalchemy

            self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            self.conn = self.engine.connect()
        else:
            path = Path(runs_dir) / f".claim-{study}.lock"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a+")

    def acquire(self) -> None:
        if not self.held:
            self._set(True)

    def release(self) -> None:
        if self.held:
            self._set(False)

    def _set(self, held: bool) -> None:
        if self.conn is not None:
            import sqlalchemy

            fn = "pg_advisory_lock" if held else "pg_advisory_unlock"
            self.conn.execute(sqlalchemy.text(f"SELECT {fn}(:k)"), {"k": self.key})
            self.conn.commit()
        else:
            fcntl.flock(self.file, fcntl.LOCK_EX if held else fcntl.LOCK_UN)
        self.held = held

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.engine.dispose()
        if self.file is not None:
            self.file.close()


def _counts(study: optuna.Study) -> collections.Counter:
    """The study's trials by state, counted by the database itself: Optuna's per-process trial cache can miss a
    trial another worker created, and an exact count is what keeps parallel workers from overshooting. One COUNT
    query: reading every trial instead took 35 ms before each trial of a 40-trial study, and grew with the study."""
    import sqlalchemy
    from optuna.storages._rdb.models import TrialModel

    storage = study._storage._backend if hasattr(study._storage, "_backend") else study._storage
    query = (sqlalchemy.select(TrialModel.state, sqlalchemy.func.count())
             .where(TrialModel.study_id == study._study_id).group_by(TrialModel.state))
    with storage.engine.connect() as conn:
        return collections.Counter(dict(conn.execute(query).all()))


def _finished(study: optuna.Study) -> int:
    return sum(_counts(study)[s] for s in FINISHED)


def _worker_main(cfg: Config, target: int, max_trials: int, threads: int, worker: int,
                 backbone: str | None) -> None:
    # Ctrl-C reaches the whole process group; the launcher turns it into one SIGTERM per worker, so a worker
    # ignores SIGINT rather than being interrupted twice in the middle of closing its trial.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interruptible((signal.SIGTERM,)):
            work(cfg, target, max_trials, threads, worker, backbone=backbone, log=lambda s: None)
    except KeyboardInterrupt:
        sys.exit(143)


def run_sweep(cfg: Config, n_trials: int | None = None, workers: int = 1, log: Callable[[str], None] = print,
              progress: bool = True) -> optuna.Study:
    """Run (or resume) the study `cfg.study` until it holds `n_trials` more finished trials.

    With `workers > 1`, that many processes share the study (and the machine's cores) through its storage.
    """
    if cfg.search is None:
        from fine_tune.config import ConfigError

        raise ConfigError("search: not set, so there is nothing to sweep; add a `search:` section")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Check every input before anything is created: the tracking server, the data, a user's checkpoint.
    check_reachable(default_uri(cfg.runs_dir))
    prepare_data(cfg.data_dir)
    backbone = backbone_for(cfg, log) if cfg.pretrained else None
    study = open_study(cfg)  # fails fast on an unreachable storage, before any pretraining
    tracker = StudyTracker(cfg.study, cfg.runs_dir)  # the parent run exists before any worker starts
    n = n_trials or cfg.sweep.n_trials or 10**9
    target = _finished(study) + n
    max_trials = 2 * n + 10  # bounds a study whose trials keep failing
    log(f"study {cfg.study}: {len(study.trials)} trials so far in {storage_url(cfg)}; running until {n} more finish"
        f"{f' (timeout {cfg.sweep.timeout:g}s)' if cfg.sweep.timeout else ''} with {workers} worker(s) | "
        f"MLflow {tracker.uri}")
    status = "KILLED"
    try:
        with interruptible():
            if not cfg.pretrained:
                backbone = backbone_for(cfg, log)  # pretrain once, here, rather than racing in every worker
            if workers <= 1:
                work(cfg, target, max_trials, study=study, tracker=tracker, backbone=backbone, progress=progress,
                     log=log)
            else:
                _run_workers(cfg, study, target, max_trials, workers, progress, backbone)
            status = "FINISHED"
    finally:
        tracker.close(status)
    return study


def _run_workers(cfg: Config, study: optuna.Study, target: int, max_trials: int, workers: int,
                 progress: bool, backbone: str | None) -> None:
    ctx = multiprocessing.get_context("spawn")  # no forked torch/sqlite state shared between workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [ctx.Process(target=_worker_main, args=(cfg, target, max_trials, threads, i + 1, backbone))
             for i in range(workers)]
    for p in procs:
        p.start()
    bar = tqdm(total=target, initial=_finished(study), desc=f"{cfg.study} x{workers}", unit="trial",
               disable=not progress, dynamic_ncols=True)
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            bar.n = min(_finished(study), target)
            bar.refresh()
    except KeyboardInterrupt:
        for p in procs:  # each worker closes its own trial and run, then exits
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join()
        raise
    finally:
        bar.close()
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if failed:
        # A worker that died left its trial RUNNING; once its heartbeat is stale, fail it, close its MLflow run
        # and re-queue it (the next sweep resumes it from its last epoch).
        time.sleep(cfg.sweep.grace_period + cfg.sweep.heartbeat_interval)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        raise WorkerDied(f"{len(failed)} of {workers} workers died (exit codes {failed}); their trials were failed "
                         "and re-queued; run the same command again to finish them")
