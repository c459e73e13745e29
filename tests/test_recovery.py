"""Nothing lost when a run stops early: epoch checkpoints, Ctrl-C / SIGTERM, and a worker killed with SIGKILL."""
import os
import signal
import subprocess
import sys

import mlflow
import optuna
import pytest
import sqlalchemy
from helpers import cli_env, runs_of, study_in, untimed, wait_for, write_experiment

from fine_tune.learn.data import splits_for
from fine_tune.learn.train import train
from fine_tune.track.stores import optuna_storage



def test_training_resumes_from_its_epoch_checkpoint(tiny, tmp_path):
    cfg = tiny(epochs=4)
    splits = splits_for(cfg)
    straight = train(cfg, splits)

    def crash(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, splits, on_epoch=crash, state_path=state)
    epochs = []
    resumed = train(cfg, splits, on_epoch=lambda e, m: epochs.append(e), state_path=state)
    assert epochs == [3, 4]  # continued, not restarted
    assert [untimed(h) for h in resumed.history] == [untimed(h) for h in straight.history]
    assert untimed(resumed.metrics) == untimed(straight.metrics)


def start_sweep(tmp_path, *args, **env):
    return subprocess.Popen([sys.executable, "-m", "fine_tune", "sweep", "--config", "e.yaml", *args], cwd=tmp_path,
                            env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def running_trials(tmp_path, study_name: str, epochs: int = 1) -> list:
    """The study's RUNNING trials that have reported at least `epochs` epochs (none before the study exists)."""
    db = tmp_path / "runs" / "optuna.db"
    if not db.exists():
        return []
    try:
        study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db.resolve()}")
        trials = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    except (KeyError, sqlalchemy.exc.OperationalError):  # the sweep is still creating its study or tables
        return []
    return [t for t in trials if len(t.intermediate_values) >= epochs and "worker" in t.user_attrs]


def stores(tmp_path, study):
    return runs_of(tmp_path / "runs", study), study_in(tmp_path / "runs", study)


@pytest.mark.slow
# the resume from the saved state is the same whichever signal saved it: run once, after Ctrl-C
@pytest.mark.parametrize("sig,code,word,resume", [(signal.SIGINT, 130, "interrupted", True),
                                                  (signal.SIGTERM, 143, "terminated", False)])
def test_interrupt_closes_the_trial_and_the_next_sweep_resumes_it(tmp_path, tiny_backbone, sig, code, word, resume):
    # 5,000 images x 60 epochs through the whole network: ~4 s of training, so the signal sent after epoch 3 lands
    # mid-training (with 1,000 images x 40 epochs, ~0.5 s, it could land after the last epoch, while the result was
    # being logged; so could it when the sampled trial froze layers and trained a cached head only, on a loaded
    # machine where noticing epoch 3 took longer than the remaining 57 epochs)
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="stop", budget=1000, epochs=60, n_trials=1)
    with open(tmp_path / "e.yaml", "a") as f:
        f.write("cache_features: false\n")
    state = tmp_path / "runs" / "trial_state" / "stop" / "t000.pt"
    proc = start_sweep(tmp_path)
    wait_for(lambda: running_trials(tmp_path, "stop", epochs=3), proc)  # a few epochs in
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, err
    assert word in err and "Traceback" not in err

    df, study = stores(tmp_path, "stop")
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    assert study.trials[1].system_attrs["failed_trial"] == 0 and study.trials[1].params == study.trials[0].params
    run = df[df["tags.mlflow.runName"] == "t000"].iloc[0]
    assert run.status == "KILLED" and "interrupted" in run["tags.fine_tune.reason"]
    assert df[df["tags.fine_tune.role"] == "study"].status.iloc[0] == "KILLED"
    assert state.exists()  # the interrupt saved the last finished epoch for the resume
    done = len(mlflow.MlflowClient().get_metric_history(run.run_id, "val/f1_macro"))
    if not resume:
        return

    # the next sweep picks the re-queued trial and continues its run from the last epoch
    proc = start_sweep(tmp_path)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    df, study = stores(tmp_path, "stop")
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    runs = df[df["tags.fine_tune.role"] == "trial"]
    assert len(runs) == 1 and runs.status.iloc[0] == "FINISHED" and runs["tags.optuna.retry_trial_number"].iloc[0] == "1"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(runs.run_id.iloc[0], "val/f1_macro")]
    assert done >= 1 and sorted(set(steps)) == list(range(1, 61))
    assert len(steps) == len(set(steps))  # resumed: no epoch logged twice
    assert not state.exists()
    assert "RUNNING" not in set(df.status)


