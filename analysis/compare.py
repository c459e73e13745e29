"""Several studies side by side: how good each one's best is, how fast it got there, how its trials spread."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis import plots, stats
from analysis.format import fmt, slug, staged
from analysis.read import StudyData
from analysis.render import Heading, Image, Report, Table, Text, write
from analysis.report import predictions, seed_group
from fine_tune.names import SCORE

SECTIONS = ["Best trial per study", "Validation F1 distributions", "Best so far"]


def reached_best(data: StudyData) -> tuple[int, int]:
    """The trial that first reached the study's best value, and how many complete trials that took."""
    complete = data.trials[data.trials.state == "COMPLETE"].sort_values("number").reset_index(drop=True)
    first = complete.value.idxmax()  # idxmax returns the first occurrence of the maximum
    return int(complete.number[first]), first + 1


def best_so_far(data: StudyData) -> pd.Series:
    """The study's best objective value after each complete trial (indexed 1, 2, ...)."""
    values = data.trials[data.trials.state == "COMPLETE"].sort_values("number").value.cummax()
    values.index = range(1, len(values) + 1)
    return values


def best_row(data: StudyData, resamples: int) -> dict[str, str]:
    best = data.complete.iloc[0]
    trial, count = reached_best(data)
    row = {"study": data.name, "complete trials": str(len(data.complete)), "best trial": str(int(best.number)),
           "best val/f1_macro": fmt(best[SCORE], ".4f"), "its test/f1_macro": fmt(best["test/f1_macro"], ".4f")}
    group = seed_group(data, int(best.number))
    if len(group) > 1:
        preds = predictions(group.run_id)
        ci = stats.bootstrap_ci(preds[0], preds[1], stats.macro_f1, resamples) if preds else None
        row["test/f1_macro over seeds"] = (f"{group['test/f1_macro'].mean():.4f} ± {group['test/f1_macro'].std():.4f} "
                                           f"(n={len(group)})" + (f", 95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
    else:
        row["test/f1_macro over seeds"] = "- (no re-runs; `make confirm`)"
    row["best reached at"] = f"trial {trial} ({count} complete trials)"
    return row


def compare_report(studies: list[StudyData], folder: Path, resamples: int = stats.RESAMPLES) -> Report:
    report = Report("Study comparison: " + ", ".join(d.name for d in studies))
    table = pd.DataFrame([best_row(d, resamples) for d in studies])
    report.add(Heading("Best trial per study"),
               Table(table, "val/* at the best epoch; the CI is a percentile bootstrap over test images "
                            f"({resamples} resamples) of the mean over the best trial's seeds, where re-runs exist."))
    scores = {d.name: d.complete.sort_values("number")[SCORE] for d in studies}
    report.add(Heading("Validation F1 distributions"),
               Image(plots.distributions(scores, SCORE, folder / "val_f1_distributions.png"), "val F1 by study"),
               Text("Each point is one complete trial; a study whose box sits higher is better on average, not only "
                    "at its best."))
    curves = {d.name: best_so_far(d) for d in studies}
    objectives = {d.objective for d in studies}
    objective = objectives.pop() if len(objectives) == 1 else "objective"
    report.add(Heading("Best so far"),
               Image(plots.best_so_far(curves, objective, folder / "best_so_far.png"), "best so far"))
    return report


def build(studies: list[StudyData], out: Path, resamples: int = stats.RESAMPLES) -> Path:
    """Write reports/compare-<a>-<b>.../ (report.md, report.html, PNGs)."""
    folder = out / ("compare-" + "-".join(slug(d.name) for d in studies))
    with staged(folder) as tmp:
        write(compare_report(studies, tmp, resamples), tmp)
    return folder
