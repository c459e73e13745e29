"""The label-efficiency report: test accuracy and macro-F1 against labeled images per class for each arm (fine-tuned,
from scratch, linear probe), with the mean over seeds and its 95% confidence interval, from the runs `make curve`
logged to the MLflow experiment `<study>-curve`."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from analysis import plots, stats
from analysis.format import duration, slug, staged
from analysis.read import StoreError
from analysis.render import Bullets, Heading, Image, Report, Table, Text, write
from fine_tune.names import ARM, BUDGET, CURVE, SEED, STUDY, TUNED_BY, curve_experiment, role_filter

METRICS = ("test/accuracy", "test/f1_macro")


def load_runs(study: str, uri: str) -> pd.DataFrame:
    """The finished curve runs of `study`: arm, budget, seed, test metrics, duration."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    experiment = MlflowClient(uri).get_experiment_by_name(curve_experiment(study))
    if experiment is None:
        raise StoreError(f"study {study!r} has no curve in {uri}; run `make curve` first")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_ids=[experiment.experiment_id],
                              filter_string=f"{role_filter(CURVE)} and attributes.status = 'FINISHED'")
    if runs.empty:
        raise StoreError(f"study {study!r}: its curve has no finished runs yet; run `make curve`")
    out = pd.DataFrame({"run_id": runs.run_id, "arm": runs[f"tags.{ARM}"],
                        "budget": runs[f"tags.{BUDGET}"].astype(int),
                        "seed": runs[f"tags.{SEED}"].astype(int),
                        "data_seed": pd.to_numeric(runs["params.data_seed"]),
                        "duration_s": (runs.end_time - runs.start_time).dt.total_seconds(),
                        "tuned_by": runs.get(f"tags.{TUNED_BY}", pd.Series(None, index=runs.index, dtype=object)),
                        **{m: runs[f"metrics.{m}"] for m in METRICS}})
    return out.sort_values(["arm", "budget", "seed"]).reset_index(drop=True)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, budget): n seeds, and for each metric the mean with a 95% t-interval over seeds (the spread
    of the seeds' label draws and initialisations, the noise a single run hides)."""
    rows = []
    for (arm, budget), group in runs.groupby(["arm", "budget"]):
        row = {"arm": arm, "budget": budget, "n": len(group)}
        for m in METRICS:
            mean, low, high = stats.mean_ci(group[m])
            row |= {m: mean, f"{m} low": low, f"{m} high": high}
        rows.append(row)
    return pd.DataFrame(rows)


def finding(table: pd.DataFrame, baseline: str = "from scratch", metric: str = "test/accuracy") -> list[str]:
    """Per budget, each pretrained arm against `baseline` on `metric` (the gap, and whether the two intervals are
    apart), and a best arm only where its interval is apart from every other arm's; else the arms the seeds cannot
    tell apart."""
    out = []
    for budget, group in table.groupby("budget"):
        rows = group.set_index("arm")
        ci = {arm: (r[metric], r[f"{metric} low"], r[f"{metric} high"]) for arm, r in rows.iterrows()}
        if baseline in rows.index:  # each arm against the baseline
            base = ci[baseline]
            parts = [f"{baseline} {base[0]:.4f}"] + [
                f"{arm} {x[0]:.4f} ({100 * (x[0] - base[0]):+.1f} points, "
                f"{'intervals apart' if stats.apart(x, base) else 'intervals overlap'})"
                for arm, x in ci.items() if arm != baseline]
        else:
            parts = [f"{arm} {x[0]:.4f}" for arm, x in sorted(ci.items(), key=lambda kv: -kv[1][0])]
        top = rows[metric].idxmax()
        tied = [arm for arm in ci if arm != top and not stats.apart(ci[top], ci[arm])]
        why = "one seed: no interval" if rows.n.min() < 2 else "intervals overlap"
        verdict = (f"best: {top} (its interval apart from every other arm's)" if not tied else
                   f"no difference between {top} and {' or '.join(tied)} ({why})")
        out.append(f"{budget} per class: " + "; ".join(parts) + f"; {verdict}")
    return out


def tuned_with(runs: pd.DataFrame) -> list[str]:
    """Which hyperparameters each tuned arm (fine-tuned, or a method's best trial) trained with, as its runs recorded
    them."""
    out = []
    for arm in sorted(set(runs.arm) - {"from scratch", "linear probe"}):
        said = runs[runs.arm == arm].tuned_by.dropna().value_counts()
        if said.empty:
            out.append(f"{arm} arm's hyperparameters: not recorded by its runs (made before fine_tune recorded them)")
        elif len(said) == 1:
            out.append(f"{arm} arm's hyperparameters: {said.index[0]}")
        else:
            out.append(f"{arm} arm's hyperparameters (its runs differ): " + "; ".join(f"{s} ({n} runs)" for s, n in
                                                                                     said.items()))
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
        *tuned_with(runs), f"compute time: {duration(runs.duration_s.sum())}", *finding(table)]))
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
    folder = out / slug(curve_experiment(study))
    with staged(folder) as tmp:
        write(curve_report(study, runs, tmp), tmp)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(curve_experiment(study))
    parents = client.search_runs([experiment.experiment_id], role_filter(STUDY))
    if parents:
        client.log_artifacts(parents[0].info.run_id, str(folder), artifact_path="report")
    return folder
