"""Reports on real tiny studies: two sweeps on real SQLite stores, re-runs of the top two trials with other seeds,
then `python -m analysis report / compare` and assertions on what a reader of the report would see."""
import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from helpers import runs_of, tiny_sweep
from matplotlib import image as mpimg
from mlflow.tracking import MlflowClient

from analysis import compare, report, stats
from analysis.__main__ import main
from fine_tune.study.confirm import confirm
from fine_tune.study.sweep import run_sweep

RESAMPLES = 200  # the CLI's --resamples: enough for an interval in a test, a tenth of the default's time
SEEDS = (1, 2)  # the re-runs' seeds; the trials themselves ran with seed 0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


# module fixtures: the file's tests run in one of `make test`'s processes (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_report")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_backbone):
    """Study rep-a (4 trials, its top two re-run with 2 more seeds each) and rep-b (3 trials), one runs dir."""
    env = pytest.MonkeyPatch()
    env.delenv("OPTUNA_STORAGE", raising=False)
    env.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path_factory.mktemp("report") / "runs"
    a = tiny_sweep(runs, tiny_backbone[0], "rep-a", 4)
    run_sweep(a, progress=False, log=lambda s: None)
    assert confirm(a, top_k=2, seeds=len(SEEDS), log=lambda s: None) == 4  # what `make confirm` records
    run_sweep(tiny_sweep(runs, tiny_backbone[0], "rep-b", 3), progress=False, log=lambda s: None)
    yield runs
    env.undo()


@pytest.fixture(scope="module")
def report_a(stores):
    out = stores.parent / "reports"
    assert main(["report", "--study", "rep-a", "--runs-dir", str(stores), "--out", str(out),
                 "--resamples", str(RESAMPLES)]) == 0
    return out / "rep-a"


