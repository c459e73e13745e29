"""One MLflow run and its one lifecycle. `RunTracker` writes a run through the client with an explicit run id (safe
across processes) and satisfies the training loop's `Tracker` protocol; `run_scope` opens a run, lets it be fed and
closes it with the status that says how it ended, never RUNNING; `train_in_run` is that lifecycle around a training
run, for every kind of run (trials, `make train`, `make rerun`, confirm, curve). The study's tree is `tree.py`.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from fine_tune.names import BEST_EXACT, OUTCOME, REASON, TRIAL_STATE, metric_keys
from fine_tune.track import system_metrics
from fine_tune.track.interrupts import shielded, store_write
from fine_tune.track.stores import artifact_location, mlflow_client

class RunTracker:
    """One MLflow run, written through the client with an explicit run id (safe across processes)."""

    FLUSH_EVERY_S = 1.0  # curves stay live in the UI, without one database write per epoch of a short trial

    def __init__(self, client, run_id: str, artifact_uri: str | None = None):
        self.client, self.run_id, self.artifact_uri = client, run_id, artifact_uri
        self.buffer: list = []
        self.last_flush = time.monotonic()
        self.logged_through: int | None = None  # set on a retry: epochs the run holds, not to be logged again
        self.params: dict[str, Any] = {}  # waiting for the next flush
        self.tags: dict[str, Any] = {}  # likewise
        self.ended = False
        self.monitor = None  # its system metrics, sampled while it lives (`watch`)

    def watch(self, resume: bool = False) -> None:
        """Sample what the run costs the machine (system/... metrics) until it ends; `resume` for a run continued."""
        self.monitor = system_metrics.watch(self.client, self.run_id, resume)

    def unwatch(self) -> None:
        """Stop sampling; the last samples join the buffer, for the run's next (final) write."""
        monitor, self.monitor = self.monitor, None
        self.buffer += system_metrics.stop(monitor)

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

        pending = [RunTag(k, str(v)) for k, v in {**self.tags, **(tags or {})}.items()]
        params = [Param(k, str(v)) for k, v in self.params.items()]
        while self.buffer or pending or params:
            self.client.log_batch(self.run_id, metrics=self.buffer[:1000], params=params[:100], tags=pending)
            del self.buffer[:1000], params[:100]
            pending = []
        self.params, self.tags = {}, {}
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
    def log_reached(self, reached: dict[str, float]) -> None:
        """What the run reached (`learn.train.reached`): the best epoch's `best/val/*`, `best_epoch`, `epochs_run`.
        A finished run and a pruned one log the same keys, so one column of the runs table compares every trial.
        The curves' latest points are the last epoch's; these are single values, logged at step 0: the UI draws a
        metric whose steps are all 0 as a value (a bar), not as a one-dot line among the per-epoch curves."""
        self._buffer({**{f"best/{k}": reached[k] for k in ("val/loss", "val/accuracy", "val/f1_macro")},
                      "best_epoch": reached["best_epoch"], "epochs_run": reached["epochs_run"]}, step=0)
        # The UI shows a metric to 3 decimals (`#/compare-runs` too), too few to tell the top trials apart; a tag's
        # text is shown whole. They ride the run's next write.
        self.tags |= {f"{BEST_EXACT}{k}": f"{reached[k]:.6f}" for k in ("val/loss", "val/accuracy", "val/f1_macro")}

    @store_write
    def log_result(self, result) -> None:
        """The end of a finished run: what it reached, test metrics, per-class F1, best-epoch checkpoint, confusion
        matrix. `best/...` are the best epoch's, which the checkpoint, the test metrics and Optuna's objective all
        refer to."""
        import torch

        self.log_reached(result.metrics)
        final = {k: v for k, v in result.metrics.items()
                 if k.startswith(("test/", "memory/")) or k in ("threads", "trainable_params")}
        keys = metric_keys("test/f1/", list(result.per_class_f1))
        final |= {keys[n]: f for n, f in result.per_class_f1.items()}
        self._buffer(final, step=0)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "checkpoint").mkdir()
            evaluation = Path(tmp) / "evaluation"
            evaluation.mkdir()
            torch.save(result.model.state_dict(), Path(tmp) / "checkpoint" / "best.pt")
            (evaluation / "per_class_report.json").write_text(json.dumps(result.report, indent=2))
            (evaluation / "per_class_f1.json").write_text(json.dumps(  # the metric key of each class name
                [{"class": n, "metric": keys[n], "f1": f} for n, f in result.per_class_f1.items()], indent=2))
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

    def download(self, artifact: str, folder: str | Path) -> Path:
        """One of the run's artifacts, downloaded into `folder`."""
        return Path(self._artifacts().download_artifacts(artifact, str(folder)))

    @store_write
    def log_file(self, path: Path, folder: str | None = None) -> None:
        self._artifacts().log_artifact(str(path), folder)

    @store_write
    def log_texts(self, files: dict[str, str]) -> None:
        """Small text artifacts ({relative path: content}) in one call."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_text(text)
            self._artifacts().log_artifacts(tmp)

    @store_write
    def log_datasets(self, datasets: list[tuple[str, str, str, str]]) -> None:
        """Datasets (name, digest, context, source) as the run's inputs (the UI's Dataset column). MLflow creates a
        dataset by check-then-insert, so two workers adding the same one at once make one fail on the unique key: it
        tries once more (the launcher also logs the study's datasets on the parent before any worker starts)."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        inputs = [DatasetInput(MetaDataset(LocalArtifactDatasetSource(source), name=name, digest=digest)
                               ._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
                  for name, digest, context, source in datasets]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception:  # noqa: BLE001 - the other writer's dataset is there now; a second failure is real
            self.client.log_inputs(self.run_id, datasets=inputs)

    @store_write
    def record(self, config_yaml: str, datasets: list[tuple[str, str, str, str]]) -> None:
        """What the run is made of: its resolved config as `config.yaml`, and its images as dataset inputs."""
        self.log_datasets(datasets)
        self.log_texts({"config.yaml": config_yaml})

    @store_write
    def end(self, status: str, state: str, reason: str | None = None, note: str | None = None) -> None:
        """Close the run. A pruned run ends KILLED (MLflow has no better status), so its tags and description say it
        was pruned, not killed: `fine_tune.outcome` and `mlflow.note.content` (the UI's description)."""
        outcome = {"PRUNED": reason or "pruned", "COMPLETE": "complete"}.get(state, f"{status.lower()}: {reason}")
        tags = {TRIAL_STATE: state, OUTCOME: outcome[:250]}
        if reason:
            tags[REASON] = reason[:5000]
        if note or state == "PRUNED":
            tags["mlflow.note.content"] = note or (f"**Pruned** ({reason}): the pruner stopped it because its "
                                                   "validation score was below the median of the complete trials at "
                                                   "that epoch. Its per-epoch curves are kept and `best/val/*` "
                                                   "give the best epoch it reached; it has no test metrics.")
        self.unwatch()
        try:
            self.flush(tags)
        except Exception as e:
            self._close_failed(f"its final write failed: {e!r}")
            raise
        self.client.set_terminated(self.run_id, status=status)
        self.ended = True

    def _close_failed(self, reason: str) -> None:
        """Close the run FAILED when its last write fails. What the store refused (a metric it rejects) is dropped,
        not retried: a run left RUNNING would look alive forever and hold a sweep's slot."""
        from mlflow.entities import RunTag

        self.unwatch()
        self.buffer, self.params, self.tags = [], {}, {}
        try:
            tags = {TRIAL_STATE: "FAIL", OUTCOME: f"failed: {reason}"[:250], REASON: reason[:5000]}
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        finally:
            self.client.set_terminated(self.run_id, status="FAILED")
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


