"""Is a difference real or noise: bootstrap confidence intervals over test examples, McNemar's exact test,
and the Pareto front of score against size."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

RESAMPLES = 2000
SEED = 0  # the bootstrap's RNG seed: the same stores give the same report
ALPHA = 0.05


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray | float:
    """Accuracy along the last axis: one value per row of a batch of bootstrap resamples."""
    out = np.mean(np.asarray(y_true) == np.asarray(y_pred), axis=-1)
    return out if np.ndim(out) else float(out)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray | float:
    """sklearn's `f1_score(average="macro", zero_division=0)` along the last axis (over the labels present in
    either array; tests/test_report.py checks it against sklearn). Counted with one bincount per batch of
    resamples: sklearn, called once per resample, made a report with re-runs take ~10 s per group of seeds."""
    y, p = np.broadcast_arrays(np.asarray(y_true), np.asarray(y_pred))
    y2, p2 = y.reshape(-1, y.shape[-1]), p.reshape(-1, p.shape[-1])  # one row per resample
    rows, k = len(y2), int(max(y2.max(), p2.max())) + 1
    cell = (np.arange(rows)[:, None] * k + y2) * k + p2
    counts = np.bincount(cell.ravel(), minlength=rows * k * k).reshape(rows, k, k)
    hits = np.diagonal(counts, axis1=1, axis2=2)
    support = counts.sum(1) + counts.sum(2)  # true + predicted occurrences of each label
    f1 = np.where(support > 0, 2 * hits / np.maximum(support, 1), np.nan)
    out = np.nanmean(f1, axis=-1).reshape(y.shape[:-1])
    return out if out.ndim else float(out)


def bootstrap_ci(y_true: np.ndarray, preds: list[np.ndarray], metric, resamples: int = RESAMPLES,
                 seed: int = SEED) -> tuple[float, float]:
    """95% percentile CI of the mean over seeds of `metric`, resampling test examples (paired across seeds)."""
    def mean_over_seeds(y, *ps, axis=-1):  # scipy passes axis=-1; the metrics already work on the last axis
        return np.mean([metric(y, p) for p in ps], axis=0)

    res = stats.bootstrap((np.asarray(y_true), *map(np.asarray, preds)), mean_over_seeds, paired=True,
                          vectorized=True, batch=200, n_resamples=resamples, method="percentile",
                          confidence_level=0.95, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class McNemar:
    a_only: int  # test images model A gets right and B gets wrong
    b_only: int
    p: float


def mcnemar(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> McNemar:
    """McNemar's exact test: under no difference, each discordant image is A's with probability 1/2."""
    right_a, right_b = np.asarray(pred_a) == y_true, np.asarray(pred_b) == y_true
    a_only, b_only = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    p = stats.binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return McNemar(a_only, b_only, float(p))


def mcnemar_sentence(a: int, b: int, test: McNemar, alpha: float = ALPHA) -> str:
    """The test's verdict on trials a and b in words."""
    if test.p < alpha and test.a_only != test.b_only:
        better, worse = (a, b) if test.a_only > test.b_only else (b, a)
        return f"trial {better} is significantly better than trial {worse} (p={test.p:.3g})"
    return f"no significant difference (p={test.p:.3g}); the ranking between them may be noise"


def pareto_front(df: pd.DataFrame, size: str, score: str) -> pd.Series:
    """True for the rows no other row beats: at most as large and strictly better, or smaller and as good."""
    ordered = df.sort_values([size, score], ascending=[True, False])
    # Walking from small to large, a row is on the front when it beats everything smaller.
    best_smaller = ordered[score].cummax().shift(fill_value=-np.inf)
    return (ordered[score] > best_smaller).reindex(df.index)
