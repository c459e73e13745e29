"""The label-efficiency report: test accuracy and macro-F1 against labeled images per class for each arm (fine-tuned,
from scratch, linear probe), with the mean over seeds and its 95% confidence interval, from the runs `make curve`
logged to the MLflow experiment `<study>-curve`."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from analysis import plots
from analysis.format import duration, slug, staged
from analysis.read import StoreError
from analysis.render import Bullets, Heading, Image, Report, Table, Text, write

METRICS = ("test/accuracy", "test/f1_macro")
SECTIONS = ["Summary", "Test accuracy vs labels per class", "Numbers"]


def load_runs(study: str, uri: str) -> pd.DataFrame:
    """The finished curve runs of `study`: arm, budget, seed, test metrics, duration."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    experiment = MlflowClient(uri).get_experiment_by_name(f"{study}-curve")
    if experiment is None:
        raise StoreError(f"study {study!r} has no curve in {uri}; run `make curve` first")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_ids=[experiment.experiment_id],
                              filter_string="tags.`fine_tune.role` = 'curve' and attributes.status = 'FINISHED'")
    if runs.empty:
        raise StoreError(f"study {study!r}: its curve has no finished runs yet; run `make curve`")
    out = pd.DataFrame({"run_id": runs.run_id, "arm": runs["tags.fine_tune.arm"],
                        "budget": runs["tags.fine_tune.budget"].astype(int),
                        "seed": runs["tags.fine_tune.seed"].astype(int),
                        "data_seed": pd.to_numeric(runs["params.data_seed"]),
                        "duration_s": (runs.end_time - runs.start_time).dt.total_seconds(),
                        **{m: runs[f"metrics.{m}"] for m in METRICS}})
    return out.sort_values(["arm", "budget", "seed"]).reset_index(drop=True)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, budget): n seeds, and for each metric the mean with a 95% t-interval over seeds (the spread
    of the seeds' label draws and initialisations, the noise a single run hides)."""
    rows = []
    for (arm, budget), group in runs.groupby(["arm", "budget"]):
        row = {"arm": arm, "budget": budget, "n": len(group)}
        for m in METRICS:
            values = group[m].to_numpy()
            half = (scipy_stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
                    if len(values) > 1 else np.nan)
            row |= {m: values.mean(), f"{m} low": values.mean() - half, f"{m} high": values.mean() + half}
        rows.append(row)
    return pd.DataFrame(rows)


def finding(table: pd.DataFrame, baseline: str = "from scratch") -> list[str]:
    """Per budget, the best arm on test accuracy, and each pretrained arm against `baseline`: the gap, and whether
    the two intervals are apart."""
    out = []
    for budget, group in table.groupby("budget"):
        rows = group.set_index("arm")
        if baseline not in rows.index:
            continue
        base = rows.loc[baseline]
        parts = []
        for arm, x in rows.drop(index=baseline).iterrows():
            apart = (x["test/accuracy low"] > base["test/accuracy high"]
                     or base["test/accuracy low"] > x["test/accuracy high"])
            parts.append(f"{arm} {x['test/accuracy']:.4f} ({100 * (x['test/accuracy'] - base['test/accuracy']):+.1f} "
                         f"points, {'intervals apart' if apart else 'intervals overlap'})")
        out.append(f"{budget} per class: {baseline} {base['test/accuracy']:.4f}; " + "; ".join(parts)
                   + f"; best: {rows['test/accuracy'].idxmax()}")
    return out


def curve_report(study: str, runs: pd.DataFrame, folder: Path) -> Report:
    table = summarise(runs)
    report = Report(f"Label efficiency: {study}")
    seeds = sorted(runs.seed.unique())
    draws = ("each seed draws its own labeled images and initialisation" if runs.data_seed.nunique() > 1 else
             "seeds vary initialisation and batch order; every seed has the same labeled images, drawn from those "
             "held out of pretraining, as the target shares its classes")
    report.add(Heading("Summary"), Bullets([
        f"{len(runs)} finished runs: {len(table.arm.unique())} arms x {len(table.budget.unique())} budgets, seeds "
        f"{', '.join(map(str, seeds))} ({draws})",
        f"compute time: {duration(runs.duration_s.sum())}", *finding(table)]))
    report.add(Heading("Test accuracy vs labels per class"),
               Image(plots.curve(table, "test/accuracy", folder / "curve_accuracy.png"), "accuracy vs labels"),
               Image(plots.curve(table, "test/f1_macro", folder / "curve_f1.png"), "macro-F1 vs labels"),
               Text("Points: mean over seeds; bars: 95% t-interval over seeds. x is logarithmic."))
    cells = pd.DataFrame({"labels per class": table.budget.map(str), "arm": table.arm, "n": table.n.map(str),
                          **{m: [f"{r[m]:.4f} [{r[m + ' low']:.4f}, {r[m + ' high']:.4f}]" for _, r in table.iterrows()]
                             for m in METRICS}}).sort_values(["labels per class", "arm"], key=lambda c: c.map(
                                 lambda v: int(v) if v.isdigit() else v))
    report.add(Heading("Numbers"), Table(cells, "Mean over seeds [95% t-interval]; the test set is the same for every "
                                                "run and never drove a decision."))
    return report


def build(study: str, uri: str, out: Path) -> Path:
    """Write reports/<study>-curve/ (report.md, report.html, PNGs) and log it to the curve's parent run."""
    from mlflow.tracking import MlflowClient

    runs = load_runs(study, uri)
    folder = out / f"{slug(study)}-curve"
    with staged(folder) as tmp:
        write(curve_report(study, runs, tmp), tmp)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(f"{study}-curve")
    parents = client.search_runs([experiment.experiment_id], "tags.`fine_tune.role` = 'study'")
    if parents:
        client.log_artifacts(parents[0].info.run_id, str(folder), artifact_path="report")
    return folder
