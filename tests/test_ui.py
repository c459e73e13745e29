"""What a person sees, looked at in headless Chromium: `make ui` opens on the study's runs table with short run names
and the trials nested under the study's run; the report shows every trial, pruned ones included."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from browser import Page, chromium
from helpers import cli_env, study_in, write_experiment

from analysis.__main__ import main as analysis_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned_study(tmp_path_factory, tiny_backbone):
    """A tiny study in which the median pruner stopped some trials (the CLI, as a user runs it)."""
    if chromium() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI needs it: apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    tmp = tmp_path_factory.mktemp("ui")
    write_experiment(tmp / "e.yaml", tiny_backbone[0], study="ui-study", epochs=4, n_trials=6)
    text = (tmp / "e.yaml").read_text().replace("pruner: none", "pruner: median, prune_startup_trials: 1, "
                                                                 "prune_warmup_epochs: 0")
    (tmp / "e.yaml").write_text(text)
    (tmp / "runs").mkdir()
    study = optuna.create_study(study_name="ui-study", direction="maximize", storage=f"sqlite:///{tmp}/runs/optuna.db")
    for lr, frozen in ((2e-2, 0), (1e-3, 2), (1e-3, 2), (1.5e-3, 2)):  # a good first trial, then poor ones to prune
        study.enqueue_trial({"lr": lr, "frozen_layers": frozen, "head_size": 0})
    p = subprocess.run([sys.executable, "-m", "fine_tune", "sweep", "--config", "e.yaml"], cwd=tmp, env=cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert any(t.state.name == "PRUNED" for t in study_in(tmp / "runs", "ui-study").trials)
    return tmp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_ui_opens_on_the_runs_table_with_the_trials_nested_and_their_names_whole(pruned_study):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fine_tune", "ui", "--config", "e.yaml", "--port", str(port)],
                              cwd=pruned_study, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        url = server.stdout.readline().split(": ", 1)[1].strip()  # the one line `make ui` prints first
        assert url == f"http://127.0.0.1:{port}/#/experiments/1/runs?workflowType=machine_learning"
        deadline = time.monotonic() + 600  # fails at once if the server exits; the bound is for a hang
        while True:  # the server's own readiness, not a fixed sleep
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        trials = study_in(pruned_study / "runs", "ui-study").trials
        with Page(1600, 900) as page:
            page.goto(url)
            page.wait_for("document.querySelectorAll('.ag-row').length >= 1")
            assert "Run Name" in page.js("document.body.innerText")  # the runs table, not the GenAI overview
            expand = "document.querySelector('.ag-row button[data-component-id*=runnamecellrenderer]')"
            page.wait_for(f"!!{expand}")
            page.js(f"{expand}.click()")
            cells = "document.querySelectorAll('[role=gridcell][col-id^=\"attributes.`Run Name`\"] a span')"
            names = f"Array.from({cells}).map(s => [s.innerText, s.scrollWidth <= s.clientWidth + 1])"
            wanted = sorted(f"t{t.number:03d}" for t in trials)
            try:  # the table fills in as the page renders: wait for every trial's name, whole
                page.wait_for(f"(() => {{ const seen = Object.fromEntries({names}); "
                              f"return {wanted!r}.every(n => seen[n] === true); }})()")
            except AssertionError:
                pytest.fail(f"trial names missing or cut short in the runs table: {page.js(names)}")
            page.screenshot(pruned_study / "ui.png")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_report_shows_the_pruned_trials(pruned_study):
    assert analysis_main(["report", "--config", str(pruned_study / "e.yaml"), "--runs-dir",
                          str(pruned_study / "runs"), "--out", str(pruned_study / "reports")]) == 0
    trials = study_in(pruned_study / "runs", "ui-study").trials
    pruned = sorted(t.number for t in trials if t.state.name == "PRUNED")
    with Page(1300, 2000) as page:
        page.goto((pruned_study / "reports" / "ui-study" / "report.html").as_uri())
        page.wait_for("document.body.dataset.imagesLoaded !== undefined")
        assert page.js("document.body.dataset.imagesBroken") == "0"
        rows = page.js("""Array.from(document.querySelectorAll('h2')).find(h => h.innerText === 'All trials')
                          .nextElementSibling.querySelectorAll('tbody tr').length""")
        states = page.js("""Array.from(Array.from(document.querySelectorAll('h2'))
                            .find(h => h.innerText === 'All trials').nextElementSibling.querySelectorAll('tbody tr'))
                            .map(r => [r.cells[0].innerText, r.cells[1].innerText])""")
        assert rows == len(trials) and sorted(int(n) for n, s in states if s == "pruned") == pruned
        alts = page.js("Array.from(document.images).map(i => i.alt)")
        assert "every trial per epoch" in alts and "val F1 by discrete hyperparameter" in alts
        wide = page.js("""Array.from(document.querySelectorAll('table')).filter(t => t.closest('.table-wrap') === null)
                          .length""")
        assert wide == 0  # every table scrolls inside the page rather than running off it
