"""Optuna studies over the experiment's search space, every trial a child run of the study's MLflow parent run.

The objective is the optuna-examples shape: suggest -> train (reporting each epoch, pruning) -> return the metric.
What a retry continues lives in `workers.Attempt`, the run's life in `tracking.run_scope`, and promotion in
`Objective.record`. Rerunning a sweep loads the same study (`load_if_exists`) and adds trials.
"""
from __future__ import annotations

import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from fine_tune import figures, threads
from fine_tune.config import Config, ConfigError
from fine_tune.errors import TrackingError
from fine_tune.inputs import Inputs, resolve_inputs
from fine_tune.interrupts import interruptible
from fine_tune.search import make_pruner, make_sampler, suggest
from fine_tune.stores import (check_reachable, check_sqlite, optuna_storage, optuna_url, tracking_lost, tracking_uri,
                              wait_for_tracking)
from fine_tune.tracking import RunTracker, StudyTracker, run_scope
from fine_tune.train import Result, train
from fine_tune.train import warm_up as train_warm_up
from fine_tune.workers import Attempt, ClaimLock, CloseStaleTrial, finished, run_processes, work


class TrialDiverged(RuntimeError):
    """A trial's loss became NaN/inf: the trial fails with this reason, the study goes on."""


class TrackingLost(RuntimeError):
    """The tracking server stopped answering during a trial: the trial was re-queued (its run is continued by the
    retry), and the worker waits for the server before it claims another."""

    REASON = "the MLflow tracking server could not be reached; re-queued, resumes from its last epoch when it is back"


def definition(cfg: Config, n_trials: int | None) -> dict[str, Any]:
    """The study as a person would define it, for the parent run's params."""
    import json

    s = cfg.sweep
    pruner = {"median": f"median (startup {s.prune_startup_trials} trials, warm-up {s.prune_warmup_epochs} epochs)",
              "halving": "successive halving (min resource 2)", "hyperband": f"hyperband (2-{cfg.epochs} epochs)",
              "none": "none"}[s.pruner]
    return {"study": cfg.study, "objective": f"maximize {s.objective}", "sampler": f"{s.sampler} (seed {cfg.seed})",
            "pruner": pruner, "n_trials": n_trials or s.n_trials, "seed": cfg.seed, "model": cfg.model,
            **{f"search.{name}": json.dumps(dim.model_dump()) for name, dim in cfg.search.dimensions().items()}}


def description(study: optuna.Study, cfg: Config, top: int = 5) -> str:
    """The parent run's description: the counts, the best trials as a Markdown table, the champion, the report."""
    s = summary(study)
    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: (-t.value, t.number))
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    rows = [f"| trial | {' | '.join(names)} | {cfg.sweep.objective} | test/accuracy | run |",
            "|" + "---|" * (len(names) + 4)]
    for t in trials[:top]:
        values = [f"{t.params[k]:.3g}" if isinstance(t.params.get(k), float) else str(t.params.get(k, "-"))
                  for k in names]
        rows.append(f"| {t.number} | {' | '.join(values)} | {t.value:.4f} | "
                    f"{t.user_attrs.get('test/accuracy', float('nan')):.4f} | `{t.user_attrs.get('mlflow_run_id')}` |")
    champion = study.user_attrs.get("champion_trial")
    return "\n".join([
        f"**{cfg.study}**: {s['trials_complete']} complete, {s['trials_pruned']} pruned, {s['trials_failed']} failed "
        f"trials; objective: maximize `{cfg.sweep.objective}` (validation; the test set never drives a decision).", "",
        *rows, "",
        (f"**Champion**: trial {champion}, `models:/{cfg.study}@champion`." if champion is not None else
         "No champion yet."),
        f"**Report**: `make report` writes `reports/{cfg.study}/report.html` and logs it to this run's artifacts "
        "under `report/report.html` (open it there)."])


def open_study(cfg: Config, seed_offset: int = 0) -> optuna.Study:
    """Create or load the study; a resumed or parallel sampler is reseeded so it does not replay samples. Its
    storage heartbeats, and a trial whose worker died has its MLflow run closed and is re-queued."""
    storage = optuna_storage(optuna_url(cfg.runs_dir, cfg.sweep.storage), heartbeat=cfg.sweep.heartbeat_interval,
                             grace=cfg.sweep.grace_period, on_stale=CloseStaleTrial(tracking_uri(cfg.runs_dir)))
    study = optuna.create_study(study_name=cfg.study, storage=storage, sampler=make_sampler(cfg),
                                pruner=make_pruner(cfg), direction="maximize", load_if_exists=True)
    if len(study.trials) or seed_offset:
        study.sampler = make_sampler(cfg, len(study.trials) + seed_offset)
    study.set_user_attr("objective", cfg.sweep.objective)  # reports read it from the store
    with warnings.catch_warnings():  # experimental since Optuna 3.2; the dashboard reads it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([cfg.sweep.objective])  # optuna-dashboard names the objective, not "Objective 0"
    return study


