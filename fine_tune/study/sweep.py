"""Optuna studies over the experiment's search space, every trial a child run of the study's MLflow parent run.

The objective is the optuna-examples shape: suggest -> train (reporting each epoch, pruning) -> return the metric.
What a retry continues lives in `workers.Attempt`, the run's life in `tracking.run_scope`, and promotion in
`Objective.record`. Rerunning a sweep loads the same study (`load_if_exists`) and adds trials.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from fine_tune.config import Config
from fine_tune.errors import ConfigError, StorageError, TrackingError, causes
from fine_tune.learn import threads
from fine_tune.learn.train import Result, train
from fine_tune.learn.train import warm_up as train_warm_up
from fine_tune.names import SUMMARY
from fine_tune.study.champion import register_champion
from fine_tune.study.inputs import Inputs, resolve_inputs
from fine_tune.study.preflight import preflight
from fine_tune.study.samplers import check_space, make_pruner, make_sampler, suggest
from fine_tune.study.summary import definition, description, summary
from fine_tune.study.workers import Attempt, ClaimLock, CloseStaleTrial, finished, run_processes, work
from fine_tune.track.interrupts import interruptible
from fine_tune.track.outages import patient
from fine_tune.track.stores import (
    check_sqlite,
    masked,
    optuna_storage,
    optuna_url,
    quiet_experimental,
    tracking_lost,
    tracking_uri,
    wait_for_tracking,
)
from fine_tune.track.tracking import train_in_run
from fine_tune.track.tree import StudyTracker, parent_run
from fine_tune.track.views import save_trials_view, view_link


class TrialDiverged(RuntimeError):
    """A trial's loss became NaN/inf: the trial fails with this reason, the study goes on."""


class TrackingLost(RuntimeError):
    """The tracking server stopped answering during a trial: the trial was re-queued (its run is continued by the
    retry), and the worker waits for the server before it claims another."""

    REASON = "the MLflow tracking server could not be reached; re-queued, resumes from its last epoch when it is back"


def max_wait_s(cfg: Config) -> float:
    """How long a worker waits, at most, on other workers' trials (a trial of this study, or a dead worker's grace
    period) and on a store that went away (the Optuna database, the tracking server)."""
    return 3 * (cfg.sweep.grace_period + cfg.sweep.heartbeat_interval) + cfg.sweep.max_wait


def open_study(cfg: Config, seed_offset: int = 0, log: Callable[[str], None] = tqdm.write) -> optuna.Study:
    """Create or load the study; a resumed or parallel sampler is reseeded so it does not replay samples. Its
    storage heartbeats, and a trial whose worker died has its MLflow run closed and is re-queued; an outage of its
    database is waited through (saying so in `log`). A search space the study cannot take is refused here."""
    storage = optuna_storage(optuna_url(cfg.runs_dir, cfg.sweep.storage), heartbeat=cfg.sweep.heartbeat_interval,
                             grace=cfg.sweep.grace_period, on_stale=CloseStaleTrial(tracking_uri(cfg.runs_dir)),
                             patience_s=max_wait_s(cfg), log=log)
    study = optuna.create_study(study_name=cfg.study, storage=storage, sampler=make_sampler(cfg),
                                pruner=make_pruner(cfg), direction="maximize", load_if_exists=True)
    check_space(study, cfg)
    if len(study.trials) or seed_offset:
        study.sampler = make_sampler(cfg, len(study.trials) + seed_offset)
    study.set_user_attr("objective", cfg.sweep.objective)  # reports read it from the store
    with quiet_experimental():  # experimental since Optuna 3.2; the dashboard reads it
        study.set_metric_names([cfg.sweep.objective])  # optuna-dashboard names the objective, not "Objective 0"
    return study


def trial_outcome(exc: BaseException) -> tuple[str, str, str]:
    """How a trial's run ends when `exc` stopped it: (MLflow status, Optuna state tag, reason)."""
    if isinstance(exc, optuna.TrialPruned):
        return "KILLED", "PRUNED", str(exc)
    if isinstance(exc, TrialDiverged):
        return "FAILED", "FAIL", str(exc)
    if isinstance(exc, StorageError):  # the database stayed away: the next sweep re-queues the trial
        return "KILLED", "FAIL", str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", "FAIL", f"interrupted ({type(exc).__name__}); re-queued, resumes from its last epoch"
    return "FAILED", "FAIL", repr(exc)