def section(md: str, heading: str) -> str:
    """The text under `## heading`, up to the next `## `."""
    return md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def md_table(text: str) -> pd.DataFrame:
    """The first Markdown table in `text`, as strings."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    return pd.DataFrame(cells[2:], columns=cells[0])


def test_report_finds_the_stores_where_the_experiment_put_them(stores, tmp_path):
    """An experiment whose YAML sets `runs_dir` and `sweep.storage` (an Optuna database outside the runs dir): with
    --config, the report reads the stores the sweep wrote, as `make report` does."""
    runs = tmp_path / "copy"
    shutil.copytree(stores, runs)
    (tmp_path / "elsewhere").mkdir()
    for f in runs.glob("optuna.db*"):  # with its write-ahead log
        f.rename(tmp_path / "elsewhere" / f.name.replace("optuna", "study"))
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text(f"study: rep-a\nruns_dir: {runs}\nsweep: {{storage: 'sqlite:///{tmp_path}/elsewhere/study.db'}}\n")
    out = tmp_path / "reports"
    assert main(["report", "--study", "rep-a", "--runs-dir", str(runs), "--out", str(out)]) == 2  # not in runs_dir
    assert main(["report", "--study", "rep-a", "--config", str(yaml_file), "--out", str(out),
                 "--resamples", str(RESAMPLES)]) == 0
    assert (out / "rep-a" / "report.md").is_file()


@pytest.mark.slow
def test_report_has_every_section_and_its_leaderboard_is_what_mlflow_holds(report_a, stores):
    md = (report_a / "report.md").read_text()
    for heading in report.SECTIONS:
        assert f"\n## {heading}\n" in md, heading
    assert "4 complete, 0 pruned, 0 failed" in section(md, "Summary")

    board = md_table(section(md, "Leaderboard"))
    runs = runs_of(stores, "rep-a")
    trials = runs[runs["tags.fine_tune.role"] == "trial"].set_index("tags.optuna.trial_number")
    assert len(board) == 4 and list(board["val/f1_macro"]) == sorted(board["val/f1_macro"], reverse=True)
    for _, row in board.iterrows():
        run = trials.loc[row.trial]
        assert float(row.lr) == pytest.approx(float(run["params.lr"]), rel=1e-2)
        assert row.frozen_layers == run["params.frozen_layers"] and row.head_size == run["params.head_size"]
        assert row["trainable params"].replace(",", "") == run["params.trainable_params"]
        for col, key in (("val/accuracy", "best/val/accuracy"), ("val/f1_macro", "best/val/f1_macro"),
                         ("test/accuracy", "test/accuracy"), ("test/f1_macro", "test/f1_macro")):
            assert float(row[col]) == pytest.approx(run[f"metrics.{key}"], abs=5e-5), (row.trial, col)
        trial = optuna.load_study(study_name="rep-a", storage=f"sqlite:///{stores}/optuna.db").trials[int(row.trial)]
        assert float(row["time (s)"]) == pytest.approx(trial.duration.total_seconds(), abs=0.05)  # the trial's own


@pytest.mark.slow
def test_report_images_are_pngs_beside_the_markdown_and_inside_the_html(report_a):
    md, page = (report_a / "report.md").read_text(), (report_a / "report.html").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(linked) == {"optimization_history.png", "intermediate_values.png", "param_importances_fanova.png",
                           "param_importances_ped_anova.png", "parallel_coordinates.png", "continuous_vs_val_f1.png",
                           "val_f1_by_discrete.png", "learning_curves.png", "losses.png", "champion_confusion_matrix.png",
                           "accuracy_vs_f1.png", "pareto_front.png"}
    for name in linked:
        data = (report_a / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert mpimg.imread(report_a / name).shape[0] > 100, name
    embedded = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    assert len(embedded) == len(linked) and page.count("<img") == len(linked)
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in embedded)
    assert "src=\"http" not in page and "href=\"http" not in page  # self-contained


@pytest.mark.slow
def test_report_is_logged_to_the_study_parent_run(report_a, stores):
    runs = runs_of(stores, "rep-a")
    parent = runs[runs["tags.fine_tune.role"] == "study"].run_id.iloc[0]
    logged = {Path(a.path).name for a in MlflowClient().list_artifacts(parent, "report")}
    assert {p.name for p in report_a.iterdir()} <= logged and {"report.md", "report.html"} <= logged
    text = mlflow.artifacts.load_text(f"runs:/{parent}/report/report.md")
    assert text == (report_a / "report.md").read_text()


@pytest.mark.slow
def test_noise_section_gives_seed_statistics_intervals_and_mcnemar(report_a, stores):
    md = (report_a / "report.md").read_text()
    text = section(md, "Noise-aware comparison")
    groups = md_table(text)
    runs = runs_of(stores, "rep-a")
    assert len(groups) == 2 and set(groups.n) == {"3"} and set(groups.seeds) == {"0, 1, 2"}
    for _, row in groups.iterrows():
        same = runs[((runs["tags.fine_tune.role"] == "trial") & (runs["tags.optuna.trial_number"] == row.trial))
                    | ((runs["tags.fine_tune.role"] == "rerun") & (runs["tags.fine_tune.rerun_of"] == row.trial))]
        for metric in ("test/accuracy", "test/f1_macro"):
            mean, std = (float(x) for x in row[f"{metric} mean ± std"].split(" ± "))
            assert mean == pytest.approx(same[f"metrics.{metric}"].mean(), abs=5e-5)
            assert std == pytest.approx(same[f"metrics.{metric}"].std(), abs=5e-5)
            low, high = (float(x) for x in re.fullmatch(r"\[(.+), (.+)\]", row[f"{metric} 95% CI"]).groups())
            assert 0 <= low <= mean <= high <= 1 and high - low > 0

    # McNemar on the best and the runner-up trial: the discordant counts are those of their test predictions
    m = re.search(r"best trial (\d+) vs runner-up (\d+) .* only trial \1 right on (\d+), only trial \2 right on "
                  r"(\d+)\. Verdict: (trial \d+ is significantly better than trial \d+|no significant difference) "
                  r"\(p=([0-9.e+-]+)\)", text)
    assert m, text
    assert list(m.groups()[:2]) == list(md_table(section(md, "Leaderboard")).trial[:2])
    trials = runs[runs["tags.fine_tune.role"] == "trial"].set_index("tags.optuna.trial_number")
    preds = [mlflow.artifacts.load_dict(f"runs:/{trials.run_id[n]}/evaluation/test_predictions.json")
             for n in m.groups()[:2]]
    y, right_a, right_b = (np.array(preds[0]["y_true"]), *(np.array(p["y_pred"]) == preds[0]["y_true"] for p in preds))
    assert (int(m[3]), int(m[4])) == (np.sum(right_a & ~right_b), np.sum(~right_a & right_b))
    assert 0 < float(m[6]) <= 1 and len(y) == 200


@pytest.mark.slow
def test_report_without_reruns_says_how_to_get_them(stores, tmp_path):
    assert main(["report", "--study", "rep-b", "--runs-dir", str(stores), "--out", str(tmp_path)]) == 0
    text = section((tmp_path / "rep-b" / "report.md").read_text(), "Noise-aware comparison")
    assert "No re-runs yet" in text and "`make confirm`" in text and "McNemar" in text


@pytest.mark.slow
def test_compare_puts_two_studies_side_by_side(stores, tmp_path):
    assert main(["compare", "--studies", "rep-a", "rep-b", "--runs-dir", str(stores), "--out", str(tmp_path),
                 "--resamples", str(RESAMPLES)]) == 0
    folder = tmp_path / "compare-rep-a-rep-b"
    md = (folder / "report.md").read_text()
    for heading in compare.SECTIONS:
        assert f"\n## {heading}\n" in md, heading
    table = md_table(section(md, "Best trial per study")).set_index("study")
    for name in ("rep-a", "rep-b"):
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{stores}/optuna.db")
        assert float(table.loc[name, "best val/f1_macro"]) == pytest.approx(study.best_value, abs=5e-5)
        assert table.loc[name, "best trial"] == str(study.best_trial.number)
    assert "95% CI [" in table.loc["rep-a", "test/f1_macro over seeds"]
    assert "make confirm" in table.loc["rep-b", "test/f1_macro over seeds"]
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (folder / name).read_bytes().startswith(PNG_MAGIC)
    assert (folder / "report.html").read_text().count("data:image/png;base64,") == 2


@pytest.mark.slow
def test_a_missing_study_is_one_line_and_exit_2(stores, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-m", "analysis", "report", "--study", "no-such-study", "--runs-dir",
                           str(stores), "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                          env=env | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: study 'no-such-study' is not in ")
    assert "rep-a" in lines[0] and "make sweep" in lines[0]  # what is there, and the fix
    assert not (tmp_path / "out").exists()


def test_a_runs_dir_without_stores_is_one_line_and_creates_nothing(tmp_path, capsys):
    assert main(["report", "--study", "rep-a", "--runs-dir", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: study 'rep-a': no Optuna storage at ") and "make sweep" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_study_without_finished_trials_is_one_line_and_exit_2(stores, tmp_path, capsys):
    study = optuna.create_study(study_name="rep-empty", storage=f"sqlite:///{stores}/optuna.db")
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    assert main(["compare", "--studies", "rep-a", "rep-empty", "--runs-dir", str(stores),
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "rep-empty" in err[0] and "no finished trials" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium(report_a, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI needs it: apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    page = report_a / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]

    # the page's own script records, on load, how many of its images decoded
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    loaded = re.search(r'data-images-loaded="(\d+)"', body[1])
    broken = re.search(r'data-images-broken="(\d+)"', body[1])
    assert loaded and broken, body[0]
    assert int(loaded[1]) == page.read_text().count("<img") > 0 and int(broken[1]) == 0

    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1200)
    assert pixels.std() > 0.05 and (pixels < 0.9).mean() > 0.02  # text and figures, not an empty page


def test_mcnemar_bootstrap_and_pareto_on_known_inputs():
    y = np.zeros(40, dtype=int)
    a, b = y.copy(), y.copy()
    b[:10] = 1  # only A is right on 10 images, only B on none: p = 2 * 0.5**10
    test = stats.mcnemar(y, a, b)
    assert (test.a_only, test.b_only) == (10, 0) and test.p == pytest.approx(2 * 0.5 ** 10)
    assert stats.mcnemar_sentence(3, 5, test) == "trial 3 is significantly better than trial 5 (p=0.00195)"
    assert stats.mcnemar_sentence(3, 5, stats.mcnemar(y, a, a)).startswith("no significant difference (p=1)")

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    preds = [np.where(rng.random(300) < 0.8, y, rng.integers(0, 3, 300)) for _ in range(3)]
    # the counted metrics are sklearn's, one by one and along a batch of resamples
    from sklearn.metrics import accuracy_score, f1_score

    cases = [(y, p) for p in preds] + [(y, np.minimum(preds[0], 1)), (y[y != 2], preds[1][y != 2])]
    for yt, yp in cases:
        assert stats.accuracy(yt, yp) == pytest.approx(accuracy_score(yt, yp), abs=1e-12)
        assert stats.macro_f1(yt, yp) == pytest.approx(f1_score(yt, yp, average="macro", zero_division=0), abs=1e-12)
    idx = rng.integers(0, 300, (5, 300))
    assert stats.macro_f1(y[idx], preds[0][idx]) == pytest.approx(
        [f1_score(y[i], preds[0][i], average="macro", zero_division=0) for i in idx], abs=1e-12)
    low, high = stats.bootstrap_ci(y, preds, stats.macro_f1, resamples=100)
    assert low < np.mean([stats.macro_f1(y, p) for p in preds]) < high
    assert stats.bootstrap_ci(y, preds, stats.macro_f1, resamples=100) == (low, high)  # seeded: same stores, same CI

    df = pd.DataFrame({"size": [10, 10, 20, 30, 40], "score": [0.5, 0.6, 0.55, 0.7, 0.7]})
    assert list(stats.pareto_front(df, "size", "score")) == [False, True, False, True, False]


def test_a_study_name_never_makes_the_report_replace_anything_outside_its_folder(tmp_path):
    """Item 1: `--study ..` used to delete the parent of --out (the checkout). Names become plain folder names, and
    the staged write refuses any folder that is not a plain child of its parent."""
    from analysis.format import slug, staged

    assert slug("..") == "__" and slug(".") == "_" and slug("") == "_" and slug("a/../b") == "a____b"
    (tmp_path / "keep").write_text("the checkout")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "link").symlink_to(tmp_path)  # a name that resolves to the checkout
    for folder in (tmp_path / "reports" / "..", tmp_path / "reports" / "link"):
        with pytest.raises(ValueError, match="not a plain folder"):
            with staged(folder):
                pass
    assert (tmp_path / "keep").read_text() == "the checkout"
    assert main(["report", "--study", "..", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path)]) == 2
    assert (tmp_path / "keep").exists()
