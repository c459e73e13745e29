"""The report must not mislead: on real tiny studies (real sweeps, real SQLite stores), every claim it makes is checked
against what the stores hold: confounded hyperparameters (every pair, both ways), each trial's time, which epoch a run's
checkpoint is, the answer stated at the top with its numbers, and figures that tell trials apart."""
import re

import numpy as np
import optuna
import pytest
from helpers import runs_of, study_in, tiny_sweep
from matplotlib.collections import LineCollection, PathCollection
from mlflow.tracking import MlflowClient

from analysis import plots, stats
from analysis.__main__ import main
from fine_tune.study.sweep import run_sweep
from fine_tune.track.stores import tracking_uri

# module fixtures: the file's tests run in one of `make test`'s processes (pytest-xdist, --dist loadgroup)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_report_claims")]

SEARCH = {"lr": {"low": 1e-3, "high": 3e-2, "log": True}, "frozen_layers": {"low": 0, "high": 2},
          "head_size": [0, 16, 32]}
# Every value of frozen_layers occurs with two head sizes or more, but head_size 16 only with frozen_layers 0: the check
# that looked one way (frozen_layers -> head_size) found nothing. With 8 epochs, trial 1 overfits by its loss while its
# F1 is best at its last epoch, and trial 4 overfits with its best F1 before the last.
CLAIMS = [(3e-2, 0, 16), (2e-2, 0, 32), (3e-2, 2, 0), (1e-2, 2, 32), (3e-2, 0, 0)]
# A good first trial, then poor ones the median pruner stops (as tests/test_ui.py).
PRUNED = [(2e-2, 0, 0), (1e-3, 2, 0), (1e-3, 2, 0), (1.5e-3, 2, 0)]


def sweep(runs, backbone, name: str, trials: list, **overrides) -> None:
    study = optuna.create_study(study_name=name, direction="maximize", storage=f"sqlite:///{runs}/optuna.db")
    for lr, frozen, head in trials:
        study.enqueue_trial({"lr": lr, "frozen_layers": frozen, "head_size": head})
    run_sweep(tiny_sweep(runs, backbone, name, len(trials), search=SEARCH, **overrides), progress=False,
              log=lambda s: None)


@pytest.fixture(scope="module")
def reports(tmp_path_factory, tiny_backbone):
    """Both studies' reports, and every figure they drew (the matplotlib figure, before it was written)."""
    env = pytest.MonkeyPatch()
    env.delenv("OPTUNA_STORAGE", raising=False)  # a module's stores are its own (conftest's autouse is per test)
    env.delenv("MLFLOW_TRACKING_URI", raising=False)
    tmp = tmp_path_factory.mktemp("claims")
    runs = tmp / "runs"
    runs.mkdir()
    sweep(runs, tiny_backbone[0], "claims", CLAIMS, epochs=8)
    sweep(runs, tiny_backbone[0], "claims-pruned", PRUNED, epochs=4,
          sweep={"n_trials": 4, "pruner": "median", "prune_startup_trials": 1, "prune_warmup_epochs": 0})
    assert any(t.state.name == "PRUNED" for t in study_in(runs, "claims-pruned").trials)
    # A write to a run after its trial (registering the champion reopened its run) moves the run's end, not the trial's.
    champion = study_in(runs, "claims").best_trial.user_attrs["mlflow_run_id"]
    client = MlflowClient(tracking_uri(runs))
    client.set_terminated(champion, "FINISHED", end_time=client.get_run(champion).info.end_time + 60_000)

    figures, save = {}, plots._save
    env.setattr(plots, "_save", lambda fig, path: figures.setdefault(path.parent.name.split(".")[1], {})
                .__setitem__(path.name, fig) or save(fig, path))
    for name in ("claims", "claims-pruned"):
        assert main(["report", "--study", name, "--runs-dir", str(runs), "--out", str(tmp / "reports"),
                     "--resamples", "100"]) == 0
    env.setattr(plots, "_save", save)
    yield {name: ((tmp / "reports" / name / "report.md").read_text(), figures[name])
            for name in ("claims", "claims-pruned")} | {"runs": runs}
    env.undo()


