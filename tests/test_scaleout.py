"""Several workers on one study: local SQLite, and PostgreSQL + an MLflow tracking server on loopback.

Tests that need PostgreSQL fail (not skip) when CI=true and the server is unreachable.
"""
import functools
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from helpers import cli_env, free_port, study_in, wait_for, write_experiment
from mlflow.tracking import MlflowClient

PG = "postgresql://127.0.0.1:5432"
# one PostgreSQL server with a bounded number of connections: its tests run in one of `make test`'s processes
# (test_scaleout and test_outages share the group, as their workers and servers open many connections each)
pytestmark = pytest.mark.xdist_group("postgres")


def sweep(tmp_path, *args, timeout=600, **env):
    return subprocess.run([sys.executable, "-m", "fine_tune", "sweep", "--config", "e.yaml", *args], cwd=tmp_path,
                          env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


def check_tree(client, experiment, n):
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("fine_tune.role") == "study"]
    children = [r for r in runs if r.data.tags.get("fine_tune.role") == "trial"]
    assert len(parents) == 1 and len(children) == n
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == list(range(n))
    for r in children[:5]:
        assert len(client.get_metric_history(r.info.run_id, "val/f1_macro")) == 2
    return children


@pytest.mark.slow
def test_two_local_workers_share_a_sqlite_study(tmp_path, tiny_backbone):
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="local2", n_trials=4)
    p = sweep(tmp_path, "--workers", "2")
    assert p.returncode == 0, p.stderr
    assert "locked" not in p.stderr
    runs = (tmp_path / "runs").resolve()
    study = study_in(runs, "local2")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    check_tree(client, client.get_experiment_by_name("local2"), 4)


@functools.cache
def pg_storage(url: str) -> optuna.storages.RDBStorage:
    """A test's own view of a study on PostgreSQL: one engine, a fresh connection per read. (A storage made from the
    URL per poll left each one's pooled connection open until garbage collection: 84 within seconds, the server's
    limit nearly reached.)"""
    return optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})


def postgres_or_fail():
    try:
        import psycopg

        conn = psycopg.connect(f"{PG}/postgres", connect_timeout=3, autocommit=True)
    except Exception as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG} is unreachable in CI: {e}")
        pytest.skip(f"PostgreSQL at {PG} is unreachable: {e}")
    return conn


@pytest.fixture
def pg_databases():
    """Two fresh databases (Optuna's and MLflow's), dropped afterwards."""
    conn = postgres_or_fail()
    names = [f"ft_test_{uuid.uuid4().hex[:8]}_{kind}" for kind in ("optuna", "mlflow")]
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f"CREATE DATABASE {name}")
    yield [f"{PG}/{name}" for name in names]
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


def start_server(backend: str, artifacts: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on loopback, returned once it answers /health (fails at once if it exits)."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", backend,
                             "--artifacts-destination", str(artifacts), "--serve-artifacts",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
                            env=cli_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # the bound is for a hang
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)


@pytest.fixture
def mlflow_server(pg_databases, tmp_path):
    port = free_port()
    proc = start_server(pg_databases[1], tmp_path / "served-artifacts", port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_four_workers_on_postgres_and_a_tracking_server(tmp_path, tiny_backbone, pg_databases, mlflow_server):
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="pg4x5", n_trials=20)
    start = time.monotonic()
    p = sweep(tmp_path, "--workers", "4", OPTUNA_STORAGE=pg_databases[0], MLFLOW_TRACKING_URI=mlflow_server)
    elapsed = time.monotonic() - start
    assert p.returncode == 0, p.stderr[-3000:]
    study = optuna.load_study(study_name="pg4x5", storage=pg_storage(pg_databases[0]))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 20  # zero errors
    client = MlflowClient(mlflow_server)
    children = check_tree(client, client.get_experiment_by_name("pg4x5"), 20)
    # artifacts went through the server into its artifact store
    assert any((tmp_path / "served-artifacts").rglob("best.pt"))
    champion = client.get_model_version_by_alias("pg4x5", "champion")
    assert float(champion.tags["objective_value"]) == pytest.approx(study.best_value)
    print(f"\n4 workers x 20 trials on PostgreSQL + MLflow server: {elapsed:.1f}s, "
          f"{20 / elapsed * 60:.1f} trials/min, {len(children)} child runs")