def trial_outcome(exc: BaseException) -> tuple[str, str, str]:
    """How a trial's run ends when `exc` stopped it: (MLflow status, Optuna state tag, reason)."""
    if isinstance(exc, optuna.TrialPruned):
        return "KILLED", "PRUNED", str(exc)
    if isinstance(exc, TrialDiverged):
        return "FAILED", "FAIL", str(exc)
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
        trial_cfg = Config.model_validate({**cfg.model_dump(), **suggest(trial, cfg.search)})
        attempt = Attempt(trial, self.state_dir)
        try:
            with run_scope(lambda: attempt.open_run(self.tracker, self.inputs.run_params(trial_cfg),
                                                    self.inputs.record(trial_cfg)), trial_outcome) as run:
                result = train(trial_cfg, *self.inputs.for_run(trial_cfg), tracker=run,
                               on_epoch=lambda epoch, m: attempt.report(epoch, m[objective]),
                               state_path=attempt.state, state_every_s=cfg.sweep.state_every_s)
                value = self.record(trial, run, result)
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

    def record(self, trial: optuna.Trial, run: RunTracker, result: Result) -> float:
        """A trial's result in both stores (the champion is registered when the sweep ends: `register_champion`)."""
        if result.status != "finished":
            trial.set_user_attr("fail_reason", result.message)
            raise TrialDiverged(result.message)
        objective = self.inputs.cfg.sweep.objective
        value = result.metrics[objective]
        for k in ("val/accuracy", "val/f1_macro", "test/accuracy", "test/f1_macro", "best_epoch", "epochs_run"):
            trial.set_user_attr(k, result.metrics[k])
        run.log_result(result)
        return value


def register_champion(study: optuna.Study, inputs: Inputs, tracker: StudyTracker, log: Callable[[str], None]) -> None:
    """When a sweep ends: register the study's best complete trial as the champion if it beats the registered one,
    with a signature, an input example and its confusion matrix as a picture (drawn for the champion only: every
    run keeps the numbers in evaluation/confusion_matrix.json)."""
    import json
    import tempfile

    from fine_tune import registry

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return
    best = best_of(complete)
    run_id = best.user_attrs["mlflow_run_id"]
    splits, _ = inputs.for_run(Config.model_validate({**inputs.cfg.model_dump(), **best.params}))
    version = registry.register_best(tracker.client, inputs.cfg.study, run_id, best.value, inputs.cfg.sweep.objective,
                                     best.number, splits.val.x[:2])
    if version is None:
        current = registry.champion(tracker.client, inputs.cfg.study)
        log(f"champion unchanged: version {current.version} (trial {current.tags.get('optuna.trial_number')}) is at "
            f"least as good as trial {best.number}")
        return
    study.set_user_attr("champion_trial", best.number)
    run = RunTracker(tracker.client, run_id)
    run.set_tags({"fine_tune.champion": f"version {version}"})
    with tempfile.TemporaryDirectory() as tmp:
        matrix = json.loads(Path(run._artifacts().download_artifacts("evaluation/confusion_matrix.json", tmp))
                            .read_text())
        run.log_file(figures.confusion_png(matrix["matrix"], matrix["class_names"], Path(tmp) / "confusion_matrix.png"),
                     "evaluation")
    log(f"champion: trial {best.number} ({inputs.cfg.sweep.objective} {best.value:.4f}) registered as "
        f"{inputs.cfg.study} version {version}, alias @champion")


# --- the sweep


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


def _cell(value: Any, distribution, width: int) -> str:
    if value is None:
        return f"{'-':>{width}s}"
    if isinstance(value, float):
        return f"{value:>{width}.2e}" if getattr(distribution, "log", False) else f"{value:>{width}.4g}"
    return f"{value!s:>{width}s}"


