"""Accuracy and macro-F1 counted with numpy: sklearn's numbers, without its per-call input checks.

Training scores every epoch with them, and the report's bootstrap scores thousands of resamples at once (along the
last axis), so sklearn's ~2 ms of checks per call would dominate both. Equal to sklearn's `accuracy_score` and
`f1_score(average="macro", zero_division=0)`: tests/test_train.py and tests/test_report.py check them against it.
"""
from __future__ import annotations

import numpy as np


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray | float:
    """Accuracy along the last axis: one value per row of a batch of bootstrap resamples."""
    out = np.mean(np.asarray(y_true) == np.asarray(y_pred), axis=-1)
    return out if np.ndim(out) else float(out)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray | float:
    """Macro-F1 along the last axis, over the labels present in either array (as sklearn averages), with one
    bincount for a whole batch of rows."""
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
