"""Is a difference real or noise: bootstrap confidence intervals over test examples, McNemar's exact test,
and the Pareto front of score against size."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from fine_tune.learn.metrics import accuracy, macro_f1  # noqa: F401 - the report's metrics

RESAMPLES = 2000
SEED = 0  # the bootstrap's RNG seed: the same stores give the same report
ALPHA = 0.05


def bootstrap_ci(y_true: np.ndarray, preds: list[np.ndarray], metric, resamples: int = RESAMPLES,
                 seed: int = SEED) -> tuple[float, float]:
    """95% percentile CI of the mean over seeds of `metric`, resampling test examples (paired across seeds)."""
    def mean_over_seeds(y, *ps, axis=-1):  # scipy passes axis=-1; the metrics already work on the last axis
        return np.mean([metric(y, p) for p in ps], axis=0)

    res = stats.bootstrap((np.asarray(y_true), *map(np.asarray, preds)), mean_over_seeds, paired=True,
                          vectorized=True, batch=200, n_resamples=resamples, method="percentile",
                          confidence_level=0.95, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_ci(values) -> tuple[float, float, float]:
    """The mean of `values` and its 95% t-interval (NaN bounds for fewer than 2 values)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return (float(values.mean()) if len(values) else np.nan), np.nan, np.nan
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


def apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Whether two (mean, low, high) intervals do not overlap; never with a missing interval."""
    return bool(a[1] > b[2] or b[1] > a[2])


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
