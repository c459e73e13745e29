"""The report's figures, each written to a PNG file (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap
from matplotlib.ticker import MaxNLocator
import optuna
import optuna.visualization.matplotlib as ovm
import pandas as pd

from fine_tune.track.stores import quiet_experimental

matplotlib.use("Agg")  # files only: no display is needed, and CI has none
DPI = 100


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _optuna_figure(draw, path: Path, size: tuple[float, float], *args, **kwargs) -> Path:
    # optuna.visualization.matplotlib is marked experimental (a warning that says nothing about the report), and
    # it switches matplotlib to its own style globally; rc_context confines that style to its own figures.
    with quiet_experimental(), plt.rc_context():
        ax = draw(*args, **kwargs)
        ax.figure.set_size_inches(*size)
        return _save(ax.figure, path)


def optimization_history(study: optuna.Study, objective: str, path: Path) -> Path:
    return _optuna_figure(ovm.plot_optimization_history, path, (8, 4.5), study, target_name=objective)


def param_importances(study: optuna.Study, objective: str, path: Path, evaluator, title: str) -> Path:
    """Importances by `evaluator` (seeded, so the same study gives the same figure), titled with its method: Optuna
    titles every method's figure alike."""
    def draw(*args, **kwargs):
        ax = ovm.plot_param_importances(*args, **kwargs)
        ax.set_title(title, loc="left")  # in place of Optuna's own
        return ax
    return _optuna_figure(draw, path, (8, 3.5), study, evaluator=evaluator, target_name=objective)


def _label(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float, np.integer, np.floating)) else str(v)


def continuous_vs_score(trials: pd.DataFrame, score: str, params: dict[str, bool], colour_by: str | None,
                        path: Path) -> Path:
    """One panel per continuous hyperparameter (log x where it was searched on a log scale) against the score:
    complete trials in one colour per value of `colour_by`, pruned ones as grey crosses at the best value they reached
    before the pruner stopped them, so a score cut short at epoch 2 is not read as a whole run's."""
    fig, axes = plt.subplots(1, len(params), figsize=(6 * len(params) + 1, 4.5), sharey=True, squeeze=False)
    complete, pruned = trials[trials.state == "COMPLETE"], trials[trials.state == "PRUNED"]
    groups = list(complete.groupby(colour_by)) if colour_by else [("all", complete)]
    palette = [c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"] if c != "#7f7f7f"]  # grey: pruned
    colours = dict(zip([v for v, _ in groups], palette * 10))
    if len(pruned):
        lo, hi = int(pruned.epochs_reported.min()), int(pruned.epochs_reported.max())
        stopped = f"pruned: best before its stop at epoch {lo if lo == hi else f'{lo}-{hi}'}"
        if len(complete):
            stopped += f" (complete trials ran up to {int(complete.epochs_reported.max())})"
    for ax, (name, log) in zip(axes[0], params.items()):
        for value, group in groups:
            ax.scatter(group[name], group["score"], marker="o", s=40, alpha=0.85, color=colours[value],
                       label=f"{colour_by} {_label(value)}" if colour_by else "complete")
        if len(pruned):
            ax.scatter(pruned[name], pruned["score"], marker="x", s=40, alpha=0.8, color="grey", label=stopped)
        if log:
            ax.set_xscale("log")
        ax.set(xlabel=name, title=f"{name} vs {score}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{score}: best epoch (grey x: pruned, best before the stop)")
    axes[0][-1].legend(fontsize="small")
    return _save(fig, path)


def score_by(trials: pd.DataFrame, score: str, groups: list[str], path: Path) -> Path:
    """One box plot per hyperparameter in `groups` over its complete trials, every trial drawn on top (pruned ones as
    crosses), and each group's count under its label."""
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.3), sharey=True, squeeze=False)
    rng = np.random.default_rng(0)  # the jitter only separates overlapping points
    for ax, col in zip(axes[0], groups):
        data = trials.dropna(subset=[col])
        values = sorted(data[col].unique(), key=lambda v: (isinstance(v, str), v))
        complete = [data.loc[(data[col] == v) & (data.state == "COMPLETE"), "score"] for v in values]
        ax.boxplot([c if len(c) else [np.nan] for c in complete], positions=range(len(values)), showfliers=False)
        for i, v in enumerate(values):
            for state, marker, colour in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:red")):
                ys = data.loc[(data[col] == v) & (data.state == state), "score"]
                ax.scatter(i + rng.uniform(-0.12, 0.12, len(ys)), ys, s=22, alpha=0.75, color=colour, marker=marker)
        labels = [f"{_label(v)}\nn={len(c)}" + (f" +{p} pruned" if (p := int(((data[col] == v) &
                                                                                  (data.state == "PRUNED")).sum())) else "")
                  for v, c in zip(values, complete)]
        ax.set_xticks(range(len(values)), labels, fontsize="small")
        ax.set(xlabel=col, title=f"{score} by {col}")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel(f"{score} (boxes: complete trials; x: pruned)")
    return _save(fig, path)