class Objective:
    """One trial: sample, train (reporting each epoch to Optuna and MLflow), record the result."""

    def __init__(self, inputs: Inputs, tracker: StudyTracker, on_start: Callable[[], None] = lambda: None):
        self.inputs, self.tracker, self.on_start = inputs, tracker, on_start
        cfg = inputs.cfg
        self.state_dir = cfg.run_dir() / "trial_state" / cfg.study

    def __call__(self, trial: optuna.Trial) -> float:
        self.on_start()  # the trial exists in the storage now: other workers may claim theirs
        cfg, objective = self.inputs.cfg, self.inputs.cfg.sweep.objective
        trial_cfg = Config.model_validate({**cfg.model_dump(), **suggest(trial, cfg)})
        attempt = Attempt(trial, self.state_dir, objective)
        try:
            result, _ = train_in_run(
                lambda: attempt.open_run(self.tracker, self.inputs.run_params(trial_cfg), self.inputs.record(trial_cfg)),
                lambda run: train(trial_cfg, *self.inputs.for_run(trial_cfg), tracker=run,
                                  on_epoch=attempt.report, state_path=attempt.state,
                                  state_every_s=cfg.sweep.state_every_s),
                trial_outcome)
            value = self.record(trial, result)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the epoch checkpoint, queue the trial again
            attempt.requeue()
            raise
        except (optuna.TrialPruned, TrialDiverged):
            attempt.state.unlink(missing_ok=True)
            raise
        except Exception as e:
            if not tracking_lost(e, self.tracker.uri):
                raise
            # the server went away (its run may stay RUNNING until then): queue the trial again, whose retry
            # reopens the same run and continues from the saved epoch, rather than failing it for good
            attempt.requeue()
            trial.set_user_attr("fail_reason", TrackingLost.REASON)
            raise TrackingLost(TrackingLost.REASON) from e
        attempt.state.unlink(missing_ok=True)
        return value

    def record(self, trial: optuna.Trial, result: Result) -> float:
        """A trial's result in Optuna's store (its run holds it already; the champion is registered when the sweep
        ends: `register_champion`)."""
        if result.status != "finished":
            trial.set_user_attr("fail_reason", result.message)
            raise TrialDiverged(result.message)
        for k in SUMMARY:
            trial.set_user_attr(k, result.metrics[k])
        return result.metrics[self.inputs.cfg.sweep.objective]


# --- the sweep


def sweep_worker(inputs: Inputs, target: int, max_trials: int, log: Callable[[str], None], progress: bool,
                 study: optuna.Study, tracker: StudyTracker) -> None:
    """One worker: run trials of the study until it holds `target` finished (complete or pruned) trials. The parent
    run is the launcher's to close; a worker only adds child runs under it."""
    cfg = inputs.cfg
    # Optuna would log a traceback per failed trial; we say it in one line below and keep the reason in MLflow.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    train_warm_up()
    patience_s = max_wait_s(cfg)
    bar = tqdm(total=target, initial=finished(study), desc=cfg.study, unit="trial", disable=not progress,
               dynamic_ncols=True)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("fail_reason") == TrackingLost.REASON:
            if not wait_for_tracking(tracker.uri, patience_s, bar.write):
                raise TrackingError(f"the MLflow tracking server {tracker.uri} stayed unreachable for {patience_s:.0f}s; "
                                    f"trial {trial.number} was re-queued: run the same command again once it is back")
        s = summary(study)
        try:
            tracker.summarise(s)
        except Exception as e:  # noqa: BLE001 - the parent's summary is written again after the next trial
            if not tracking_lost(e, tracker.uri):
                raise
        if trial.state == TrialState.FAIL:
            bar.write(f"trial {trial.number} failed: {trial.user_attrs.get('fail_reason', 'see its MLflow run')}")
        bar.n = s["trials_complete"] + s["trials_pruned"]
        bar.set_postfix(best=f"{s.get('best_value', float('nan')):.4f}", done=s["trials_complete"],
                        pruned=s["trials_pruned"], failed=s["trials_failed"])

    lock = ClaimLock(optuna_url(cfg.runs_dir, cfg.sweep.storage), cfg.study, cfg.runs_dir, patient(study))
    try:
        work(study, Objective(inputs, tracker, on_start=lock.release), lock, target, max_trials, cfg.sweep.timeout,
             patience_s, callbacks=[after_trial], catch=(TrialDiverged, TrackingLost), log=log)
    finally:
        bar.close()


