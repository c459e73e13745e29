"""The report's sections on the search itself: how it went (history, every trial per epoch), what mattered
(importances by two methods, a parallel-coordinates view, each hyperparameter against the score with every trial
drawn, pruned ones marked), and how the top trials trained (learning curves, train vs validation loss)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.findings import confounds, value_table
from analysis.format import discrete, hyperparameter_columns
from analysis.read import StudyData, metric_history
from analysis.render import Bullets, Heading, Image, Table, Text
from fine_tune.names import SCORE

CURVES = 5  # trials in the learning-curve figure


def importance(data: StudyData, folder: Path) -> list:
    """Two importance methods side by side, named, with a sentence when they rank the hyperparameters differently."""
    import optuna

    blocks = [Heading("Parameter importance")]
    if len(data.complete) < 2:
        return blocks + [Text("Parameter importance needs at least 2 complete trials; this study has "
                              f"{len(data.complete)}. Run `make sweep` to add trials.")]
    methods = {"fANOVA": optuna.importance.FanovaImportanceEvaluator(seed=0),
               "PED-ANOVA": optuna.importance.PedAnovaImportanceEvaluator()}
    ranks = {}
    for name, evaluator in methods.items():
        try:
            ranks[name] = list(optuna.importance.get_param_importances(data.study, evaluator=evaluator))
            path = folder / f"param_importances_{name.lower().replace('-', '_')}.png"
            blocks.append(Image(plots.param_importances(data.study, data.objective, path, evaluator,
                                                        f"Hyperparameter importances ({name})"),
                                f"parameter importances ({name})"))
        except (ValueError, RuntimeError) as e:  # e.g. every trial sampled the same values
            blocks.append(Text(f"{name} importance could not be computed: {e}"))
    text = ("fANOVA: the share of the objective's variance each hyperparameter explains across the complete trials "
            "(a random forest fitted to them, seed 0). PED-ANOVA: how much each hyperparameter's distribution differs "
            "between the top trials and all of them (what optuna-dashboard shows).")
    if len(ranks) == 2 and ranks["fANOVA"][:1] != ranks["PED-ANOVA"][:1]:
        text += (f" They disagree on what matters most (fANOVA: {ranks['fANOVA'][0]}, PED-ANOVA: "
                 f"{ranks['PED-ANOVA'][0]}): fANOVA weighs the whole range of outcomes, PED-ANOVA only what sets the "
                 "best trials apart; with few complete trials, read both with caution.")
    confounded = sorted(confounds(data))
    if confounded:
        text += (f" {' and '.join(confounded)} {'was' if len(confounded) == 1 else 'were'} confounded with another "
                 "hyperparameter (see \"Validation F1 by discrete hyperparameter\"): neither method can tell their "
                 "effects apart.")
    return blocks + [Text(text)]


def search(data: StudyData, folder: Path) -> list:
    """How the search went (history, every trial per epoch, importances) and what each hyperparameter did."""
    finished = data.finished.dropna(subset=["run_id"])
    blocks = [Heading("Optimization history"),
              Image(plots.optimization_history(data.study, data.objective, folder / "optimization_history.png"),
                    "optimization history"),
              Heading("Every trial per epoch"),
              Image(plots.intermediate(data.study, data.objective, folder / "intermediate_values.png"),
                    "every trial per epoch"),
              Text("What the pruner saw: each trial's validation score per epoch; a pruned trial ends in a cross at the "
                   "epoch it was stopped.")]
    blocks += importance(data, folder)
    blocks.append(Heading("Hyperparameters together"))
    if len(data.complete) >= 2 and len(data.distributions) >= 2:
        blocks.append(Image(plots.parallel(data.study, data.objective, data.distributions,
                                           folder / "parallel_coordinates.png"), "parallel coordinates"))
    else:
        blocks.append(Text("A parallel-coordinates view needs 2 complete trials and 2 searched hyperparameters."))
    groups = [n for n, d in data.distributions.items() if discrete(d) and n in finished]
    continuous = {n: getattr(d, "log", False) for n, d in data.distributions.items() if not discrete(d) and n in finished}
    blocks.append(Heading("Continuous hyperparameters vs validation F1"))
    if continuous:
        blocks.append(Image(plots.continuous_vs_score(finished, data.objective, continuous, groups[0] if groups else None,
                                                      folder / "continuous_vs_val_f1.png"),
                            "continuous hyperparameters vs val F1"))
    else:
        blocks.append(Text("The study searches no continuous hyperparameter."))
    blocks.append(Heading("Validation F1 by discrete hyperparameter"))
    if groups:
        blocks.append(Image(plots.score_by(finished, data.objective, groups, folder / "val_f1_by_discrete.png"),
                            "val F1 by discrete hyperparameter"))
        blocks.append(Table(value_table(data), f"Each value's complete trials: the mean of {data.objective} and its "
                                               "95% t-interval (their other hyperparameters vary)."))
        blocks += [Text(note) for note in confounds(data).values()]
    else:
        blocks.append(Text("The study searches no discrete hyperparameter."))
    return blocks


def curves(data: StudyData, folder: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(data.tracking_uri)
    top = data.complete.dropna(subset=["run_id"]).head(CURVES)
    hyper = hyperparameter_columns(data, top)
    labels = {r.run_id: f"t{r.number:03d} (" + ", ".join(f"{k} {hyper[k][i]}" for k in hyper) + ")"
              for i, r in zip(top.index, top.itertuples())}
    lines = {labels[r]: metric_history(client, r, SCORE) for r in top.run_id}
    blocks = [Heading("Learning curves"),
              Image(plots.learning_curves(lines, SCORE, folder / "learning_curves.png"), "learning curves")]
    losses = {f"t{n:03d}": (metric_history(client, r, "train/loss"), metric_history(client, r, "val/loss"))
              for n, r in zip(top.number[:3], top.run_id[:3])}
    blocks += [Heading("Train vs validation loss"), Image(plots.losses(losses, folder / "losses.png"), "losses")]
    checkpoints = dict(zip(losses, top.best_epoch[:3]))  # each note is about its own run's checkpoint
    notes = [overfitting(name, train, val, checkpoints[name], data.objective) for name, (train, val) in losses.items()]
    return blocks + [Bullets([n for n in notes if n]) if any(notes) else
                     Text("No overfitting among the top trials: their validation loss does not rise while the training "
                          "loss falls.")]


def overfitting(name: str, train: pd.Series, val: pd.Series, best_epoch, objective: str) -> str | None:
    """A sentence when the validation loss rises well above its minimum while the training loss keeps falling, saying
    which epoch the run's checkpoint is: its own `best_epoch`, the best by `objective` (not necessarily the lowest loss)."""
    if len(val) < 3 or val.empty or train.empty or val.idxmin() not in train.index:
        return None
    low, last = val.idxmin(), val.index[-1]
    if not (val.iloc[-1] > 1.2 * val.min() and train.iloc[-1] < train.loc[low]):
        return None
    if pd.isna(best_epoch):
        kept = f"its checkpoint is its best epoch by {objective} (the run did not log which)"
    elif int(best_epoch) == last:
        kept = f"its checkpoint is its last epoch ({last}) all the same, the best by {objective} despite that loss"
    else:
        kept = f"its checkpoint is epoch {int(best_epoch)} (its best {objective}), not the last ({last})"
    return (f"{name} overfits: its validation loss rose from {val.min():.3g} (epoch {low}) to {val.iloc[-1]:.3g} "
            f"(epoch {last}) while its training loss fell from {train.loc[low]:.3g} to {train.iloc[-1]:.3g}; "
            f"{kept}.")
