"""What the commands print, run as a user runs them: `make dashboard` says where it serves before it starts, and a
first run on a new MLflow store prints no MLflow INFO lines among its own."""
import os
import signal
import subprocess
import urllib.request

import optuna
import pytest
from helpers import ROOT, cli_env, free_port, run_cli, wait_for, write_experiment


@pytest.mark.slow
def test_make_dashboard_prints_its_url_and_serves_there(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="dash", storage=storage)
    port = free_port()
    # `-o venv`: the venv is there already (make would reinstall it while requirements.txt is being edited)
    proc = subprocess.Popen(["make", "-s", "-o", "venv", "dashboard", f"OPTUNA_STORAGE={storage}",
                             f"DASHBOARD_PORT={port}"], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert first == f"optuna-dashboard: http://127.0.0.1:{port}/dashboard (Ctrl-C stops it)\n"
        url = first.split(": ", 1)[1].split(" ")[0]

        def page():
            try:
                return urllib.request.urlopen(url, timeout=2).read().decode()
            except OSError:
                return None
        assert "<html" in wait_for(page, proc, "optuna-dashboard answering at the printed URL").lower()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make and the dashboard it started
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_first_run_prints_no_mlflow_info_lines(tmp_path, tiny_backbone):
    write_experiment(tmp_path / "e.yaml", tiny_backbone[0], study="quiet")
    p = run_cli(tmp_path, "train", "--config", "e.yaml")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "runs" / "mlflow.db").is_file()  # the store was created by this run
    out = p.stdout + p.stderr
    assert "Creating initial MLflow database tables" not in out and " INFO mlflow" not in out, out
