"""The MLflow side on a real SQLite store: a run's lifecycle under every way it can end, retries, refused params."""
import json
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from fine_tune.track.interrupts import interrupt, rearm, shielded
from fine_tune.track.stores import tracking_uri
from fine_tune.track.tracking import run_scope
from fine_tune.track.tree import StudyTracker


@pytest.fixture
def tracker(tmp_path):
    t = StudyTracker("tracked", tracking_uri(tmp_path / "runs"))
    yield t
    t.close()


def status_of(tracker, run_id):
    run = tracker.client.get_run(run_id)
    return run.info.status, run.data.tags.get("optuna.trial_state"), run.data.tags.get("fine_tune.reason")


@pytest.mark.parametrize("raised,expected", [
    (None, ("FINISHED", "COMPLETE", None)),
    (KeyboardInterrupt(), ("KILLED", "FAIL", "interrupted (KeyboardInterrupt)")),
    (ValueError("boom"), ("FAILED", "FAIL", "ValueError('boom')")),
])
def test_run_scope_closes_the_run_however_the_block_ends(tracker, raised, expected):
    handle = {}

    def block():
        with run_scope(lambda: tracker.start_trial(0, {"lr": 0.1})) as run:
            handle["run"] = run
            run.log_metrics({"val/f1_macro": 0.5}, step=1)
            if raised:
                raise raised
    if raised:
        with pytest.raises(type(raised)):
            block()
    else:
        block()
    run_id = handle["run"].run_id
    assert status_of(tracker, run_id) == expected
    assert [m.value for m in tracker.client.get_metric_history(run_id, "val/f1_macro")] == [0.5]


def test_a_run_the_block_closed_itself_stays_as_it_was(tracker):
    with run_scope(lambda: tracker.start_trial(0, {})) as run:
        run.end("FAILED", "FAIL", "diverged")
    assert status_of(tracker, run.run_id) == ("FAILED", "FAIL", "diverged")


def test_a_ctrl_c_while_the_run_is_created_closes_it_killed(tracker):
    """The signal lands inside the store write that creates the run (the handler defers it to the write's end): the
    run exists and is closed KILLED, never left RUNNING."""
    created = []

    def create_then_ctrl_c():
        with shielded():
            created.append(tracker.start_trial(0, {}))
            interrupt(KeyboardInterrupt())
        return created[0]
    try:
        with pytest.raises(KeyboardInterrupt):
            with run_scope(create_then_ctrl_c):
                pytest.fail("the block must not run")
    finally:
        rearm()
    assert status_of(tracker, created[0].run_id)[0] == "KILLED"


def test_params_the_training_loop_logs_ride_with_the_next_flush(tracker):
    run = tracker.start_trial(0, {"lr": 0.1})
    run.log_params({"trainable_params": 325})
    assert "trainable_params" not in tracker.client.get_run(run.run_id).data.params
    run.end("FINISHED", "COMPLETE")
    assert tracker.client.get_run(run.run_id).data.params == {"lr": "0.1", "trainable_params": "325"}


