"""The report on one study: what ran, what won, what mattered, and whether the ranking at the top is noise."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots, stats
from analysis.findings import says
from analysis.format import duration, fmt, hyperparameter_columns, run_link, slug, staged
from analysis.hyperparams import curves, search
from analysis.read import StudyData, load_json
from analysis.render import Bullets, Heading, Image, Report, Table, Text, write
from fine_tune.names import SCORE
from fine_tune.track.figures import confusion_png
from fine_tune.track.stores import masked

TOP = 10  # trials in the leaderboard
SECTIONS = ["What this study says", "Summary", "Leaderboard", "How to fine-tune", "All trials", "Optimization history",
            "Every trial per epoch", "Parameter importance", "Hyperparameters together",
            "Continuous hyperparameters vs validation F1", "Validation F1 by discrete hyperparameter", "Learning curves", "Train vs validation loss",
            "Champion: confusion matrix and per-class scores", "Accuracy vs macro-F1",
            "Pareto front: validation F1 vs trainable parameters", "Noise-aware comparison"]


# --- seed groups: a trial and its re-runs with other seeds


def seed_group(data: StudyData, number: int) -> pd.DataFrame:
    """The finished runs of trial `number` (the trial itself and its re-runs), one per seed, by seed."""
    trial = data.trials[(data.trials.number == number) & (data.trials.state == "COMPLETE")]
    reruns = data.reruns[(data.reruns.rerun_of == number) & (data.reruns.status == "FINISHED")]
    group = pd.concat([trial, reruns], ignore_index=True).dropna(subset=["test/accuracy"])
    return group.drop_duplicates("seed").sort_values("seed", kind="stable")


def predictions(run_ids) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """The test labels and each run's test predictions, or None if a run lacks them or the test sets differ."""
    loaded = [load_json(run_id, "evaluation/test_predictions.json") for run_id in run_ids]
    if any(p is None for p in loaded):
        return None
    y_true = np.asarray(loaded[0]["y_true"])
    if any(not np.array_equal(y_true, p["y_true"]) for p in loaded):
        return None
    return y_true, [np.asarray(p["y_pred"]) for p in loaded]


def group_row(number: int, group: pd.DataFrame, resamples: int) -> dict[str, str]:
    """n seeds, mean ± std and the bootstrap 95% CI of test accuracy and macro-F1 for trial `number`'s seeds."""
    row = {"trial": str(number), "seeds": ", ".join(fmt(s, "g") for s in group.seed),
           "n": str(len(group))}
    preds = predictions(group.run_id)
    for metric, fn in (("test/accuracy", stats.accuracy), ("test/f1_macro", stats.macro_f1)):
        row[f"{metric} mean ± std"] = f"{group[metric].mean():.4f} ± {fmt(group[metric].std(), '.4f')}"
        ci = stats.bootstrap_ci(preds[0], preds[1], fn, resamples) if preds else None
        row[f"{metric} 95% CI"] = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "- (no test_predictions.json)"
    return row


# --- the sections


def summary(data: StudyData) -> list:
    t = data.trials
    counts = t.state.value_counts()
    states = ", ".join(f"{counts.get(s, 0)} {w}" for s, w in
                       (("COMPLETE", "complete"), ("PRUNED", "pruned"), ("FAIL", "failed")))
    others = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if s not in ("COMPLETE", "PRUNED", "FAIL"))
    best = data.complete.iloc[0]
    pruned = t[t.state == "PRUNED"]
    saved = (pruned.epochs - pruned.epochs_reported).sum()
    # each trial's own time (Optuna's): a retry has its own, though it continues the run of the trial it retries
    trial_time, rerun_time = t.duration_s.sum(), data.reruns.duration_s.sum()
    return [Heading("Summary"), Bullets([
        f"trials: {states}" + (f" ({others})" if others else ""),
        f"best {data.objective}: {best.value:.4f} (trial {best.number}, the champion)",
        f"total compute time: {duration(trial_time + rerun_time)}"
        + (f" ({duration(trial_time)} in trials, {duration(rerun_time)} in re-runs)" if len(data.reruns) else ""),
        f"epochs saved by pruning: {saved:.0f} (planned minus run, over the pruned trials)",
        f"re-runs with other seeds: {len(data.reruns)}"
        + (f" of trials {', '.join(str(int(n)) for n in sorted(data.reruns.rerun_of.dropna().unique()))}"
           if len(data.reruns) else ""),
        f"stores: Optuna `{masked(data.storage_url)}`, "
        f"MLflow `{masked(data.tracking_uri)}` (parent run `{data.parent_run_id}`)",
    ])]


def leaderboard(data: StudyData) -> list:
    top = data.complete.head(TOP)
    table = pd.DataFrame({
        "trial": top.number.map(str), **hyperparameter_columns(data, top),
        "trainable params": top.trainable_params.map(lambda v: fmt(v, ",.0f")),
        **{m: top[m].map(lambda v: fmt(v, ".4f"))
           for m in ("val/accuracy", "val/f1_macro", "test/accuracy", "test/f1_macro")},
        "time (s)": top.duration_s.map(lambda v: fmt(v, ".1f")), "run": top.run_id.map(run_link(data))})
    caption = (f"The {len(top)} best of {len(data.complete)} complete trials by {data.objective}. val/* are the best "
               "epoch's values (the checkpoint kept); test/* are that checkpoint's, measured once.")
    return [Heading("Leaderboard"), Table(table, caption), *by_model(data)]