def pid_running_a_trial(tmp_path, study_name: str, proc) -> int:
    """The pid of a worker in the middle of a trial: past its first epoch checkpoint, as recorded by the trial."""
    states = tmp_path / "runs" / "trial_state" / study_name
    wait_for(states.exists, proc)  # the sweep has created its stores and started a trial
    storage = optuna_storage(f"sqlite:///{(tmp_path / 'runs').resolve()}/optuna.db")
    found = []

    def running():
        study = optuna.load_study(study_name=study_name, storage=storage)
        found[:] = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                    if "worker" in t.user_attrs and (states / f"t{t.number:03d}.pt").exists()]
        return bool(found)

    wait_for(running, proc)
    return int(found[0].user_attrs["worker"].rsplit(":", 1)[1])


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_failed_requeued_and_closed(tmp_path, tiny_backbone):
    # state saved after every epoch, so the retry resumes (and backfills) rather than starts over
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="kill", budget=100, epochs=15, n_trials=6,
                     state_every_s=0)
    proc = start_sweep(tmp_path, "--workers", "2")
    os.kill(pid_running_a_trial(tmp_path, "kill", proc), signal.SIGKILL)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 1 and "workers died" in err, err

    df, study = stores(tmp_path, "kill")
    states_now = [t.state.name for t in study.trials]
    assert "RUNNING" not in states_now and "RUNNING" not in set(df.status)
    finished = [s for s in states_now if s in ("COMPLETE", "PRUNED")]
    assert len(finished) >= 6, (states_now, err)  # the surviving worker still delivered the requested trials
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) == 1
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retry) == 1 and retry[0].params == failed[0].params
    run = df[df.run_id == failed[0].user_attrs["mlflow_run_id"]].iloc[0]
    assert run.status in ("FAILED", "FINISHED")  # closed when reaped; FINISHED if the retry already ran
    # closed FAILED with the reason; once the retry finished the run, the reason is kept as what it was retried after
    why = run["tags.fine_tune.reason"] if run.status == "FAILED" else run["tags.fine_tune.retried_after"]
    assert "stopped heartbeating" in why
    if run.status == "FINISHED":  # the retry ran: epochs lost with the killed worker were backfilled
        steps = {m.step for m in mlflow.MlflowClient().get_metric_history(run.run_id, "val/f1_macro")}
        assert steps == set(range(1, int(run["metrics.epochs_run"]) + 1))


@pytest.mark.slow
def test_ctrl_c_with_several_workers_closes_every_trial(tmp_path, tiny_backbone):
    """Ctrl-C in a terminal signals the whole process group: launcher and workers alike."""
    # ~4 s trials through the whole network (see above): the signal lands mid-training even on a loaded machine
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="group", budget=1000, epochs=60, n_trials=4)
    with open(tmp_path / "e.yaml", "a") as f:
        f.write("cache_features: false\n")
    proc = subprocess.Popen([sys.executable, "-m", "fine_tune", "sweep", "--config", "e.yaml", "--workers", "2"],
                            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: len(running_trials(tmp_path, "group", epochs=2)) >= 2, proc)  # both workers mid-trial
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "Traceback" not in err, err

    df, study = stores(tmp_path, "group")
    states_now = [t.state.name for t in study.trials]
    assert "RUNNING" not in states_now and "RUNNING" not in set(df.status)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    waiting = [t for t in study.trials if t.state.name == "WAITING"]
    # each worker mid-trial at the signal leaves one FAIL trial, re-queued; one between trials leaves none
    assert 1 <= len(failed) <= 2
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == [t.number for t in failed]
    trials = df[df["tags.fine_tune.role"] == "trial"]
    assert (trials.status == "KILLED").sum() == len(failed) and set(trials.status) <= {"KILLED", "FINISHED"}