@pytest.mark.slow
def test_a_tracking_server_outage_requeues_the_trial_and_the_sweep_finishes_when_it_is_back(tmp_path, tiny_backbone,
                                                                                           pg_databases):
    """The MLflow server dies mid-sweep for longer than the client retries: the worker re-queues its trial, waits for
    the server instead of dying, and once the server is back the retry continues the same run; the sweep ends with
    every trial finished and no run left RUNNING."""
    port = free_port()
    server = start_server(pg_databases[1], tmp_path / "served-artifacts", port)
    url = f"http://127.0.0.1:{port}"
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="outage", n_trials=8, budget=100, epochs=40)
    out = tmp_path / "sweep.log"
    with open(out, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fine_tune", "sweep", "--config", "e.yaml"], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT,
                                env=cli_env(OPTUNA_STORAGE=pg_databases[0], MLFLOW_TRACKING_URI=url,
                                            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"))
    try:
        def complete() -> int:
            try:
                trials = optuna.load_study(study_name="outage", storage=pg_storage(pg_databases[0])).trials
            except KeyError:  # the study is not created yet
                return 0
            return sum(t.state.name == "COMPLETE" for t in trials)
        wait_for(lambda: complete() >= 2, proc, "two complete trials", 600, out.read_text)
        server.terminate()
        server.wait(timeout=60)
        wait_for(lambda: "unreachable: waiting" in out.read_text(), proc, "the worker waiting for the server", 600,
                 out.read_text)
        server = start_server(pg_databases[1], tmp_path / "served-artifacts", port)
        assert proc.wait(timeout=900) == 0, out.read_text()[-3000:]
        check_outage(out, pg_databases[0], url)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.terminate()
        server.wait(timeout=30)


def check_outage(out: Path, storage: str, url: str) -> None:
    from fine_tune.study.sweep import TrackingLost

    assert "is back" in out.read_text()
    trials = optuna.load_study(study_name="outage", storage=pg_storage(storage)).trials
    lost = [t for t in trials if t.state.name == "FAIL"]
    assert lost and {t.user_attrs["fail_reason"] for t in lost} == {TrackingLost.REASON}
    retried = {t.system_attrs.get("failed_trial") for t in trials if t.state.name == "COMPLETE"}
    assert {t.number for t in lost} <= retried  # each lost trial was continued by a retry that completed
    assert sum(t.state.name == "COMPLETE" for t in trials) == 8
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id], max_results=1000)
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    children = [r for r in runs if r.data.tags.get("fine_tune.role") == "trial"]
    # one run per completed trial: a retry continued its lost trial's run where there was one, and made none twice
    assert len(children) == 8


def test_only_a_server_that_cannot_be_reached_counts_as_lost():
    """Pure unit test of the check that decides between re-queuing a trial and failing it."""
    from mlflow.exceptions import MlflowException

    from fine_tune.track.stores import tracking_lost

    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as e:
            raise MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/create failed") from e
    except MlflowException as e:
        wrapped = e
    assert tracking_lost(wrapped, "http://127.0.0.1:5000")
    assert tracking_lost(MlflowException("... Max retries exceeded with url ..."), "https://mlflow.example")
    assert not tracking_lost(wrapped, "sqlite:///runs/mlflow.db")  # a local store's errors are the run's own
    assert not tracking_lost(MlflowException("RESOURCE_DOES_NOT_EXIST: run not found"), "http://127.0.0.1:5000")
    assert not tracking_lost(ValueError("loss is nan"), "http://127.0.0.1:5000")


@pytest.mark.slow
def test_train_and_rerun_work_behind_a_basic_auth_proxy(tmp_path, tiny_backbone):
    """The README's way to expose a tracking server: on loopback behind a reverse proxy asking for basic auth on every
    path, /health included. With MLFLOW_TRACKING_USERNAME / _PASSWORD, as MLflow's client reads them, a run is tracked
    and rerun through it; without them, or with a wrong password, the command stops in one line saying which."""
    import re

    from auth_proxy import basic_auth_proxy
    from helpers import run_cli

    port = free_port()
    server = start_server(f"sqlite:///{tmp_path}/served.db", tmp_path / "served-artifacts", port)
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="behind-auth")
    try:
        with basic_auth_proxy(port, "alice", "s3cret") as url:
            for password, said in ((None, "with no credentials"), ("wrong", "with the credentials given")):
                creds = {"MLFLOW_TRACKING_PASSWORD": password, "MLFLOW_TRACKING_USERNAME": "alice"} if password else {}
                p = run_cli(tmp_path, "train", "--config", "e.yaml", MLFLOW_TRACKING_URI=url, **creds)
                assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
                assert f"error: MLflow tracking server {url} turned us away {said} (HTTP 401" in p.stderr
            creds = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cret"}
            p = run_cli(tmp_path, "train", "--config", "e.yaml", MLFLOW_TRACKING_URI=url, **creds)
            assert p.returncode == 0, p.stderr[-3000:]
            run_id = re.search(r"tracked: MLflow run (\w+)", p.stdout)[1]
            p = run_cli(tmp_path, "rerun", run_id, "--config", "e.yaml", MLFLOW_TRACKING_URI=url, **creds)
            assert p.returncode == 0 and "verdict: identical" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    client = MlflowClient(f"sqlite:///{tmp_path}/served.db")
    runs = client.search_runs([client.get_experiment_by_name("behind-auth").experiment_id])
    assert sorted(r.data.tags["fine_tune.role"] for r in runs) == ["reproduction", "train"]
