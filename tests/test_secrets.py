"""What a shared server must not get from us: a store's password, in any line we print or log, any report or any run
(masked `user:***@host` instead); and what it must not get into a reader's browser: values any worker can write
(class names, params, run ids, the objective) run no script in report.html, opened in headless Chromium."""
import json
import os
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from browser import Page, chromium
from helpers import tiny_config, tiny_sweep
from mlflow.tracking import MlflowClient
from test_scaleout import pg_databases  # noqa: F401 (a fixture: fresh PostgreSQL databases, dropped after)

from analysis.__main__ import main as analysis_main
from fine_tune.__main__ import main as fine_tune_main
from fine_tune.config import Config
from fine_tune.errors import StorageError
from fine_tune.study.single import train_once
from fine_tune.study.sweep import run_sweep
from fine_tune.track import provenance
from fine_tune.track.stores import masked, optuna_storage

PASSWORD = "hunter2-s3cret"
ENV_SECRET = "env-only-s3cret"  # MLFLOW_TRACKING_PASSWORD: read by MLflow's client, never logged by us
TEXT_ARTIFACTS = (".json", ".yaml", ".md", ".html", ".patch", ".txt")


def test_masked_hides_the_password_of_every_url_in_a_text():
    shown = {"postgresql://ft:hunter2@db.example:5432/optuna": "postgresql://ft:***@db.example:5432/optuna",
             "postgresql+psycopg://ft:p/a:ss@w@rd@db/optuna": "postgresql+psycopg://ft:***@db/optuna",
             "http://viewer:pw@127.0.0.1:5000/": "http://viewer:***@127.0.0.1:5000/",
             "https://ghp_token@github.com/org/repo.git": "https://***@github.com/org/repo.git"}
    kept = ["postgresql://ft@db/optuna", "ssh://git@github.com/org/repo", "git@github.com:org/repo.git",
            "sqlite:////home/me@work/runs/optuna.db", "http://127.0.0.1:5000/#/experiments/1", "no URL: a@b"]
    for url, want in {**shown, **{u: u for u in kept}}.items():
        assert masked(url) == want, url
    diff = "-  storage: 'postgresql://a:old@h/db'\n+  storage: \"postgresql://a:new@h/db\"  # or http://b:c@d/"
    assert masked(diff) == "-  storage: 'postgresql://a:***@h/db'\n+  storage: \"postgresql://a:***@h/db\"  # or http://b:***@d/"


def everything_logged(client, experiment_id: str) -> str:
    """Every param, tag and text artifact of every run of an experiment, as one text."""
    out = []
    for run in client.search_runs([experiment_id], max_results=1000):
        out += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        folders = [""]
        while folders:
            for a in client.list_artifacts(run.info.run_id, folders.pop() or None):
                if a.is_dir:
                    folders.append(a.path)
                elif a.path.endswith(TEXT_ARTIFACTS):
                    out.append(Path(client.download_artifacts(run.info.run_id, a.path)).read_text())
    return "\n".join(out)