def methods(data: StudyData) -> list:
    """The trials grouped by how they fine-tuned (the `method` each run logged: full, partly frozen, probe, LoRA,
    LP-FT): how many the search gave each, and the best and median each reached, beside what each costs."""
    blocks = [Heading("How to fine-tune")]
    ran = data.trials[data.trials.state.isin(["COMPLETE", "PRUNED"])].dropna(subset=["method"])
    if ran.empty:
        return blocks + [Text("The runs logged no `method` (written by an older fine_tune).")]
    rows = []
    for method, group in ran.groupby("method"):
        done = group[group.state == "COMPLETE"].sort_values(["value", "number"], ascending=[False, True])
        best = done.iloc[0] if len(done) else None
        rows.append({"method": method, "complete": str(len(done)), "pruned": str((group.state == "PRUNED").sum()),
                     f"best {data.objective}": fmt(best.value if best is not None else np.nan, ".4f"),
                     "best trial": str(best.number) if best is not None else "-",
                     f"median {data.objective}": fmt(done.value.median(), ".4f"),
                     "best's test/f1_macro": fmt(best["test/f1_macro"] if best is not None else np.nan, ".4f"),
                     "median trainable params": fmt(done.trainable_params.median(), ",.0f"),
                     "median peak memory (MiB)": fmt(done["memory/peak_mb"].median(), ".0f")})
    table = pd.DataFrame(rows).sort_values(f"best {data.objective}", ascending=False, key=lambda c: pd.to_numeric(
        c, errors="coerce"))
    return blocks + [Table(table, (
        f"Complete trials by method, best {data.objective} first. Probe: every backbone stage frozen; partly frozen: "
        "some; full: none; LoRA: low-rank adapters on the unfrozen stages; LP-FT: the head probed first, then "
        "fine-tuned. The search spends its trials unevenly (TPE samples more of what works, the pruner stops what "
        "does not), so n differs, and each number is one seed: `make confirm` re-trains the top trials with other "
        "seeds for intervals. Peak memory: the run's peak above its start (CUDA's allocator, or the process's resident "
        "memory on Linux)."))]


def all_trials(data: StudyData) -> list:
    """Every trial in one table: state, how far it got, its score and its hyperparameters."""
    t = data.trials.sort_values("number")
    table = pd.DataFrame({
        "trial": t.number.map(str), "state": t.state.str.lower(),
        "epochs": t.epochs_reported.map(lambda v: fmt(v, ".0f")),
        data.objective: t.score.map(lambda v: fmt(v, ".4f")), **hyperparameter_columns(data, t),
        "run": t.run_id.map(run_link(data))})
    return [Heading("All trials"),
            Table(table, f"{data.objective} is the best epoch's for a complete trial and, for a pruned one, the best it "
                         "reached before the pruner stopped it at the epoch shown.")]


def by_model(data: StudyData) -> list:
    """When the study searched the architecture: each model's best trial and how many trials it got."""
    if "model" not in data.distributions or data.complete.model.nunique() < 2:
        return []
    rows = []
    for model, group in data.complete.groupby("model", sort=False):
        best = group.iloc[0]  # `complete` is sorted best first
        rows.append({"model": model, "complete trials": str(len(group)), "best trial": str(best.number),
                     **{m: fmt(best[m], ".4f") for m in ("val/f1_macro", "test/accuracy", "test/f1_macro")},
                     "trainable params": fmt(best.trainable_params, ",.0f")})
    return [Table(pd.DataFrame(rows), "Each model's best complete trial (the study searched the architecture).")]


def champion(data: StudyData, folder: Path) -> list:
    best = data.complete.iloc[0]
    run_id = best.run_id
    blocks = [Heading("Champion: confusion matrix and per-class scores")]
    cm = load_json(run_id, "evaluation/confusion_matrix.json")
    per_class = load_json(run_id, "evaluation/per_class_report.json")
    if cm is None or per_class is None:
        return blocks + [Text(f"Trial {best.number}'s run `{run_id}` has no evaluation artifacts.")]
    blocks.append(Image(confusion_png(cm["matrix"], cm["class_names"], f"trial {best.number}: test confusion matrix",
                                      folder / "champion_confusion_matrix.png", dpi=110), "champion confusion matrix"))
    rows = {k: v for k, v in per_class.items() if isinstance(v, dict)}  # the classes, then macro / weighted avg
    table = pd.DataFrame(rows).T.reset_index(names="class")
    for col in ("precision", "recall", "f1-score"):
        table[col] = table[col].map(lambda v: f"{v:.4f}")
    table["support"] = table["support"].map(lambda v: f"{v:.0f}")
    caption = (f"Trial {best.number} (the best complete trial), test set at its best epoch; "
               f"accuracy {per_class.get('accuracy', float('nan')):.4f}.")
    return blocks + [Table(table, caption)]