def experiment_id(client, name: str) -> str:
    """The experiment `name`, created (with its artifacts beside a local database) if it does not exist yet."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    try:  # a model-training experiment: newer MLflow UIs open it on its runs table (3.17 reads the URL; see `ui`)
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri),
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException:  # another worker created it first
        return client.get_experiment_by_name(name).experiment_id


def open_run(client, experiment: str, name: str, tags: dict[str, str], params: dict[str, Any], verb: str,
             parent_run_id: str | None = None, record: tuple | None = None) -> RunTracker:
    """A new run with its provenance tags (code, environment), params and `record` (see RunTracker.record); closed
    FAILED (and the error raised) if the stores refuse any of it, so no caller is handed a run it would have to
    close."""
    from fine_tune.track.provenance import source_tags

    parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    run = client.create_run(experiment, run_name=name, tags={**source_tags(verb), **parent, **tags})
    created = RunTracker(client, run.info.run_id, run.info.artifact_uri)
    created.watch()
    try:
        created.write_params(params)
        if record is not None:
            created.record(*record)
    except Exception as e:
        created.end("FAILED", "FAIL", f"logging its params, config or inputs failed: {e!r}")
        raise
    return created


def close_run(uri: str, run_id: str, status: str, state: str, reason: str) -> None:
    """Close a run from outside the process that ran it (a worker that died)."""
    RunTracker(mlflow_client(uri), run_id).end(status, state, reason)


def train_in_run(open_run: Callable[[], RunTracker], train: Callable[[RunTracker], Any],
                 outcome: Callable[[BaseException], tuple[str, str, str]] = interrupted_or_failed):
    """Train inside a run: `train(run)` gives a `Result`; a finished one is logged (test metrics, checkpoint,
    evaluation), a diverged one closes the run FAILED with its message. Returns the result and the run."""
    with run_scope(open_run, outcome) as run:
        result = train(run)
        if result.status != "finished":
            run.end("FAILED", "FAIL", result.message)
        else:
            run.log_result(result)
    return result, run