def test_a_run_whose_params_the_store_refuses_is_closed_failed(tracker):
    """MLflow refuses a param name over its length limit after the run exists: the caller never gets the run, so
    start_run closes it FAILED instead of leaving it RUNNING."""
    with pytest.raises(MlflowException):
        tracker.start_run("refused/t000", {"fine_tune.role": "trial"}, {"lr": 0.01, "x" * 300: 1})
    runs = tracker.client.search_runs([tracker.experiment_id], "tags.`fine_tune.role` = 'trial'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "logging its params, config or inputs failed" in runs[0].data.tags["fine_tune.reason"]


def test_a_retry_logs_each_epoch_once(tracker):
    """A worker flushed epochs 1-3 and died; its saved state holds epochs 1-2. The retry replays from epoch 3 into
    the same run: the run ends with each epoch once."""
    history = [{"val/f1_macro": 0.1 * e, "train/loss": 1.0 / e} for e in range(1, 6)]
    first = tracker.start_trial(0, {"lr": 0.01})
    for epoch in (1, 2, 3):
        first.log_metrics(history[epoch - 1], step=epoch)
    first.flush()
    first.log_metrics(history[3], step=4)  # buffered, lost with the worker

    retry = tracker.reopen(first.run_id, 1)
    retry.backfill(history[:2])  # the saved state
    for epoch in (3, 4, 5):  # the replay from the state
        retry.log_metrics(history[epoch - 1], step=epoch)
    retry.end("FINISHED", "COMPLETE")
    for key in ("val/f1_macro", "train/loss"):
        points = tracker.client.get_metric_history(first.run_id, key)
        assert sorted(m.step for m in points) == [1, 2, 3, 4, 5]
        assert all(m.value == history[m.step - 1][key] for m in points)



def test_a_retry_that_completes_does_not_keep_the_reason_of_the_attempt_before(tracker):
    """Item 16: the run of a trial whose worker died is closed FAILED with the reason; the retry continues it and
    ends complete, with that reason kept only as `fine_tune.retried_after`."""
    run = tracker.start_trial(0, {"lr": 0.01})
    run.end("FAILED", "FAIL", "worker stopped heartbeating during trial 0; the trial was re-queued")
    retry = tracker.reopen(run.run_id, 1)
    retry.end("FINISHED", "COMPLETE")
    tags = tracker.client.get_run(run.run_id).data.tags
    assert "fine_tune.reason" not in tags and tags["fine_tune.outcome"] == "complete"
    assert tags["fine_tune.retried_after"].startswith("worker stopped heartbeating")


def test_two_launchers_defining_the_study_at_once_both_go_on(tmp_path, monkeypatch):
    """Two sweeps started together both read the parent's params as empty, then both write them: the second write
    collides with the first (seen in `make test` next to CPU-bound processes). The loser reads them again and goes
    on, recording what differs, instead of ending its sweep with a traceback."""
    uri = tracking_uri(str(tmp_path))
    first, second = StudyTracker("race", uri), StudyTracker("race", uri)
    assert first.parent.run_id == second.parent.run_id  # both settled on one parent run
    before = second.client.get_run(second.parent.run_id)  # read before the first one writes: no params yet
    first.define({"n_trials": 5, "sampler": "tpe"})
    real = second.client.get_run
    reads = iter([before])
    monkeypatch.setattr(second.client, "get_run", lambda run_id: next(reads, None) or real(run_id))
    second.define({"n_trials": 5, "sampler": "random"})
    run = real(first.parent.run_id)
    assert run.data.params == {"n_trials": "5", "sampler": "tpe"}  # the first definition stands
    assert run.data.tags["fine_tune.definition_changed"] == "sampler"


def test_every_change_of_the_study_definition_is_recorded_on_the_parent(tracker, tmp_path):
    """Issue 22 item 16: a search dimension added or dropped by a later sweep was recorded nowhere (only changed
    values of keys already logged were, and the tag never went). The parent keeps the first definition as params,
    each sweep's own as `definition.json`, and names every changed, added and removed key until they agree again."""
    def artifact(n):
        (tmp_path / str(n)).mkdir()
        return json.loads(Path(tracker.client.download_artifacts(tracker.parent.run_id, "definition.json",
                                                                 str(tmp_path / str(n)))).read_text())

    def changed():
        return tracker.client.get_run(tracker.parent.run_id).data.tags.get("fine_tune.definition_changed")

    first = {"sampler": "tpe", "n_trials": 5, "search.lr": "{low: 0.001}", "search.head_size": "[0, 16]"}
    later = {"sampler": "random", "n_trials": 9, "search.lr": "{low: 0.001}", "search.weight_decay": "{low: 0.0}"}
    tracker.define(first)
    assert changed() is None and artifact(1) == first
    tracker.define(later)
    assert tracker.client.get_run(tracker.parent.run_id).data.params == {k: str(v) for k, v in first.items()}
    assert changed() == "sampler, search.head_size (removed), search.weight_decay (added)"  # n_trials is per sweep
    assert artifact(2) == later
    tracker.define(first)  # back to the first: nothing differs any more
    assert changed() is None and artifact(3) == first
