"""What a study says, in words: each discrete hyperparameter's values compared over the complete trials (n, mean and
95% t-interval of the objective), the values the study cannot separate from another hyperparameter's (a value that
only ever occurred with one value of the other, checked for every pair both ways), and the short section at the top
of the report that states them. Every number that section quotes is shown again in a section below it."""
from __future__ import annotations

import numbers
from itertools import permutations

import pandas as pd

from analysis import stats
from analysis.format import discrete
from analysis.read import StudyData
from analysis.render import Bullets, Heading, Text


def name(v) -> str:
    return f"{v:g}" if isinstance(v, numbers.Real) and not isinstance(v, bool) else str(v)


def cell(mean: float, low: float, high: float, n: int) -> str:
    """How a group's score is written, in the table and in the sentences alike."""
    if pd.isna(low):
        return f"{mean:.4f} from {int(n)} trial, too few for an interval"
    return f"{mean:.4f} [{low:.4f}, {high:.4f}] over {int(n)} trials"


def grouped(data: StudyData) -> list[str]:
    """The searched hyperparameters that take few enough values to group trials by, in search order."""
    return [n for n, d in data.distributions.items() if discrete(d) and n in data.trials]


def by_value(data: StudyData, hp: str) -> pd.DataFrame:
    """One row per value of `hp` among the complete trials: n, mean objective and its 95% t-interval, and how many
    pruned trials had that value (left out: their scores stop before their last epoch)."""
    complete = data.complete.dropna(subset=[hp])
    pruned = data.trials[data.trials.state == "PRUNED"]
    rows = []
    for value, group in complete.groupby(hp, sort=True):
        mean, low, high = stats.mean_ci(group.value)
        rows.append({"value": value, "n": len(group), "mean": mean, "low": low, "high": high,
                     "pruned": int((pruned[hp] == value).sum())})
    return pd.DataFrame(rows, columns=["value", "n", "mean", "low", "high", "pruned"])


def confounds(data: StudyData) -> dict[str, str]:
    """For each hyperparameter with a value that occurred (among complete trials) with a single value of another one
    that did vary: a sentence naming them. Every pair, both ways."""
    found: dict[str, list[str]] = {}
    for a, b in permutations(grouped(data), 2):
        complete = data.complete.dropna(subset=[a, b])
        if complete[b].nunique() < 2:
            continue
        for value, group in complete.groupby(a, sort=True):
            if group[b].nunique() == 1:
                found.setdefault(a, []).append(f"{a} = {name(value)} (n={len(group)}) only with {b} = "
                                               f"{name(group[b].iloc[0])}")
    return {hp: "Confounded: among complete trials, " + "; ".join(parts) + ", so their effects cannot be separated "
                "there." for hp, parts in found.items()}


def comparison(data: StudyData, hp: str) -> str | None:
    """The best value of `hp` against each other one: 'beat' when the intervals are apart, else no difference."""
    table = by_value(data, hp)
    if len(table) < 2:
        return None
    top = table.loc[table["mean"].idxmax()]
    parts = []
    for _, other in table.drop(index=top.name).iterrows():
        a, b = (top["mean"], top.low, top.high), (other["mean"], other.low, other.high)
        numbers = f"{cell(*a, top.n)} vs {cell(*b, other.n)}"
        why = "" if pd.isna(a[1]) or pd.isna(b[1]) else "; the intervals overlap"
        parts.append(f"{hp} = {name(top.value)} beat {name(other.value)}: mean {data.objective} {numbers}"
                     if stats.apart(a, b) else f"{hp} = {name(top.value)} vs {name(other.value)}: no difference the "
                                               f"trials can show ({numbers}{why})")
    return "; ".join(parts) + "."


def says(data: StudyData, verdict: str) -> list:
    """The report's first section: the study's answer in a few sentences, each backed by a table or test below.
    `verdict` is the noise section's sentence on the best trial against the runner-up."""
    best = data.complete.iloc[0]
    items = [f"Trial {best.number} is the best of {len(data.complete)} complete trials: {data.objective} "
             f"{best.value:.4f}, test accuracy {best['test/accuracy']:.4f}, test macro-F1 "
             f"{best['test/f1_macro']:.4f} (Leaderboard)."]
    notes = confounds(data)
    for hp in grouped(data):
        said = comparison(data, hp)
        if said:
            items.append(said + (f" {notes[hp]}" if hp in notes else ""))
    pruned = int((data.trials.state == "PRUNED").sum())
    if pruned:
        items.append(f"{pruned} pruned trials are left out of these comparisons: their scores stop before their "
                     "last epoch.")
    items.append(verdict)
    return [Heading("What this study says"), Bullets(items),
            Text(f"Means of {data.objective} over the complete trials with each value (their other hyperparameters "
                 "vary), with 95% t-intervals; \"beat\" only where the two intervals do not overlap. The numbers are "
                 "those of \"Validation F1 by discrete hyperparameter\" and the sections named.")]


def value_table(data: StudyData) -> pd.DataFrame:
    """Every discrete hyperparameter's values as table rows (the numbers `says` quotes)."""
    rows = []
    for hp in grouped(data):
        for _, r in by_value(data, hp).iterrows():
            rows.append({"hyperparameter": hp, "value": name(r.value), f"{data.objective}: mean [95% CI], trials":
                         cell(r["mean"], r.low, r.high, r.n), "pruned (left out)": str(int(r.pruned))})
    return pd.DataFrame(rows)
