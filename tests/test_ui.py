"""What a person sees, looked at in headless Chromium: `make ui` opens on the study's trials, best first, with their
outcome, score and searched hyperparameters, and short names whole; one click keeps every page in the model-training
layout; the report shows every trial, pruned ones included."""
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from urllib.parse import parse_qs

import optuna
import pytest
from browser import Page, chromium
from helpers import cli_env, free_port, study_in, write_experiment
from mlflow.tracking import MlflowClient

from analysis.__main__ import main as analysis_main

# module fixtures: the file's tests run in one of `make test`'s processes (pytest-xdist, --dist loadgroup)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_ui")]


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


@pytest.fixture(scope="module")
def ui(pruned_study):
    """`make ui` over the study, as a user runs it: the URL it prints first, once its server answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fine_tune", "ui", "--config", "e.yaml", "--port", str(port)],
                              cwd=pruned_study, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        url = server.stdout.readline().split(": ", 1)[1].strip()  # the one line `make ui` prints first
        deadline = time.monotonic() + 600  # fails at once if the server exits; the bound is for a hang
        while True:  # the server's own readiness, not a fixed sleep
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


SCORE, OUTCOME = "metrics.`best/val/f1_macro`", "tags.`fine_tune.outcome`"
# Each row of the runs table in display order: its cells by column id, the run's name and whether it shows whole.
ROWS = """(() => { const rows = {};
  for (const c of document.querySelectorAll('.ag-row [role=gridcell][col-id]')) {
    const row = rows[c.closest('.ag-row').getAttribute('row-index')] ??= {};
    const name = c.getAttribute('col-id').startsWith('attributes.`Run Name`') && c.querySelector('a span');
    if (name) { row.name = name.innerText; row.whole = name.scrollWidth <= name.clientWidth + 1; }
    else row[c.getAttribute('col-id')] = c.innerText.trim();
  }
  return Object.keys(rows).sort((a, b) => a - b).map(i => rows[i]); })()"""
HEADER = "Array.from(document.querySelectorAll('.ag-header-cell[col-id]')).map(c => c.getAttribute('col-id'))"
NAME_LINK = ("(n => Array.from(document.querySelectorAll('[role=gridcell][col-id^=\"attributes.`Run Name`\"] a'))"
             ".find(a => a.innerText.trim() === n))")
BUTTON = "(t => Array.from(document.querySelectorAll('button, [role=button]')).find(b => b.innerText.trim() === t))"


def reached(trial) -> float:
    """What Optuna and the report give a trial: its value, or for a pruned one the best value it reported."""
    return trial.value if trial.state.name == "COMPLETE" else max(trial.intermediate_values.values())


def test_make_ui_opens_on_every_trial_best_first_with_the_searched_hyperparameters(pruned_study, ui):
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/#/experiments/1/runs\?workflowType=machine_learning"
                        r"&viewStateShareKey=trials", ui)
    trials = {f"t{t.number:03d}": t for t in study_in(pruned_study / "runs", "ui-study").trials}
    with Page(1600, 900) as page:
        page.goto(ui)
        try:  # the table fills in as the page renders: wait for a row per trial, each with its score
            rows = page.wait_for(f"(r => r.length === {len(trials)} && r.every(x => x.name && {SCORE!r} in x) && r)"
                                 f"({ROWS})")
        except AssertionError:
            pytest.fail(f"the trials view did not show every trial: {page.js(ROWS)}")
        assert "Run Name" in page.js("document.body.innerText")  # the runs table, not the GenAI overview
        facets = parse_qs(page.js("location.hash").split("?", 1)[1])  # the view's filter and sort, in the URL now
        assert facets["searchFilter"] == ["tags.`fine_tune.role` = 'trial'"]
        assert (facets["orderByKey"], facets["orderByAsc"]) == ([SCORE], ["false"])
        columns = [OUTCOME, SCORE, "params.`lr`", "params.`frozen_layers`", "params.`head_size`",
                   "metrics.`best_epoch`", "metrics.`epochs_run`"]
        shown = f"{HEADER}.filter(c => /^(tags|metrics|params)\\./.test(c)).sort()"
        wanted = json.dumps(json.dumps(sorted(columns), separators=(",", ":")))  # as JSON.stringify writes it
        try:  # MLflow applies the view's column order only sometimes (a race in its UI): which columns, not where
            page.wait_for(f"JSON.stringify({shown}) === {wanted}", timeout=120)
        except AssertionError:
            pytest.fail(f"the view's columns are not the ones shown: {page.js(shown)}")
        page.screenshot(pruned_study / "ui.png")

        # trials only (no parent run), names whole, best first by what each reached: pruned trials by their best epoch
        assert sorted(r["name"] for r in rows) == sorted(trials) and all(r["whole"] for r in rows), rows
        assert [float(r[SCORE]) for r in rows] == sorted((float(r[SCORE]) for r in rows), reverse=True)
        for r in rows:
            t = trials[r["name"]]
            assert float(r[SCORE]) == pytest.approx(reached(t), rel=1e-12), r
            assert r[OUTCOME] == ("complete" if t.state.name == "COMPLETE" else
                                  f"pruned at epoch {max(t.intermediate_values)}"), r
            assert int(r["metrics.`epochs_run`"]) == len(t.intermediate_values) >= int(r["metrics.`best_epoch`"]) >= 1

        # README: "Override saved view" keeps the view's columns when you come back from a run's page
        page.js(f"{BUTTON}('Override saved view').click()")
        page.wait_for(f"!{BUTTON}('Override saved view')")
        page.js(f"{NAME_LINK}({rows[0]['name']!r}).click()")
        page.wait_for("location.hash.includes('/runs/')")
        page.js("history.back()")
        page.wait_for(f"{HEADER}.includes({SCORE!r}) && {HEADER}.includes('params.`lr`')", timeout=120)


def test_one_click_on_model_training_keeps_every_page_of_the_study_in_that_layout(pruned_study, ui):
    """MLflow 3.17 keeps the layout per browser, not per experiment: a run's page reached from the table opens in the
    browser's (GenAI until changed). The README's one click on "Model training" there makes it stay; the parent run,
    clicked in the table then, shows the model-training layout, and its description links back to the trials view."""
    with Page(1600, 900) as page:
        page.goto(ui)
        page.wait_for(f"!!{NAME_LINK}('t000')")
        page.js(f"{NAME_LINK}('t000').click()")
        page.wait_for(f"location.hash.includes('/runs/') && !!{BUTTON}('Model training')")
        page.js(f"{BUTTON}('Model training').click()")
        page.wait_for(f"!!{NAME_LINK}('ui-study')")  # back on the runs table, every run listed
        page.js(f"{NAME_LINK}('ui-study').click()")
        page.wait_for("document.body.innerText.includes('objective: maximize')")  # the parent's page, described
        text = page.js("document.body.innerText")
        for genai in ("Evaluations", "Evaluation runs", "Agent versions"):
            assert genai not in text
        links = page.js("Array.from(document.querySelectorAll('a')).filter(a => a.innerText.startsWith('Every trial'))"
                        ".map(a => a.getAttribute('href'))")
        assert links == ["#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=trials"]
        page.screenshot(pruned_study / "ui-parent.png")


def test_the_run_comparison_tells_the_top_trials_apart(pruned_study, ui):
    """The UI rounds a metric to 3 decimals, `#/compare-runs` too (0.7751 and 0.7749 both read 0.775); each run's
    best/val/* values are also tags, which the comparison shows whole."""
    from urllib.parse import quote

    trials = sorted(study_in(pruned_study / "runs", "ui-study").trials, key=reached, reverse=True)[:2]
    runs = json.dumps([t.user_attrs["mlflow_run_id"] for t in trials])
    with Page(1600, 2400) as page:
        page.goto(f"{ui.split('#')[0]}#/compare-runs?runs={quote(runs)}&experiments={quote(json.dumps(['1']))}")
        page.wait_for("document.body.innerText.includes('fine_tune.best/val/f1_macro')")
        rows = page.js("document.body.innerText").splitlines()
    shown = next(r for r in rows if r.startswith("fine_tune.best/val/f1_macro\t")).split("\t")[1:]
    assert shown == [f"{reached(t):.6f}" for t in trials]


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


def test_the_model_version_page_says_what_the_champion_is(pruned_study, ui):
    """The registry in the real UI: the registered model's page describes the task and how to load it, and the
    champion version's page shows the trial's hyperparameters and its val / test metrics."""
    client = MlflowClient(f"sqlite:///{pruned_study}/runs/mlflow.db")
    version = client.get_model_version_by_alias("ui-study", "champion")
    base = ui.split("#")[0]
    with Page(1400, 1600) as page:
        page.goto(f"{base}#/models/ui-study")
        page.wait_for("document.body.innerText.includes('mlflow.pytorch.load_model')", timeout=120)
        assert "classification of" in page.js("document.body.innerText")
        page.goto(f"{base}#/models/ui-study/versions/{version.version}")
        page.wait_for("document.body.innerText.includes('test/accuracy')", timeout=120)
        text = page.js("document.body.innerText")
        for name in ("lr", "frozen_layers", "head_size", "val/f1_macro", f"Trial {version.tags['optuna.trial_number']}"):
            assert name in text, name
        page.screenshot(pruned_study / "ui-model-version.png")
