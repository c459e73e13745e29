"""Who runs which trial: the claim loop one worker runs, worker processes on one machine, and what becomes of a
trial whose worker stopped (reaped when its heartbeat goes stale, its run closed, the trial re-queued and resumed
from its saved state by the next worker that claims it).
"""
from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from fine_tune.errors import WorkerDied
from fine_tune.learn.train import reached
from fine_tune.names import worker_id
from fine_tune.track.outages import storage_lost
from fine_tune.track.stores import mlflow_client, quiet_experimental, trial_counts
from fine_tune.track.tracking import RunTracker, close_run
from fine_tune.track.tree import StudyTracker, running_trial_runs

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)



def finished(study: optuna.Study) -> int:
    return sum(trial_counts(study)[s] for s in FINISHED)


# --- a trial whose worker stopped: closed, re-queued, resumed


class CloseStaleTrial:
    """A trial whose worker stopped heartbeating: close its MLflow run as FAILED, then re-queue it.

    Optuna's retry callback enqueues a copy with the same params and user attrs (so the retry finds the MLflow
    run id and the epoch checkpoint of the trial it continues).
    """

    def __init__(self, tracking_uri: str | None, max_retry: int = 2):
        self.tracking_uri = tracking_uri
        with quiet_experimental():
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.tracking_uri:
            for run_id in runs_of_trial(self.tracking_uri, study.study_name, trial):
                close_run(self.tracking_uri, run_id, "FAILED", "FAIL",
                          f"worker stopped heartbeating during trial {trial.number}; the trial was re-queued")
        with quiet_experimental():
            self.retry(study, trial)


def runs_of_trial(uri: str, study_name: str, trial: optuna.trial.FrozenTrial) -> list[str]:
    """The MLflow runs of a trial whose worker died: the one it recorded, and any RUNNING run tagged with its number
    (a worker killed between creating the run and recording its id leaves one only the tag finds)."""
    found = {trial.user_attrs["mlflow_run_id"]} if trial.user_attrs.get("mlflow_run_id") else set()
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(study_name)
    if experiment is not None:
        found |= set(running_trial_runs(client, experiment.experiment_id, trial.number))
    return sorted(found)


def reap(study: optuna.Study) -> None:
    """Fail the study's trials whose heartbeat is stale (CloseStaleTrial then closes and re-queues each)."""
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)


def _frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return trial.study._storage.get_trial(trial._trial_id)  # this one trial, not the whole study


class Attempt:
    """One attempt at a trial: the first, or a retry of a trial whose worker died or was interrupted. A retry
    continues the original trial's MLflow run and its saved training state, and does not report again the epochs
    Optuna already holds."""

    def __init__(self, trial: optuna.Trial, state_dir: Path, objective: str):
        frozen = _frozen(trial)
        self.trial, self.objective = trial, objective
        self.original = frozen.system_attrs.get("failed_trial")  # set on a retry: the number of the trial continued
        self.state = state_dir / f"t{trial.number if self.original is None else self.original:03d}.pt"
        self.inherited = set(frozen.intermediate_values)
        self.history: list[dict[str, float]] = []  # the epochs the training holds: its saved state's, then each one run
        self.run: RunTracker | None = None
        trial.set_user_attr("worker", worker_id())  # who runs it, for debugging

    def open_run(self, tracker: StudyTracker, params: dict, record: tuple) -> RunTracker:
        """The trial's MLflow run: a new child run (with `record`, see RunTracker.record), or on a retry the run of the
        trial it continues."""
        from fine_tune.learn import checkpoints

        if self.original is not None and "mlflow_run_id" in self.trial.user_attrs:
            run = tracker.reopen(self.trial.user_attrs["mlflow_run_id"], self.trial.number)
        elif self.original is not None and (lost := self._lost_runs(tracker)):
            # an earlier attempt created its run, but the tracking server went away before the id reached Optuna:
            # continue that run (whatever of its params and inputs it missed is written now) instead of leaving it
            # RUNNING beside a new one
            run = tracker.reopen(lost[0], self.trial.number)
            run.write_params(params)
            run.record(*record)
            self.trial.set_user_attr("mlflow_run_id", run.run_id)
            for extra in lost[1:]:  # more than one attempt lost its run that way: one continues, the others close
                RunTracker(tracker.client, extra).end("FAILED", "FAIL", f"superseded: trial {self.trial.number} "
                                                                        f"continues run {run.run_id}")
        else:
            run = tracker.start_trial(self.trial.number, params, record)
            self.trial.set_user_attr("mlflow_run_id", run.run_id)
        if self.original is not None:  # its run may hold epochs of the attempt that stopped, or miss some
            self.history = list(checkpoints.load_any(self.state)["history"]) if self.state.is_file() else []
            run.backfill(self.history)
        self.run = run
        return run

    def _lost_runs(self, tracker: StudyTracker) -> list[str]:
        """The RUNNING runs of the earlier attempts at this trial (see `requeue`), found by their trial numbers."""
        attempts = _frozen(self.trial).system_attrs.get("attempts", [self.original])
        return [run_id for number in attempts
                for run_id in running_trial_runs(tracker.client, tracker.experiment_id, number)]

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        """Report an epoch's objective to Optuna (once) and stop the trial if the pruner says so. A pruned trial's run
        first logs what it reached, as a finished one does: its best epoch's scores, not its last epoch's."""
        self.history.append(metrics)
        if epoch not in self.inherited:
            self.trial.report(metrics[self.objective], epoch)
        if self.trial.should_prune():
            self.run.log_reached(reached(self.history))
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    def requeue(self) -> None:
        """Queue the interrupted trial again, marked as a retry of the trial it continues, as Optuna's retry callback
        would; the epochs it reported so far go with it."""
        trial = self.trial
        frozen = _frozen(trial)
        # the attempts so far, whose run the retry looks for when this one's id never reached Optuna
        attempts = [*frozen.system_attrs.get("attempts", []), trial.number]
        trial.study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs=dict(trial.user_attrs),
            system_attrs={"failed_trial": trial.number if self.original is None else self.original,
                          "attempts": attempts},
            intermediate_values=dict(frozen.intermediate_values)))