def intermediate(study: optuna.Study, objective: str, path: Path) -> Path:
    """Every trial's reported value per epoch: complete trials in colour, pruned ones in grey ending in a cross where
    the pruner stopped them."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[e] for e in steps]
        if t.state == optuna.trial.TrialState.PRUNED:
            ax.plot(steps, values, color="grey", alpha=0.5, lw=0.9)
            ax.scatter(steps[-1], values[-1], marker="x", color="tab:red", s=30, zorder=3)
        else:
            ax.plot(steps, values, alpha=0.8, lw=1.2)
    ax.plot([], [], color="tab:blue", lw=1.2, label="a complete trial (one colour each)")
    ax.plot([], [], color="grey", alpha=0.5, label="a pruned trial")
    ax.scatter([], [], marker="x", color="tab:red", label="pruned here")
    ax.set(xlabel="epoch", ylabel=objective, title=f"{objective} per epoch, every trial")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def parallel(study: optuna.Study, objective: str, distributions: dict, path: Path) -> Path:
    """Optuna's parallel coordinates, with two fixes: its colour map starts at white, which hid the worst trial, and
    an integer hyperparameter's axis was ticked in quarters."""
    def draw(*args, **kwargs):
        ax = ovm.plot_parallel_coordinate(*args, **kwargs)
        lines = next(c for c in ax.collections if isinstance(c, LineCollection))
        lines.set_cmap(ListedColormap(plt.get_cmap("Blues")(np.linspace(0.35, 1.0, 256))))
        lines.colorbar.update_normal(lines)
        names = [t.get_text() for t in ax.get_xticklabels()][1:]  # the objective's axis first, then one per param
        twins = [a for a in ax.figure.axes if a is not ax and a is not lines.colorbar.ax]
        for name, twin in zip(names, twins):
            d = distributions.get(name)
            if isinstance(d, optuna.distributions.IntDistribution) and not d.log:
                twin.yaxis.set_major_locator(MaxNLocator(integer=True))
        return ax
    return _optuna_figure(draw, path, (9, 4.5), study, target_name=objective)


def losses(curves: dict[str, tuple[pd.Series, pd.Series]], path: Path) -> Path:
    """Train (dashed) and validation (solid) loss per epoch of a few trials, one colour each."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (label, (train, val)), colour in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        ax.plot(val.index, val.values, color=colour, label=f"{label} val")
        ax.plot(train.index, train.values, color=colour, ls="--", alpha=0.7, label=f"{label} train")
    ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="cross-entropy (log scale)", title="train (dashed) vs validation loss, top trials")
    ax.legend(fontsize="x-small", ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def learning_curves(curves: dict[str, pd.Series], metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, curve in curves.items():
        ax.plot(curve.index, curve.values, marker="o", ms=3, label=label)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch, top trials")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def accuracy_vs_f1(runs: pd.DataFrame, path: Path) -> Path:
    """Every finished run's accuracy against its macro-F1, on val (best epoch) and test: off the diagonal
    means the classes are served unevenly."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for split, marker in (("val", "o"), ("test", "s")):
        ax.scatter(runs[f"{split}/accuracy"], runs[f"{split}/f1_macro"], marker=marker, alpha=0.7, label=split)
    values = runs[["val/accuracy", "val/f1_macro", "test/accuracy", "test/f1_macro"]].to_numpy()
    lo, hi = np.nanmin(values), np.nanmax(values)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="accuracy = macro-F1")
    ax.set(xlabel="accuracy", ylabel="macro-F1", title="accuracy vs macro-F1, all finished runs")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pareto(trials: pd.DataFrame, on_front: pd.Series, score: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(trials.trainable_params, trials[score], color="grey", alpha=0.6, label="trials")
    front = trials[on_front].sort_values("trainable_params")
    ax.step(front.trainable_params, front[score], where="post", color="tab:red", lw=1.2)
    ax.scatter(front.trainable_params, front[score], color="tab:red", label="Pareto front")
    for i, (_, row) in enumerate(front.iterrows()):  # labels alternate below and above, so neighbours do not overlap
        ax.annotate(f"t{int(row.number)}", (row.trainable_params, row[score]), textcoords="offset points",
                    xytext=(4, -12 if i % 2 else 6), fontsize="small")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=f"{score} (best epoch)", title=f"{score} vs trainable parameters")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def distributions(scores: dict[str, pd.Series], score: str, path: Path) -> Path:
    """Each study's complete trials side by side: a box plot, every trial drawn on top as a point."""
    fig, ax = plt.subplots(figsize=(2.2 * len(scores) + 3, 4.5))
    data = [s.dropna().to_numpy() for s in scores.values()]
    ax.boxplot(data, positions=range(len(data)), widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, ys in enumerate(data):
        ax.scatter(i + rng.uniform(-0.1, 0.1, len(ys)), ys, s=18, alpha=0.7)
    ax.set_xticks(range(len(data)), list(scores))
    ax.set(ylabel=f"{score} (best epoch)", title=f"{score} of complete trials by study")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def best_so_far(curves: dict[str, pd.Series], score: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, curve in curves.items():
        ax.step(curve.index, curve.values, where="post", marker="o", ms=3, label=label)
    ax.set(xlabel="complete trials", ylabel=f"best {score} so far", title="how fast each study found its best")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def curve(table: pd.DataFrame, metric: str, path: Path) -> Path:
    """`metric` against labels per class (log x), one line per arm, the 95% interval as error bars."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for arm, group in table.groupby("arm"):
        group = group.sort_values("budget")
        err = np.vstack([group[metric] - group[f"{metric} low"], group[f"{metric} high"] - group[metric]])
        ax.errorbar(group.budget, group[metric], yerr=np.nan_to_num(err), marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ax.set_xticks(sorted(table.budget.unique()), [str(b) for b in sorted(table.budget.unique())])
    ax.set(xlabel="labeled images per class", ylabel=metric, title=f"{metric} vs labels per class")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)
