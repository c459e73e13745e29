"""One MLflow tree per Optuna study: the experiment is the study's name, one parent run (found again by tag on
resume, closed FINISHED or KILLED by `parent_run`) and one child run per trial, created with an explicit parent id so
workers in other processes attach to the same tree.
"""
from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Iterator

from fine_tune.names import OUTCOME, REASON, ROLE, STUDY_NAME, TRIAL, TRIAL_NUMBER, TRIAL_STATE, role_filter
from fine_tune.track.interrupts import interruptible, store_write
from fine_tune.track.stores import mlflow_client
from fine_tune.track.tracking import RunTracker, experiment_id, open_run

DEFINITION_CHANGED = "fine_tune.definition_changed"


def running_trial_runs(client, experiment: str, number: int) -> list[str]:
    """The study's trial runs tagged with trial `number` that are still RUNNING: a run whose id never reached Optuna
    (its worker killed, or the tracking server gone, between creating the run and the trial recording it) is found
    only this way."""
    where = f"tags.`{TRIAL_NUMBER}` = '{number}' and {role_filter(TRIAL)} and attributes.status = 'RUNNING'"
    return sorted(r.info.run_id for r in client.search_runs([experiment], where))


class StudyTracker:
    """The MLflow side of one Optuna study: experiment = study name, one parent run, a child per trial.

    `uri` is resolved (and checked reachable) by the caller, once per sweep."""

    def __init__(self, study_name: str, uri: str, verb: str = "sweep", role: str = "study"):
        """`role`: the parent's `fine_tune.role`, "study" for the sweep's; `make confirm` keeps its re-runs under a
        parent of its own ("confirm"), so the study's parent run's clock is the sweeps'."""
        # MLflow's INFO lines (table creation, model registration) would break the sweep's progress bar, and its
        # database layer logs each error it then raises with a traceback: the raised one is ours to report, in a line.
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self.study_name, self.uri, self.verb, self.role = study_name, uri, verb, role
        self.client = mlflow_client(uri)
        self.experiment_id = experiment_id(self.client, study_name)
        self.parent = RunTracker(self.client, self._parent_run_id())

    def describe(self) -> None:
        """The parent run's provenance: the source tags of this invocation, the environment and a dirty tree's diff
        as artifacts (once per study and change; the children refer to them by hash). The launcher calls it, once."""
        from fine_tune.track.provenance import log_provenance, source_tags

        tags = self.client.get_run(self.parent.run_id).data.tags
        self.parent.set_tags(source_tags(self.verb))
        log_provenance(self.parent, tags)

    def _parent_run_id(self) -> str:
        """The study's one parent run: found again by tag on resume, created only the first time.

        Workers on several machines may start at once and each create one; all of them then settle on the
        earliest, and a worker whose own run lost deletes it, so the tree keeps exactly one parent.
        """
        def parents():
            return self.client.search_runs([self.experiment_id], order_by=["attributes.start_time ASC"],
                                           filter_string=f"tags.`{ROLE}` = '{self.role}' and "
                                                         f"tags.`{STUDY_NAME}` = '{self.study_name}'")

        found = parents()
        if not found:
            name = self.study_name if self.role == "study" else self.role
            mine = self.client.create_run(self.experiment_id, run_name=name,
                                          tags={ROLE: self.role, STUDY_NAME: self.study_name})
            found = sorted(parents(), key=lambda r: (r.info.start_time, r.info.run_id))
            if found[0].info.run_id != mine.info.run_id:
                self.client.delete_run(mine.info.run_id)
        run_id = found[0].info.run_id
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    @store_write
    def start_run(self, name: str, tags: dict[str, str], params: dict[str, Any], record: tuple | None = None
                  ) -> RunTracker:
        """A child run of the study's parent, created with an explicit parent id (works from any process)."""
        return open_run(self.client, self.experiment_id, name, {STUDY_NAME: self.study_name, **tags}, params,
                        self.verb, self.parent.run_id, record)

    def start_trial(self, number: int, params: dict[str, Any], record: tuple | None = None) -> RunTracker:
        # a short name the runs table does not truncate: the experiment already says the study
        return self.start_run(f"t{number:03d}", {ROLE: TRIAL, TRIAL_NUMBER: str(number),
                                                 TRIAL_STATE: "RUNNING"}, params, record)

    @store_write
    def reopen(self, run_id: str, retry_number: int) -> RunTracker:
        """Continue a trial's run after its worker died: the retry logs into the same run."""
        self.client.update_run(run_id, status="RUNNING")
        run = RunTracker(self.client, run_id)
        tags = self.client.get_run(run_id).data.tags
        for stale in (REASON, OUTCOME):  # why the attempt before stopped: not this one's
            if stale in tags:
                self.client.delete_tag(run_id, stale)
        run.set_tags({TRIAL_STATE: "RUNNING", "optuna.retry_trial_number": retry_number,
                      "fine_tune.retried_after": tags.get(REASON, "")[:250]})
        run.watch(resume=True)
        return run

    @store_write
    def define(self, definition: dict[str, Any]) -> None:
        """The study's definition (search space, sampler, pruner, objective, trial count, seed): the first sweep's as
        the parent's params (MLflow params cannot change), each sweep's own as the artifact `definition.json`, and
        what differs from the first (changed, added and removed keys) in the tag `fine_tune.definition_changed`, which
        goes when nothing does."""
        from mlflow.exceptions import MlflowException

        run = self.client.get_run(self.parent.run_id)
        logged, new = run.data.params, {k: str(v) for k, v in definition.items()}
        if not logged:
            try:
                self.parent.write_params(new)
                logged = new
            except MlflowException:  # two sweeps started together: the other wrote them between our read and write
                logged = self.client.get_run(self.parent.run_id).data.params
                if not logged:
                    raise
        changed = sorted(k for k in new.keys() | logged.keys() if logged.get(k) != new.get(k) and k != "n_trials")
        if changed:
            self.parent.set_tags({DEFINITION_CHANGED: ", ".join(
                k if k in new and k in logged else f"{k} (added)" if k in new else f"{k} (removed)" for k in changed)})
        elif DEFINITION_CHANGED in run.data.tags:  # back to the first definition
            self.client.delete_tag(self.parent.run_id, DEFINITION_CHANGED)
        self.parent.log_texts({"definition.json": json.dumps(definition, indent=2, default=str) + "\n"})

    @store_write
    def describe_result(self, markdown: str) -> None:
        """The parent run's description (the UI's Description, `mlflow.note.content`)."""
        self.parent.set_tags({"mlflow.note.content": markdown})

    @store_write
    def summarise(self, summary: dict[str, Any]) -> None:
        """Refresh the parent run's summary (best value and params, counts by state)."""
        metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.parent.log_metrics(metrics, step=summary.get("trials_complete", 0))
        self.parent.flush({f"summary.{k}": v for k, v in summary.items() if k not in metrics})

    @store_write
    def close(self, status: str = "FINISHED") -> None:
        self.parent.unwatch()
        try:
            self.parent.flush()  # its last system metrics
        finally:
            self.client.set_terminated(self.parent.run_id, status=status)


@contextlib.contextmanager
def parent_run(study_name: str, uri: str, verb: str = "sweep", role: str = "study") -> Iterator[StudyTracker]:
    """The study's parent run for one command (sweep, confirm, curve), with its provenance: closed FINISHED when the
    block returns, KILLED when anything (Ctrl-C, SIGTERM, an error) leaves it. Ctrl-C never lands inside a store
    write meanwhile (`interruptible`)."""
    with interruptible():
        tracker = StudyTracker(study_name, uri, verb=verb, role=role)
        status = "KILLED"
        tracker.parent.watch(resume=True)  # the launcher's machine, for as long as the command runs
        try:
            tracker.describe()
            yield tracker
            status = "FINISHED"
        finally:
            tracker.close(status)