# --- claiming trials


class ClaimLock:
    """A cross-process lock around "count the trials, then ask for one": a PostgreSQL advisory lock on PostgreSQL
    (workers on any machine), a file lock beside the local stores otherwise. The file lock is a blocking
    fcntl.flock, which the kernel hands to the waiting worker the moment it is released: the filelock package polls
    instead (every 50 ms by default): two orders of magnitude more waiting over a two-worker sweep of short trials
    (`python -m benchmarks.lockbench`; the README gives the measured numbers).

    `patiently` runs each lock call through an outage of the database (outages.patient): the server drops the lock
    with the connection, so the call connects again and locks again."""

    def __init__(self, url: str, study: str, runs_dir: str, patiently: Callable = lambda call, *a: call(*a)):
        self.held, self.engine, self.conn, self.file, self.patiently = False, None, None, None, patiently
        self.key = int.from_bytes(hashlib.sha256(study.encode()).digest()[:8], "big", signed=True)
        if url.startswith("postgresql"):
            import sqlalchemy

            self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
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
        if self.engine is not None:
            self.patiently(self._advisory, held)
        else:
            fcntl.flock(self.file, fcntl.LOCK_EX if held else fcntl.LOCK_UN)
        self.held = held

    def _advisory(self, held: bool) -> None:
        import sqlalchemy

        if self.conn is None:
            if not held:  # the connection that held the lock was dropped, and the lock with it
                return
            self.conn = self.engine.connect()
        fn = "pg_advisory_lock" if held else "pg_advisory_unlock"
        try:
            self.conn.execute(sqlalchemy.text(f"SELECT {fn}(:k)"), {"k": self.key})
            self.conn.commit()
        except Exception as e:
            self.conn.close()
            self.conn = None
            if held or not storage_lost(e):
                raise
            # unlocking on a connection the server dropped: the lock went with it

    def close(self) -> None:
        self.release()
        if self.conn is not None:
            self.conn.close()
        if self.engine is not None:
            self.engine.dispose()
        if self.file is not None:
            self.file.close()


def work(study: optuna.Study, objective, lock: ClaimLock, target: int, max_trials: int, timeout: float | None,
         patience_s: float, callbacks: list, catch: tuple, log: Callable[[str], None] = print) -> None:
    """One worker's loop: claim and run trials until the study holds `target` finished (complete or pruned) ones.

    Workers claim under `lock` (check the count, then ask) so that together they run exactly `target` finished
    trials; in-flight trials of other workers count as claimed until they finish or go stale. `objective` releases
    the lock once its trial exists in the storage. `patience_s` bounds the wait on other workers' trials.
    """
    started, attempts, waited_since, last_seen = time.monotonic(), 0, None, -1
    try:
        while attempts < max_trials and not (timeout and time.monotonic() - started > timeout):
            lock.acquire()
            counts = trial_counts(study)  # one read: a trial may finish between two
            done, running = sum(counts[s] for s in FINISHED), counts[TrialState.RUNNING]
            if done >= target:
                break
            if done + running >= target:  # wait for the others' trials (or for a dead worker's to go stale)
                lock.release()
                if waited_since is None or done != last_seen:  # progress resets the clock
                    waited_since, last_seen = time.monotonic(), done
                if time.monotonic() - waited_since > patience_s:
                    log(f"stopping: {running} trial(s) of other workers made no progress for {patience_s:.0f}s")
                    break
                reap(study)
                time.sleep(1.0)
                continue
            waited_since = None
            study.optimize(objective, n_trials=1, callbacks=callbacks, catch=catch)
            lock.release()
            attempts += 1
    finally:
        lock.close()


# --- worker processes on this machine


def run_processes(main: Callable, args: tuple, workers: int, study: optuna.Study, target: int, grace_s: float,
                  progress) -> None:
    """Run `main(*args, workers, worker_number)` in `workers` spawned processes until they end; `progress(n)` is
    given the study's finished count every second. Ctrl-C stops every worker (each closes its own trial). Workers
    that died leave trials whose heartbeat goes stale: after `grace_s` they are reaped (failed, their runs closed,
    re-queued) and WorkerDied says so."""
    ctx = multiprocessing.get_context("spawn")  # no forked torch/sqlite state shared between workers
    procs = [ctx.Process(target=main, args=(*args, workers, i + 1)) for i in range(workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            progress(min(finished(study), target))
    except KeyboardInterrupt:
        for p in procs:  # each worker closes its own trial and run, then exits
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join()
        raise
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if failed:
        time.sleep(grace_s)
        reap(study)
        raise WorkerDied(f"{len(failed)} of {workers} workers died (exit codes {failed}); their trials were failed "
                         "and re-queued; run the same command again to finish them")