def test_a_store_whose_creation_was_killed_leaves_no_half_made_file(tmp_path, tiny_backbone):
    """Item 4: the first sweep's MLflow store is built in a temporary file and linked into place only whole. A kill
    while the tables are being built (seen: the temporary file exists) leaves no runs/mlflow.db, and the next sweep
    makes a whole one."""
    creating = subprocess.Popen([sys.executable, "-c", "from fine_tune.track.stores import mlflow_client; "
                                 f"mlflow_client('sqlite:///{tmp_path}/runs/mlflow.db')"],
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list((tmp_path / "runs").glob(".mlflow.db.*")), creating)  # building, not yet linked
    creating.kill()
    creating.wait()
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="after-kill", n_trials=1)
    proc = start_sweep(tmp_path)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_two_sweeps_started_together_on_a_fresh_runs_dir_both_finish(tmp_path, tiny_backbone):
    """Item 5: two `make sweep` at the same moment used to race to create the stores' tables; now one store of each
    kind is linked into place whole, and the two sweeps share the study as two workers would (README)."""
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="together", n_trials=2)
    procs = [start_sweep(tmp_path) for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and "Traceback" not in err, err
    df, study = stores(tmp_path, "together")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 2
    assert "RUNNING" not in set(df.status)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_run_whose_trial_never_recorded_it_is_closed_when_the_trial_goes_stale(tmp_path):
    """Item 6: a worker killed after creating its trial's MLflow run but before the trial recorded the run id; the
    stale-trial callback finds the run by the trial number it is tagged with and closes it."""
    from fine_tune.study.workers import CloseStaleTrial, reap
    from fine_tune.track.stores import tracking_uri
    from fine_tune.track.tree import StudyTracker

    uri = tracking_uri(tmp_path / "runs")
    tracker = StudyTracker("orphan", uri)
    storage = optuna_storage(f"sqlite:///{tmp_path}/runs/optuna.db", heartbeat=1, grace=2,
                             on_stale=CloseStaleTrial(uri, max_retry=0))
    study = optuna.create_study(study_name="orphan", storage=storage, direction="maximize")
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    run = tracker.start_trial(trial.number, {"lr": 0.01})  # and the worker dies here, before set_user_attr
    wait_for(lambda: reap(study) or study.trials[0].state.name == "FAIL")
    status = tracker.client.get_run(run.run_id)
    assert status.info.status == "FAILED" and "stopped heartbeating" in status.data.tags["fine_tune.reason"]


def test_the_trials_view_is_written_when_another_sweep_wrote_it_between_mlflows_read_and_insert(tmp_path):
    """Two sweeps starting together both write the study's trials view, an experiment tag. MLflow reads the tag, then
    inserts it: the other sweep's row landing in between failed the insert (UNIQUE constraint, a traceback and exit 1,
    seen on a loaded machine). Here the other sweep's write lands in exactly that window, through its own
    connection."""
    import json
    import sqlite3

    from fine_tune.track.stores import mlflow_client, tracking_uri
    from fine_tune.track.views import VIEW, save_trials_view

    uri = tracking_uri(tmp_path / "runs")
    client = mlflow_client(uri)
    experiment = client.create_experiment("together")
    key, raced = f"mlflow.sharedViewState.{VIEW}", []

    def other_sweep(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO experiment_tags") and not raced:
            raced.append(statement)
            with sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=30) as other:
                other.execute("INSERT INTO experiment_tags (key, value, experiment_id) VALUES (?, ?, ?)",
                              (key, '{"name": "the other sweep\'s"}', int(experiment)))

    engine = client._tracking_client.store.engine
    sqlalchemy.event.listen(engine, "before_cursor_execute", other_sweep)
    try:
        save_trials_view(client, experiment, ["lr"], "val/f1_macro")
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", other_sweep)
    assert raced
    assert json.loads(client.get_experiment(experiment).tags[key])["name"] == "Trials by val/f1_macro"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_retry_continues_the_run_an_attempt_created_but_never_recorded(tmp_path, tiny_backbone):
    """The tracking server went away between creating a trial's run and answering (or before the run's params were
    written): the trial was re-queued without its run's id, and the run stayed RUNNING beside the retry's new one
    (seen once in the server-outage test on a loaded machine). The retry now finds that run by the trial number it is
    tagged with, writes what it missed and continues it: one run per trial, none left RUNNING."""
    from helpers import tiny_sweep

    from fine_tune.study.sweep import open_study, run_sweep
    from fine_tune.study.workers import Attempt
    from fine_tune.track.stores import tracking_uri
    from fine_tune.track.tree import StudyTracker

    cfg = tiny_sweep(tmp_path / "runs", tiny_backbone[0], "lost-run", 1)
    study = open_study(cfg, log=lambda s: None)
    trial = study.ask()
    tracker = StudyTracker(cfg.study, tracking_uri(cfg.runs_dir))
    lost = tracker.start_trial(trial.number, {})  # created; its id never reached the trial, its params never written
    Attempt(trial, tmp_path / "state", cfg.sweep.objective).requeue()  # what the sweep does when the server is gone
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    run_sweep(cfg, progress=False, log=lambda s: None)

    trials = study_in(cfg.runs_dir, cfg.study).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and trials[1].user_attrs["mlflow_run_id"] == lost.run_id
    df = runs_of(cfg.runs_dir, cfg.study)
    runs = df[df["tags.fine_tune.role"] == "trial"]
    assert list(runs.run_id) == [lost.run_id] and list(runs.status) == ["FINISHED"]
    assert runs["tags.optuna.retry_trial_number"].iloc[0] == "1" and runs["params.lr"].notna().all()
    assert "RUNNING" not in set(df.status)