def finished_runs(data: StudyData) -> pd.DataFrame:
    """Every run with test metrics: complete trials and finished re-runs."""
    runs = pd.concat([data.complete, data.reruns[data.reruns.status == "FINISHED"]], ignore_index=True)
    return runs.dropna(subset=["test/accuracy", "val/accuracy"])


def tradeoffs(data: StudyData, folder: Path) -> list:
    """Accuracy against macro-F1, and the score against model size."""
    blocks = [Heading("Accuracy vs macro-F1"),
              Image(plots.accuracy_vs_f1(finished_runs(data), folder / "accuracy_vs_f1.png"), "accuracy vs macro-F1")]
    sized = data.complete.dropna(subset=["trainable_params", SCORE])
    on_front = stats.pareto_front(sized, "trainable_params", SCORE)
    front = sized[on_front].sort_values("trainable_params")
    table = pd.DataFrame({"trial": front.number.map(str),
                          "trainable params": front.trainable_params.map(lambda v: f"{v:,.0f}"),
                          SCORE: front[SCORE].map(lambda v: f"{v:.4f}"),
                          "test/f1_macro": front["test/f1_macro"].map(lambda v: fmt(v, ".4f"))})
    return blocks + [Heading("Pareto front: validation F1 vs trainable parameters"),
                     Image(plots.pareto(sized, on_front, SCORE, folder / "pareto_front.png"), "Pareto front"),
                     Table(table, "No other complete trial is both smaller (or as small) and better on "
                                  f"{SCORE}.")]


def noise(data: StudyData, resamples: int, test: str) -> list:
    blocks = [Heading("Noise-aware comparison")]
    rerun = set(data.reruns.rerun_of.dropna().astype(int))
    groups = {n: seed_group(data, n) for n in data.complete.number if n in rerun}  # best trial first
    if groups:
        table = pd.DataFrame([group_row(n, g, resamples) for n, g in groups.items()])
        varied = ("initialisation, batch order and the backbone's pretraining (`confirm --vary backbone`)"
                  if (data.reruns.vary == "backbone").any() else "initialisation and batch order; the backbone is "
                  "the trial's own (`confirm --vary backbone` would pretrain it again per seed)")
        blocks.append(Table(table, f"Each trial re-trained with other seeds (same data, same test set); the seeds vary "
                                   f"{varied}. 95% CI: percentile bootstrap over test images ({resamples} resamples, "
                                   f"seed {stats.SEED}) of the mean over seeds."))
    else:
        blocks.append(Text("No re-runs yet: every number above comes from a single training run, so a gap of a point "
                           "or two between trials may be seed noise. `make confirm` re-trains the top trials with "
                           "other seeds; the next `make report` then shows, per trial, mean ± std over seeds and "
                           "bootstrap 95% confidence intervals here."))
    return blocks + [Text(test)]


def mcnemar(data: StudyData) -> tuple[str, str]:
    """McNemar's exact test between the best and the runner-up trial, on their test predictions: the noise section's
    paragraph, and its verdict as the first section says it."""
    top = data.complete.head(2)
    if len(top) < 2:
        text = "McNemar's test between the best and the runner-up trial needs 2 complete trials."
        return text, text
    a, b = (int(n) for n in top.number)
    preds = predictions(top.run_id)
    if preds is None:
        text = f"McNemar's test needs evaluation/test_predictions.json in the runs of trials {a} and {b}."
        return text, text
    y_true, (pred_a, pred_b) = preds
    test = stats.mcnemar(y_true, pred_a, pred_b)
    verdict = stats.mcnemar_sentence(a, b, test)
    return (f"McNemar's exact test, best trial {a} vs runner-up {b} on the same {len(y_true)} test images "
            f"(one seed each): only trial {a} right on {test.a_only}, only trial {b} right on {test.b_only}. "
            f"Verdict: {verdict}.",
            f"Best trial {a} vs runner-up {b} on the test set (McNemar's exact test, Noise-aware comparison): "
            f"{verdict}.")


def study_report(data: StudyData, folder: Path, resamples: int = stats.RESAMPLES) -> Report:
    report = Report(f"Study report: {data.name}")
    test, verdict = mcnemar(data)
    report.add(*says(data, verdict), *summary(data), *leaderboard(data), *methods(data), *all_trials(data),
               *search(data, folder), *curves(data, folder), *champion(data, folder), *tradeoffs(data, folder), *noise(data, resamples, test))
    return report


def build(data: StudyData, out: Path, resamples: int = stats.RESAMPLES) -> Path:
    """Write reports/<study>/ (report.md, report.html, PNGs) and log it to the study's parent run under report/."""
    from mlflow.tracking import MlflowClient

    folder = out / slug(data.name)
    with staged(folder) as tmp:
        write(study_report(data, tmp, resamples), tmp)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    MlflowClient(data.tracking_uri).log_artifacts(data.parent_run_id, str(folder), artifact_path="report")
    return folder