def top_table(study: optuna.Study, k: int = 10) -> str:
    """The best finished trials first, then pruned and failed ones, with every searched hyperparameter; pruned
    trials show their last reported value."""
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]

    def shown(t: optuna.trial.FrozenTrial) -> float | None:
        if t.state == TrialState.PRUNED and t.intermediate_values:
            return t.intermediate_values[t.last_step]
        return t.value

    trials.sort(key=lambda t: (t.state != TrialState.COMPLETE, -(shown(t) or -1.0)))
    best = best_of(trials).number if any(t.state == TrialState.COMPLETE for t in trials) else None
    distributions = {name: d for t in reversed(trials) for name, d in t.distributions.items()}
    names = list(dict.fromkeys(name for t in trials for name in t.distributions))
    widths = [max(9, len(n)) for n in names]
    head = f"{'trial':>5s} " + " ".join(f"{n:>{w}s}" for n, w in zip(names, widths)) + f" {'val F1':>7s} {'val acc':>7s}  state"
    rows = [head, "-" * len(head)]
    for t in trials[:k]:
        f1, acc = t.user_attrs.get("val/f1_macro", shown(t)), t.user_attrs.get("val/accuracy")
        rows.append(f"{t.number:5d} " + " ".join(_cell(t.params.get(n), distributions[n], w) for n, w in zip(names, widths))
                    + f" {'-' if f1 is None else format(f1, '.4f'):>7s} {'-' if acc is None else format(acc, '.4f'):>7s}"
                    + f"  {t.state.name}" + ("  <- best, champion" if t.number == best else ""))
    return "\n".join(rows)


def sweep_worker(inputs: Inputs, target: int, max_trials: int, log: Callable[[str], None], progress: bool,
                 study: optuna.Study, tracker: StudyTracker) -> None:
    """One worker: run trials of the study until it holds `target` finished (complete or pruned) trials. The parent
    run is the launcher's to close; a worker only adds child runs under it."""
    cfg = inputs.cfg
    # Optuna would log a traceback per failed trial; we say it in one line below and keep the reason in MLflow.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    train_warm_up()
    # How long to wait on other workers' trials (a trial of this study, or a dead worker's grace period) and on a
    # tracking server that went away, at most.
    patience_s = 3 * (cfg.sweep.grace_period + cfg.sweep.heartbeat_interval) + 600
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

    lock = ClaimLock(optuna_url(cfg.runs_dir, cfg.sweep.storage), cfg.study, cfg.runs_dir)
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
    cfg = inputs.cfg
    try:
        with interruptible((signal.SIGTERM,)):
            sweep_worker(inputs, target, max_trials, lambda s: None, False, open_study(cfg, seed_offset=1000 * worker),
                         StudyTracker(cfg.study, tracking_uri(cfg.runs_dir)))
    except KeyboardInterrupt:
        sys.exit(143)


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
    uri = tracking_uri(cfg.runs_dir)
    check_reachable(uri)
    check_sqlite(uri, "MLflow store", "a first run")  # before the Optuna study exists: a broken store writes nothing
    inputs = resolve_inputs(cfg, log)
    study = open_study(cfg)
    tracker = StudyTracker(cfg.study, uri)  # the parent run exists before any worker starts
    tracker.describe()
    tracker.define(definition(cfg, n_trials))
    tracker.parent.log_datasets(inputs.all_datasets())  # before any worker: see RunTracker.log_datasets
    n = n_trials or cfg.sweep.n_trials or 10**9
    target = finished(study) + n
    max_trials = 2 * n + 10  # bounds a study whose trials keep failing
    log(f"study {cfg.study}: {len(study.trials)} trials so far in {optuna_url(cfg.runs_dir, cfg.sweep.storage)}; "
        f"running until {n} more finish{f' (timeout {cfg.sweep.timeout:g}s)' if cfg.sweep.timeout else ''} with "
        f"{workers} worker(s) | MLflow {uri}")
    status = "KILLED"
    try:
        with interruptible():
            if workers <= 1:
                sweep_worker(inputs, target, max_trials, log, progress, study, tracker)
            else:
                bar = tqdm(total=target, initial=finished(study), desc=f"{cfg.study} x{workers}", unit="trial",
                           disable=not progress, dynamic_ncols=True)
                try:
                    run_processes(_worker_process, (inputs, target, max_trials), workers, study, target,
                                  cfg.sweep.grace_period + cfg.sweep.heartbeat_interval,
                                  progress=lambda n: (setattr(bar, "n", n), bar.refresh()))
                finally:
                    bar.close()
            register_champion(study, inputs, tracker, log)
            tracker.describe_result(description(study, cfg))
            status = "FINISHED"
    finally:
        tracker.close(status)
    return study
