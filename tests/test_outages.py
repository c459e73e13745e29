"""The sweep survives its stores: an Optuna database on PostgreSQL that drops the sweep's connections or goes away
for a while, one that stays away, and a disk that fills up under the local stores.

The PostgreSQL tests use a database of their own on the shared server (never the server itself): its connections are
dropped with pg_terminate_backend, and "away" is ALLOW_CONNECTIONS false on that database.
"""
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from helpers import cli_env, wait_for, write_experiment
from test_scaleout import PG, pg_storage, postgres_or_fail

from fine_tune.errors import StorageError
from fine_tune.track.outages import storage_lost

# one PostgreSQL server with a bounded number of connections: its tests run in one of `make test`'s processes
# (shared with test_scaleout: their workers and servers open many connections each)
pytestmark = pytest.mark.xdist_group("postgres")


@pytest.fixture
def database():
    """A fresh database for the study's trials, dropped afterwards, with `drop()`, `away()` and `back()` on it."""
    admin = postgres_or_fail()
    name = f"ft_outage_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE DATABASE {name}")

    class Database:
        url = f"{PG}/{name}"

        @staticmethod
        def drop() -> int:
            """Drop every connection to it, as a restart, a failover or an idle timeout does; how many there were."""
            return admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s "
                                 "AND pid <> pg_backend_pid()", (name,)).fetchone()[0]

        @staticmethod
        def away() -> None:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            Database.drop()

        @staticmethod
        def back() -> None:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")

    yield Database
    Database.back()
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def start(tmp_path: Path, **env) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / f"sweep-{len(list(tmp_path.glob('sweep-*.log')))}.log"
    with open(out, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fine_tune", "sweep", "--config", "e.yaml"], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT, env=cli_env(**env))
    return proc, out


def experiment(tmp_path: Path, backbone: str, study: str, n_trials: int, max_wait: float | None = None) -> None:
    """The tiny sweep with trials of a few seconds (40 epochs of 100 images a class), so that an outage finds one
    in flight, and `sweep.max_wait` seconds of patience beyond three grace periods (3 x 4 s) if given."""
    path = write_experiment(tmp_path / "e.yaml", backbone, study=study, n_trials=n_trials, budget=100, epochs=40,
                            state_every_s=0)
    if max_wait is not None:
        path.write_text(path.read_text().replace("state_every_s:", f"max_wait: {max_wait}, state_every_s:"))


def trials(url: str, study: str) -> list:
    try:
        return optuna.load_study(study_name=study, storage=pg_storage(url)).trials
    except KeyError:  # not created yet
        return []


def states(url: str, study: str) -> list[str]:
    return [t.state.name for t in trials(url, study)]


def in_flight(url: str, study: str, complete: int) -> bool:
    """`complete` trials are complete and another is training (it has reported an epoch)."""
    now = trials(url, study)
    return (sum(t.state.name == "COMPLETE" for t in now) >= complete
            and any(t.state.name == "RUNNING" and t.intermediate_values for t in now))


def runs(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(name, status, reason) of every MLflow run in the local store, read without writing to it."""
    with sqlite3.connect(f"file:{tmp_path / 'runs' / 'mlflow.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT runs.name, runs.status, COALESCE(tags.value, '') FROM runs LEFT JOIN tags ON "
                          "tags.run_uuid = runs.run_uuid AND tags.key = 'fine_tune.reason'").fetchall()


def until(what: str, check, proc: subprocess.Popen, out: Path) -> None:
    """Wait on the sweep's own progress (helpers.wait_for), showing its output if it ends first."""
    wait_for(check, proc, what, output=out.read_text, every_s=0.2)


def said(out: Path) -> str:
    text = out.read_text()
    assert "Traceback" not in text, text[-3000:]
    return text


@pytest.mark.slow
def test_dropped_connections_and_a_short_outage_of_the_optuna_database_do_not_end_the_sweep(tmp_path, tiny_backbone,
                                                                                           database):
    """Issue 22 item 6: dropping the sweep's PostgreSQL connections ended it (exit 1, 6 tracebacks, the trial in
    flight FAIL and not re-queued). Now a dropped connection is replaced, a database away for longer than the grace
    period is waited for (the trial in flight waits with it, and is not taken for dead when it is back), and the
    sweep finishes every trial, with no run left RUNNING."""
    experiment(tmp_path, tiny_backbone[0], "dropped", n_trials=4)
    proc, out = start(tmp_path, OPTUNA_STORAGE=database.url)
    try:
        until("a second trial training", lambda: in_flight(database.url, "dropped", 1), proc, out)
        assert database.drop() > 0  # mid-trial: the trial in flight holds a heartbeat, the worker a claim lock
        until("a third trial training", lambda: in_flight(database.url, "dropped", 2), proc, out)
        database.away()
        until("the worker waiting for the database", lambda: "unreachable: waiting" in out.read_text(), proc, out)
        time.sleep(5)  # past the grace period (3 s): still, no trial may be taken for dead once it is back
        database.back()
        assert proc.wait(timeout=900) == 0, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "is back" in said(out)
    assert states(database.url, "dropped") == ["COMPLETE"] * 4  # not one failed, none re-queued
    assert {status for _, status, _ in runs(tmp_path)} == {"FINISHED"}


@pytest.mark.slow
def test_a_database_that_stays_away_ends_the_sweep_in_one_line_and_the_next_sweep_resumes(tmp_path, tiny_backbone,
                                                                                         database):
    """Issue 22 item 6: a database away past the patience (here 3 x 4 s + 3 s) ends the sweep with one line and exit
    2; the trial in flight, which the database cannot hear about, stays RUNNING there while its run and the parent
    are closed. Once the database is back, the same command re-queues that trial and finishes the study."""
    experiment(tmp_path, tiny_backbone[0], "away", n_trials=3, max_wait=3)
    proc, out = start(tmp_path, OPTUNA_STORAGE=database.url)
    try:
        until("a second trial training", lambda: in_flight(database.url, "away", 1), proc, out)
        database.away()
        assert proc.wait(timeout=900) == 2, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = [line for line in said(out).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"Optuna storage {database.url} stayed unreachable for 15s" in errors[0], errors
    assert out.read_text().rstrip().endswith(errors[0])
    database.back()
    stranded = [t.number for t in trials(database.url, "away") if t.state.name == "RUNNING"]
    assert len(stranded) == 1
    closed = {name: (status, reason) for name, status, reason in runs(tmp_path)}
    assert "RUNNING" not in {status for status, _ in closed.values()}  # the tracking store was there: all closed
    assert closed["away"][0] == "KILLED" and closed[f"t{stranded[0]:03d}"][0] == "KILLED"
    assert "stayed unreachable" in closed[f"t{stranded[0]:03d}"][1]
    proc, out = start(tmp_path, OPTUNA_STORAGE=database.url)
    assert proc.wait(timeout=900) == 0, out.read_text()[-3000:]
    said(out)
    after = trials(database.url, "away")
    assert [t.state.name for t in after if t.number == stranded[0]] == ["FAIL"]  # reaped: its worker is gone
    assert any(t.system_attrs.get("failed_trial") == stranded[0] and t.state.name == "COMPLETE" for t in after)
    assert {status for _, status, _ in runs(tmp_path)} == {"FINISHED"}


@pytest.fixture
def small_disk(tmp_path):
    """tmp_path/runs on a 64 MB file system of its own (a tmpfs), unmounted afterwards."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system to fill needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(runs_dir)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small file system to fill here: {mounted.stderr.strip()}")
    yield runs_dir
    subprocess.run(["umount", "-l", str(runs_dir)], check=True)


def fill(folder: Path) -> Path:
    """Fill the file system under `folder` to the last byte."""
    filler = folder / "filler"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
    except OSError:
        pass
    return filler


def local_trials(runs_dir: Path) -> list[str]:
    try:
        with sqlite3.connect(f"file:{runs_dir / 'optuna.db'}?mode=ro", uri=True) as db:
            return [s for (s,) in db.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:  # not created yet
        return []


@pytest.mark.slow
def test_a_full_disk_ends_the_sweep_in_one_true_line_and_the_next_sweep_recovers(tmp_path, tiny_backbone, small_disk):
    """Issue 22 item 14: a full disk under the stores printed 197 lines and 9 tracebacks, left the parent and the
    trial RUNNING, and the last line said the runs were closed. Now one `error:` line that says what was left
    RUNNING and who closes it; the same command, once there is space, closes it and finishes the study."""
    experiment(tmp_path, tiny_backbone[0], "full", n_trials=3)
    proc, out = start(tmp_path)
    try:
        until("a complete trial", lambda: "COMPLETE" in local_trials(small_disk), proc, out)
        filler = fill(small_disk)
        assert proc.wait(timeout=900) == 1, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = [line for line in said(out).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the disk is full"), errors
    assert out.read_text().rstrip().endswith(errors[0])
    left = [name for name, status, _ in runs(tmp_path) if status == "RUNNING"] + \
        [state for state in local_trials(small_disk) if state == "RUNNING"]
    if left:  # the stores on the full disk could not record their end: the message says so, and who closes them
        assert "left RUNNING (the next sweep closes it and re-queues the trial)" in errors[0], (left, errors)
    else:  # everything was closed: either line is true ("what the stores could not record ... is left RUNNING" is
        # said when a store refused a write; its closing writes may still have gone through, as here)
        assert "runs in progress were closed" in errors[0] or "what the stores could not record as ended" in errors[0]
    filler.unlink()
    proc, out = start(tmp_path)
    assert proc.wait(timeout=900) == 0, out.read_text()[-3000:]
    said(out)
    assert "RUNNING" not in local_trials(small_disk) and local_trials(small_disk).count("COMPLETE") >= 3
    # a trial whose run could still record its end when the disk filled is closed FAILED (it did fail); none is
    # left RUNNING, and the study's three complete trials each have a FINISHED run
    statuses = [status for _, status, _ in runs(tmp_path)]
    assert "RUNNING" not in statuses and statuses.count("FINISHED") >= 3, statuses


def test_only_a_database_server_that_cannot_be_reached_counts_as_lost(tmp_path):
    """The check that decides between waiting for the database and failing, on the errors SQLAlchemy really raises."""
    def error_of(url: str) -> Exception:
        try:
            sqlalchemy.create_engine(url).connect()
        except Exception as e:  # noqa: BLE001 - what connecting raised is the subject
            return e
        raise AssertionError(f"{url} connected")

    refused = error_of("postgresql://127.0.0.1:1/nowhere")
    assert storage_lost(refused)
    try:
        try:
            raise refused
        except sqlalchemy.exc.OperationalError as e:
            raise StorageError("the Optuna storage stayed unreachable") from e
    except StorageError as e:
        assert not storage_lost(e)  # our verdict that it stayed away: not waited on again
    assert not storage_lost(error_of(f"sqlite:///{tmp_path}/no/such/folder/optuna.db"))  # a file, not a server
    assert not storage_lost(ValueError("CategoricalDistribution does not support dynamic value space."))