def section(md: str, heading: str) -> str:
    return md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def table(text: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def complete_trials(runs, name: str) -> list:
    return [t for t in study_in(runs, name).trials if t.state.name == "COMPLETE"]


def test_every_pair_of_hyperparameters_is_checked_for_confounds_both_ways(reports):
    md = reports["claims"][0]
    complete = complete_trials(reports["runs"], "claims")
    expected = set()
    for a, b in (("frozen_layers", "head_size"), ("head_size", "frozen_layers")):
        for value in {t.params[a] for t in complete}:
            partners = {t.params[b] for t in complete if t.params[a] == value}
            n = sum(t.params[a] == value for t in complete)
            if len(partners) == 1:
                expected.add(f"{a} = {value} (n={n}) only with {b} = {partners.pop()}")
    assert "head_size = 16 (n=1) only with frozen_layers = 0" in expected  # what the study was built to hold
    found = set(re.findall(r"(\w+ = \S+ \(n=\d+\) only with \w+ = [^,;]+)", section(md, "Validation F1 by discrete "
                                                                                         "hyperparameter")))
    assert found == expected
    said = section(md, "What this study says")
    assert "Confounded" in next(line for line in said.splitlines() if line.startswith("- head_size"))
    assert "head_size was confounded with another hyperparameter" in section(md, "Parameter importance")


def test_a_trials_time_is_its_own_not_its_runs(reports):
    board = table(section(reports["claims"][0], "Leaderboard"))
    trials = {t.number: t for t in study_in(reports["runs"], "claims").trials}
    runs = runs_of(reports["runs"], "claims").set_index("tags.optuna.trial_number")
    champion = study_in(reports["runs"], "claims").best_trial.number
    run = runs.loc[str(champion)]
    assert (run.end_time - run.start_time).total_seconds() > 60  # the run was written to a minute later
    for row in board:
        trial = trials[int(row["trial"])]
        assert float(row["time (s)"]) == pytest.approx(trial.duration.total_seconds(), abs=0.05), row["trial"]
    total = sum(t.duration.total_seconds() for t in trials.values())
    assert f"total compute time: {total:.0f} s" in section(reports["claims"][0], "Summary")


def test_each_overfitting_note_says_which_epoch_its_own_checkpoint_is(reports):
    notes = [ln for ln in section(reports["claims"][0], "Train vs validation loss").splitlines()
             if ln.startswith("- t")]
    runs = runs_of(reports["runs"], "claims").set_index("tags.optuna.trial_number")
    last_was_best = 0
    for note in notes:
        run = runs.loc[str(int(note[3:6]))]
        best, last = int(run["metrics.best_epoch"]), int(run["metrics.epochs_run"])
        if best == last:
            last_was_best += 1
            assert f"its checkpoint is its last epoch ({last})" in note and "not the last" not in note, note
        else:
            assert f"its checkpoint is epoch {best} (its best val/f1_macro), not the last ({last})" in note, note
    assert notes and last_was_best  # the case a fixed sentence got wrong: the best epoch was the last


def test_the_report_states_its_answer_first_with_the_numbers_below(reports):
    md = reports["claims"][0]
    assert md.split("\n## ", 2)[1].startswith("What this study says\n")
    said = [ln[2:] for ln in section(md, "What this study says").splitlines() if ln.startswith("- ")]
    best = table(section(md, "Leaderboard"))[0]
    assert said[0].startswith(f"Trial {best['trial']} is the best of 5 complete trials: val/f1_macro "
                              f"{best['val/f1_macro']}, test accuracy {best['test/accuracy']}")
    rows = table(section(md, "Validation F1 by discrete hyperparameter"))
    complete = complete_trials(reports["runs"], "claims")
    column = "val/f1_macro: mean [95% CI], trials"
    for hp in ("frozen_layers", "head_size"):
        line = next(s for s in said if s.startswith(f"{hp} = "))
        ci = {}
        for row in (r for r in rows if r["hyperparameter"] == hp):
            ci[row["value"]] = stats.mean_ci([t.value for t in complete if str(t.params[hp]) == row["value"]])
            mean, low, high = ci[row["value"]]
            assert row[column].startswith(f"{mean:.4f} [{low:.4f}, {high:.4f}]" if not np.isnan(low) else
                                          f"{mean:.4f} from 1 trial")
        top = max(ci, key=lambda v: ci[v][0])
        for value in ci.keys() - {top}:  # each comparison quotes the table's numbers, and says "beat" only if apart
            clause = next(c for c in line.split("; ") if re.match(rf"{hp} = {top} (beat|vs) {value}\b", c))
            wanted = "beat" if stats.apart(ci[top], ci[value]) else "vs"
            assert clause.startswith(f"{hp} = {top} {wanted} {value}"), clause
            for v in (top, value):
                assert next(r[column] for r in rows if r["hyperparameter"] == hp and r["value"] == v) in clause
    assert any("McNemar" in s for s in said)


def colour(points) -> tuple:
    rgba = points.get_facecolor() if len(points.get_facecolor()) else points.get_edgecolor()
    return tuple(np.round(rgba[0][:3], 3))


def luminance(rgba) -> float:
    return 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]


def test_figures_tell_the_trials_apart(reports):
    figures = reports["claims"][1]
    ax = figures["parallel_coordinates.png"].axes[0]
    lines = next(c for c in ax.collections if isinstance(c, LineCollection))
    assert max(luminance(c) for c in lines.to_rgba(lines.get_array())) < 0.85  # no trial drawn near-white
    names = [t.get_text() for t in ax.get_xticklabels()][1:]
    twin = figures["parallel_coordinates.png"].axes[2 + names.index("frozen_layers")]
    low, high = twin.get_ylim()
    assert [t for t in twin.get_yticks() if low <= t <= high] == [0, 1, 2]  # whole numbers, not quarters

    for name in ("claims", "claims-pruned"):
        legend = [t.get_text() for t in reports[name][1]["intermediate_values.png"].axes[0].get_legend().get_texts()]
        assert any("complete trial" in t for t in legend), legend

    panel = reports["claims-pruned"][1]["continuous_vs_val_f1.png"].axes[0]
    legend = [t.get_text() for t in panel.get_legend().get_texts()]
    assert len([t for t in legend if "pruned" in t]) == 1 and "epoch" in next(t for t in legend if "pruned" in t)
    points = [c for c in panel.collections if isinstance(c, PathCollection) and len(c.get_offsets())]
    pruned = {colour(c) for c in points if "pruned" in c.get_label()}
    complete = {colour(c) for c in points if "pruned" not in c.get_label()}
    assert pruned and complete and not pruned & complete  # told apart at a glance, not by the marker alone

    for name, method in (("fanova", "fANOVA"), ("ped_anova", "PED-ANOVA")):
        ax = figures[f"param_importances_{name}.png"].axes[0]
        titles = [t for t in (ax.get_title(loc) for loc in ("left", "center", "right")) if t]
        assert len(titles) == 1 and method in titles[0], titles
