"""Experiment tracking behind one small interface; MLflow is imported here and nowhere else in fine_tune.

`NullTracker` does nothing, so the training loop never asks `if tracking:`. `StudyTracker` keeps one MLflow tree per
Optuna study: one parent run (found again by tag on resume) and one child run per trial, created with an explicit
parent id so workers in other processes attach to the same tree. `run_scope` is the one lifecycle of a child run:
open, feed, and close with the status that says how it ended, never left RUNNING. The registry holds each study's
champion model.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from fine_tune.interrupts import shielded, store_write
from fine_tune.stores import artifact_location, mlflow_client

PARENT_TAG = "fine_tune.role"
CHAMPION = "champion"


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class NullTracker:
    """Accepts everything, records nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


def metric_key(name: str) -> str:
    """Class names such as 'T-shirt/top' become valid, unambiguous metric-key parts."""
    return name.replace("/", "_")


class RunTracker:
    """One MLflow run, written through the client with an explicit run id (safe across processes)."""

    FLUSH_EVERY_S = 1.0  # curves stay live in the UI, without one database write per epoch of a short trial

    def __init__(self, client, run_id: str, artifact_uri: str | None = None):
        self.client, self.run_id, self.artifact_uri = client, run_id, artifact_uri
        self.buffer: list = []
        self.last_flush = time.monotonic()
        self.logged_through: int | None = None  # set on a retry: epochs the run holds, not to be logged again
        self.params: dict[str, Any] = {}  # waiting for the next flush
        self.ended = False

    @store_write
    def write_params(self, params: dict[str, Any]) -> None:
        """Log `params` now (MLflow takes at most 100 per batch)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log `params` with the next flush of metrics (one write fewer per trial)."""
        self.params |= params

    @store_write
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is not None and self.logged_through is not None and step <= self.logged_through:
            return  # a retry replays from its last saved state: the run already holds this epoch
        self._buffer(metrics, step)

    def _buffer(self, metrics: dict[str, float], step: int | None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        if time.monotonic() - self.last_flush >= self.FLUSH_EVERY_S:
            self.flush()

    @store_write
    def flush(self, tags: dict[str, Any] | None = None) -> None:
        """Write the buffered metrics, and `tags` with them: one transaction per call (MLflow takes at most 1000
        metrics per batch)."""
        from mlflow.entities import Param, RunTag

        pending = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        params = [Param(k, str(v)) for k, v in self.params.items()]
        while self.buffer or pending or params:
            self.client.log_batch(self.run_id, metrics=self.buffer[:1000], params=params[:100], tags=pending)
            del self.buffer[:1000], params[:100]
            pending = []
        self.params = {}
        self.last_flush = time.monotonic()

    @store_write
    def backfill(self, history: list[dict[str, float]]) -> None:
        """Before a retry continues this run: log the epochs of `history` (its saved state) the run does not hold
        (a worker killed between two flushes lost them), and note which epochs it holds, so that the epochs the
        retry replays from its saved state are not logged twice."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "val/f1_macro")}
        for epoch, metrics in enumerate(history, start=1):
            if epoch not in logged:
                self._buffer(metrics, epoch)
        self.flush()
        self.logged_through = max(logged | set(range(1, len(history) + 1)), default=0)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.flush(tags)

    @store_write
    def log_result(self, result) -> None:
        """The end of a finished run: test metrics, per-class F1, best-epoch checkpoint, confusion matrix."""
        import torch

        # The curves' latest points are the last epoch's; `best/...` are the best epoch's, which the checkpoint,
        # the test metrics and Optuna's objective all refer to.
        final = {k: v for k, v in result.metrics.items() if k.startswith("test/") or k in ("best_epoch", "epochs_run")}
        final |= {f"best/{k}": result.metrics[k] for k in ("val/loss", "val/accuracy", "val/f1_macro")}
        final |= {f"test/f1/{metric_key(n)}": f for n, f in result.per_class_f1.items()}
        self._buffer(final, step=result.best_epoch)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "checkpoint").mkdir()
            evaluation = Path(tmp) / "evaluation"
            evaluation.mkdir()
            torch.save(result.model.state_dict(), Path(tmp) / "checkpoint" / "best.pt")
            (evaluation / "per_class_report.json").write_text(json.dumps(result.report, indent=2))
            (evaluation / "confusion_matrix.json").write_text(json.dumps(
                {"class_names": result.class_names, "matrix": result.confusion}))
            (evaluation / "test_predictions.json").write_text(json.dumps(
                {"class_names": result.class_names, "y_true": result.test_true, "y_pred": result.test_pred}))
            self._artifacts().log_artifacts(tmp)

    def _artifacts(self):
        """The run's artifact store, opened from the URI the run was created with: MLflow's client looks the whole
        run up first (metrics included), ~5 ms of a short trial's ~30 ms of MLflow writes."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        if self.artifact_uri is None:  # a run this process did not create (a retry continues it)
            self.artifact_uri = self.client.get_run(self.run_id).info.artifact_uri
        return get_artifact_repository(self.artifact_uri, tracking_uri=self.client.tracking_uri)

    @store_write
    def log_file(self, path: Path, folder: str) -> None:
        self._artifacts().log_artifact(str(path), folder)

    @store_write
    def end(self, status: str, state: str, reason: str | None = None) -> None:
        self.flush({"optuna.trial_state": state} | ({"fine_tune.reason": reason[:5000]} if reason else {}))
        self.client.set_terminated(self.run_id, status=status)
        self.ended = True


def interrupted_or_failed(exc: BaseException) -> tuple[str, str, str]:
    """How a run ends when `exc` stopped it: (MLflow status, Optuna state tag, reason)."""
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", "FAIL", f"interrupted ({type(exc).__name__})"
    return "FAILED", "FAIL", repr(exc)


@contextlib.contextmanager
def run_scope(open_run: Callable[[], RunTracker],
              outcome: Callable[[BaseException], tuple[str, str, str]] = interrupted_or_failed) -> Iterator[RunTracker]:
    """The life of one run: opened under the shield (the run and our handle on it appear together, so a Ctrl-C
    cannot fall between them), yielded to be fed, then closed FINISHED when the block returns or as `outcome(exc)`
    says when an exception (a prune, a divergence, Ctrl-C, a crash) leaves it. A run the block closed itself stays
    as it was, and a Ctrl-C during the final write leaves it FINISHED (it is not closed twice)."""
    run = None
    try:
        with shielded():
            run = open_run()
        yield run
        if not run.ended:
            run.end("FINISHED", "COMPLETE")
    except BaseException as e:
        if run is not None and not run.ended:
            status, state, reason = outcome(e)
            with shielded():
                run.end(status, state, reason)
        raise


def close_run(uri: str, run_id: str, status: str, state: str, reason: str) -> None:
    """Close a run from outside the process that ran it (a worker that died)."""
    RunTracker(mlflow_client(uri), run_id).end(status, state, reason)


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """MLflow's fluent API (log_model, register_model) at `uri`, leaving the process's setting as it was:
    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI, which `stores.tracking_uri` reads as the user's
    choice."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def warm_up() -> None:
    """Do now what the first champion of a worker would otherwise do inside its trial: import mlflow.pytorch, and
    let MLflow map the installed packages to modules, which it does once per process when it checks a logged
    model's requirements (~0.5-0.8 s in this 5 GB venv)."""
    import mlflow.pytorch  # noqa: F401

    try:  # a private helper: if a later MLflow moves it, the first champion just pays the cost again
        from mlflow.utils.requirements_utils import _init_modules_to_packages_map
    except ImportError:
        return
    _init_modules_to_packages_map()


class StudyTracker:
    """The MLflow side of one Optuna study: experiment = study name, one parent run, a child per trial.

    `uri` is resolved (and checked reachable) by the caller, once per sweep."""

    def __init__(self, study_name: str, uri: str):
        # MLflow's INFO lines (table creation, model registration) would break the sweep's progress bar.
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        self.study_name, self.uri = study_name, uri
        self.client = mlflow_client(uri)
        exp = self.client.get_experiment_by_name(study_name)
        if exp is None:
            from mlflow.exceptions import MlflowException

            try:
                self.experiment_id = self.client.create_experiment(study_name, artifact_location=artifact_location(uri))
            except MlflowException:  # another worker created it first
                self.experiment_id = self.client.get_experiment_by_name(study_name).experiment_id
        else:
            self.experiment_id = exp.experiment_id
        self.parent = RunTracker(self.client, self._parent_run_id())

    def _parent_run_id(self) -> str:
        """The study's one parent run: found again by tag on resume, created only the first time.

        Workers on several machines may start at once and each create one; all of them then settle on the
        earliest, and a worker whose own run lost deletes it, so the tree keeps exactly one parent.
        """
        def parents():
            return self.client.search_runs([self.experiment_id], order_by=["attributes.start_time ASC"],
                                           filter_string=f"tags.`{PARENT_TAG}` = 'study' and "
                                                         f"tags.`optuna.study_name` = '{self.study_name}'")

        found = parents()
        if not found:
            mine = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                          tags={PARENT_TAG: "study", "optuna.study_name": self.study_name})
            found = sorted(parents(), key=lambda r: (r.info.start_time, r.info.run_id))
            if found[0].info.run_id != mine.info.run_id:
                self.client.delete_run(mine.info.run_id)
        run_id = found[0].info.run_id
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    @store_write
    def start_run(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> RunTracker:
        """A child run of the study's parent, created with an explicit parent id (works from any process)."""
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.parent.run_id,
                                           "optuna.study_name": self.study_name, **tags})
        child = RunTracker(self.client, run.info.run_id, run.info.artifact_uri)
        try:
            child.write_params(params)
        except Exception as e:  # the caller never gets this run to close: close it here
            child.end("FAILED", "FAIL", f"logging its params failed: {e!r}")
            raise
        return child

    def start_trial(self, number: int, params: dict[str, Any]) -> RunTracker:
        return self.start_run(f"{self.study_name}/t{number:03d}", {PARENT_TAG: "trial", "optuna.trial_number": str(number),
                                                                   "optuna.trial_state": "RUNNING"}, params)

    @store_write
    def reopen(self, run_id: str, retry_number: int) -> RunTracker:
        """Continue a trial's run after its worker died: the retry logs into the same run."""
        self.client.update_run(run_id, status="RUNNING")
        run = RunTracker(self.client, run_id)
        run.set_tags({"optuna.trial_state": "RUNNING", "optuna.retry_trial_number": retry_number})
        return run

    @store_write
    def summarise(self, summary: dict[str, Any]) -> None:
        """Refresh the parent run's summary (best value and params, counts by state)."""
        metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.parent.log_metrics(metrics, step=summary.get("trials_complete", 0))
        self.parent.flush({f"summary.{k}": v for k, v in summary.items() if k not in metrics})

    @store_write
    def promote(self, child: RunTracker, model, value: float, objective: str, trial_number: int) -> bool:
        """Register `model` as the study's champion if `value` beats the current champion's; say whether it did."""
        import mlflow
        import torch

        current = self.champion()
        if current is not None and float(current.tags.get("objective_value", "-inf")) >= value:
            return False
        with _fluent_uri(self.uri), mlflow.start_run(run_id=child.run_id):
            info = mlflow.pytorch.log_model(
                model, name="model", serialization_format="pickle",
                code_paths=[str(Path(__file__).resolve().parent)],  # the Net class travels with the model
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])
        with _fluent_uri(self.uri), contextlib.redirect_stderr(io.StringIO()):  # it prints "Successfully registered"
            version = mlflow.register_model(info.model_uri, self.study_name,
                                            tags={"objective": objective, "objective_value": str(value),
                                                  "optuna.trial_number": str(trial_number), "run_id": child.run_id})
        # Workers promote concurrently: point the alias at the best version registered so far, so that whichever
        # worker writes last, the alias ends on the true best.
        from mlflow.exceptions import MlflowException

        for attempt in range(3):
            versions = self.client.search_model_versions(f"name='{self.study_name}'")
            best = max(versions, key=lambda v: float(v.tags.get("objective_value", "-inf")))
            try:
                self.client.set_registered_model_alias(self.study_name, CHAMPION, best.version)
                break
            except MlflowException:  # two workers created the alias at once (the store's unique key): look again
                if attempt == 2:
                    raise
        return best.version == version.version

    def champion(self):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.study_name, CHAMPION)
        except MlflowException:  # no registered model or no alias yet
            return None

    @store_write
    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent.run_id, status=status)