def _worker_process(inputs: Inputs, target: int, max_trials: int, workers: int, worker: int) -> None:
    """A spawned worker, one of `workers`: its own study and tracker objects (connections are per process), on the
    inputs and tracking URI the launcher resolved. Each trial sets its thread count from this share (threads.py)."""
    threads.share(workers)
    # Ctrl-C reaches the whole process group; the launcher turns it into one SIGTERM per worker, so a worker
    # ignores SIGINT rather than being interrupted twice in the middle of closing its trial.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "Using an existing study" per worker, through the bar
    cfg = inputs.cfg
    try:
        with interruptible((signal.SIGTERM,)):
            # the launcher's own storage says when the database is away and back: once, not once per worker
            study = open_study(cfg, seed_offset=1000 * worker, log=lambda s: None)
            sweep_worker(inputs, target, max_trials, lambda s: None, False, study,
                         StudyTracker(cfg.study, tracking_uri(cfg.runs_dir)))
    except KeyboardInterrupt:
        sys.exit(143)
    except Exception as e:
        if not any(isinstance(c, StorageError) for c in causes(e)):
            raise
        sys.exit(2)  # the database stayed away: the launcher, which waits on it too, says so in one line


def run_sweep(cfg: Config, n_trials: int | None = None, workers: int = 1, log: Callable[[str], None] = print,
              progress: bool = True) -> optuna.Study:
    """Run (or resume) the study `cfg.study` until it holds `n_trials` more finished trials.

    With `workers > 1`, that many processes share the study (and the machine's cores) through its storage.
    """
    if cfg.search is None:
        raise ConfigError("search: not set, so there is nothing to sweep; add a `search:` section")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Every input is resolved (and bad input refused) before anything is created: the tracking server, the data,
    # the backbone (a user's checkpoint checked, or ours pretrained once here rather than racing in every worker),
    # then the study and its parent run.
    uri = preflight(cfg)
    check_sqlite(uri, "MLflow store", "a first run")  # before the Optuna study exists: a broken store writes nothing
    inputs = resolve_inputs(cfg, log)
    study = open_study(cfg)
    n = n_trials or cfg.sweep.n_trials or 10**9
    target = finished(study) + n
    max_trials = 2 * n + 10  # bounds a study whose trials keep failing
    with parent_run(cfg.study, uri) as tracker:  # the parent run exists before any worker starts
        tracker.define(definition(cfg, n_trials))
        save_trials_view(tracker.client, tracker.experiment_id, list(cfg.search.dimensions()), cfg.sweep.objective)
        tracker.parent.log_datasets(inputs.all_datasets())  # before any worker: see RunTracker.log_datasets
        log(masked(f"study {cfg.study}: {len(study.trials)} trials so far in "
                   f"{optuna_url(cfg.runs_dir, cfg.sweep.storage)}; running until {n} more finish"
                   f"{f' (timeout {cfg.sweep.timeout:g}s)' if cfg.sweep.timeout else ''} with {workers} worker(s) | "
                   f"MLflow {uri}"))
        if workers <= 1:
            sweep_worker(inputs, target, max_trials, log, progress, study, tracker)
        else:
            run_workers(inputs, target, max_trials, workers, study, progress)
        register_champion(study, inputs, tracker, log)
        tracker.describe_result(description(study, cfg, view_link(tracker.experiment_id)))
    return study


def run_workers(inputs: Inputs, target: int, max_trials: int, workers: int, study: optuna.Study,
                progress: bool) -> None:
    """`workers` processes share the study until it holds `target` finished trials, one progress bar for all."""
    cfg = inputs.cfg
    bar = tqdm(total=target, initial=finished(study), desc=f"{cfg.study} x{workers}", unit="trial",
               disable=not progress, dynamic_ncols=True)
    try:
        run_processes(_worker_process, (inputs, target, max_trials), workers, study, target,
                      cfg.sweep.grace_period + cfg.sweep.heartbeat_interval,
                      progress=lambda n: (setattr(bar, "n", n), bar.refresh()))
    finally:
        bar.close()