def git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_a_password_in_the_experiment_yaml_reaches_no_artifact(tmp_path, tiny_backbone, monkeypatch):
    """Item 2: `sweep.storage` with a password, in a tracked experiment YAML being edited: the run's config.yaml and
    its provenance/diff.patch show the URL masked, and the checkout's remote loses its token."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "remote", "add", "origin", "https://ghp_t0ken@github.com/org/repo.git")
    (repo / "exp.yaml").write_text("study: secret\n")
    git(repo, "add", "exp.yaml")
    git(repo, "commit", "-qm", "first")
    storage = f"postgresql://ft:{PASSWORD}@db.example/optuna"
    (repo / "exp.yaml").write_text(f"study: secret\nsweep: {{storage: '{storage}'}}\n")
    monkeypatch.setattr(provenance, "REPO", repo)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ENV_SECRET)
    provenance._code_state.cache_clear()
    try:
        cfg = tiny_config(tmp_path, study="secret", epochs=1, pretrained=tiny_backbone[0], sweep={"storage": storage})
        lines = []
        _, run_id = train_once(cfg, track=True, log=lines.append)
    finally:
        provenance._code_state.cache_clear()
    client = MlflowClient(f"sqlite:///{cfg.run_dir().resolve()}/mlflow.db")
    logged = everything_logged(client, client.get_run(run_id).info.experiment_id)
    assert PASSWORD not in logged and "ghp_t0ken" not in logged and ENV_SECRET not in logged
    assert PASSWORD not in "\n".join(lines)
    config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml")).read_text())
    assert Config.model_validate(config).sweep.storage == "postgresql://ft:***@db.example/optuna"  # still a config
    diff = Path(client.download_artifacts(run_id, "provenance/diff.patch")).read_text()
    assert "+sweep: {storage: 'postgresql://ft:***@db.example/optuna'}" in diff
    assert client.get_run(run_id).data.tags["mlflow.source.git.repoURL"] == "https://***@github.com/org/repo.git"


@pytest.mark.slow
@pytest.mark.xdist_group("postgres")  # one PostgreSQL test at a time: their connections add up
def test_a_storage_password_reaches_no_console_line_report_or_run(tmp_path, tiny_backbone, request, monkeypatch,
                                                                  capsys):
    """Item 1: a study on PostgreSQL whose URL carries a password (the server trusts loopback, so any password
    connects), reported with run links to a UI whose URL carries one too: the sweep's lines, the report, every run
    (the report is logged to the parent run) and the error lines show them masked."""
    storage = request.getfixturevalue("pg_databases")[0].replace("postgresql://", f"postgresql://root:{PASSWORD}@")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ENV_SECRET)
    runs = tmp_path / "runs"
    cfg = tiny_sweep(runs, tiny_backbone[0], "secret-pg", 2, sweep={"n_trials": 2, "pruner": "none",
                                                                    "storage": storage})
    lines = []
    run_sweep(cfg, progress=False, log=lines.append)
    assert PASSWORD not in "\n".join(lines) and "root:***@127.0.0.1" in "\n".join(lines)

    (tmp_path / "e.yaml").write_text(f"study: secret-pg\nruns_dir: {runs}\nsweep: {{storage: '{storage}'}}\n")
    monkeypatch.setenv("MLFLOW_UI_URL", f"http://viewer:{PASSWORD}@127.0.0.1:5000")
    assert analysis_main(["report", "--config", str(tmp_path / "e.yaml"), "--out", str(tmp_path / "reports"),
                          "--resamples", "200"]) == 0
    md, page = ((tmp_path / "reports" / "secret-pg" / name).read_text() for name in ("report.md", "report.html"))
    assert PASSWORD not in md + page
    assert f"stores: Optuna `{masked(storage)}`" in md and "root:***@127.0.0.1" in masked(storage)
    assert 'href="http://viewer:***@127.0.0.1:5000/#/experiments/' in page
    client = MlflowClient(f"sqlite:///{runs.resolve()}/mlflow.db")
    logged = everything_logged(client, client.get_experiment_by_name("secret-pg").experiment_id)
    assert md in logged  # the report logged to the parent run was read too
    assert PASSWORD not in logged and ENV_SECRET not in logged and f"storage: {masked(storage)}" in logged

    # error lines: ours (the storage's), and any that name the URL, masked where they are printed
    with pytest.raises(StorageError) as e:
        optuna_storage(f"postgresql://root:{PASSWORD}@127.0.0.1:1/none")
    assert PASSWORD not in str(e.value) and "root:***@127.0.0.1:1" in str(e.value)
    (tmp_path / "missing.yaml").write_text(f"study: not-there\nruns_dir: {runs}\nsweep: {{storage: '{storage}'}}\n")
    assert fine_tune_main(["confirm", "--config", str(tmp_path / "missing.yaml")]) == 2
    monkeypatch.setenv("OPTUNA_STORAGE", storage)
    assert analysis_main(["report", "--study", "not-there", "--runs-dir", str(runs)]) == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://viewer:{PASSWORD}@127.0.0.1:5000")
    assert fine_tune_main(["ui", "--config", str(tmp_path / "e.yaml")]) == 0
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err and ENV_SECRET not in out.out + out.err
    assert out.err.count("root:***@127.0.0.1") == 2 and "viewer:***@127.0.0.1:5000" in out.out


# Hostile values: each would set document.body.dataset.xss if it became markup, with no click (Chromium fires
# contentvisibilityautostatechange on its own). None holds '$' (matplotlib's mathtext) or, where the old link pattern
# would have read it, a space.
CV = "style=\"content-visibility:auto\"/oncontentvisibilityautostatechange=\"document.body.dataset.xss+="
HOSTILE_CLASS = f"[c](http://x/\"{CV}'class')"
HOSTILE_PARAM = "<script>document.body.dataset.xss+='param'</script>"
HOSTILE_RUN_ID = f"\"{CV}'run'"
HOSTILE_OBJECTIVE = "<img src=\"x\" onerror=\"document.body.dataset.xss+='objective'\">"
JAVASCRIPT_LINK = "[c](javascript:document.body.dataset.xss+='js')"


@pytest.mark.slow
def test_hostile_store_values_run_no_script_in_report_html(tmp_path, tiny_backbone, monkeypatch):
    """Item 3: a real tiny study, then what any worker on a shared server could write to it: class names in the
    champion's per_class_report.json, a param value, a trial's run id, the study's objective. The report shows them
    as text; Chromium runs none of them and the only links are the report's own, to http(s)."""
    if chromium() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI needs it: apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    runs = tmp_path / "runs"
    study = run_sweep(tiny_sweep(runs, tiny_backbone[0], "hostile", 2), progress=False, log=lambda s: None)
    champion = study.best_trial.user_attrs["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{runs.resolve()}/mlflow.db")
    per_class = json.loads(Path(client.download_artifacts(champion, "evaluation/per_class_report.json")).read_text())
    names = [k for k, v in per_class.items() if isinstance(v, dict) and not k.endswith("avg")]
    hostile = dict(zip(names, [HOSTILE_CLASS, JAVASCRIPT_LINK, HOSTILE_PARAM]))
    client.log_dict(champion, {hostile.get(k, k): v for k, v in per_class.items()}, "evaluation/per_class_report.json")
    client.log_param(champion, "evil", HOSTILE_PARAM)
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={"evil": HOSTILE_PARAM},
        distributions={"evil": optuna.distributions.CategoricalDistribution([HOSTILE_PARAM])},
        user_attrs={"mlflow_run_id": HOSTILE_RUN_ID}))
    study.set_user_attr("objective", HOSTILE_OBJECTIVE)
    monkeypatch.setenv("MLFLOW_UI_URL", "http://127.0.0.1:5000")  # run ids become links
    assert analysis_main(["report", "--study", "hostile", "--runs-dir", str(runs), "--out", str(tmp_path / "out"),
                          "--resamples", "200"]) == 0

    page = tmp_path / "out" / "hostile" / "report.html"
    with Page() as browser:
        browser.goto(page.as_uri())
        browser.wait_for("document.body && document.body.dataset.imagesLoaded !== undefined")
        # two frames after load: autofocus and image errors have been handled by then
        ran = browser.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => "
                         "r(document.body.dataset.xss || ''))))")
        text = browser.js("document.body.innerText")
        links = browser.js("Array.from(document.querySelectorAll('a')).map(a => [a.protocol, a.attributes.length])")
    assert ran == "", f"the report ran a store's value as script: {ran}"
    for value in (HOSTILE_CLASS, JAVASCRIPT_LINK, HOSTILE_PARAM, HOSTILE_OBJECTIVE, HOSTILE_RUN_ID[:8]):
        assert value in text, value  # shown as written
    assert links and all(link == ["http:", 1] for link in links), links  # only the report's run links, href only
