"""Accuracy, macro-F1, the confusion matrix and the per-class report counted with numpy: sklearn's numbers, without
its per-call input checks and without importing it.

Training scores every epoch with them, and the report's bootstrap scores thousands of resamples at once (along the
last axis), so sklearn's ~2 ms of checks per call would dominate both; and importing sklearn.metrics costs every
process that trains ~0.9 s before its first trial (make bench (i)). Equal to sklearn's `accuracy_score`,
`f1_score(average="macro", zero_division=0)`, `confusion_matrix` and `classification_report(output_dict=True,
zero_division=0)`: tests/test_train.py and tests/test_report.py check them against it.
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


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """The k x k confusion matrix: rows are true labels 0..k-1, columns predicted ones."""
    cell = np.asarray(y_true, dtype=np.int64) * k + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(cell, minlength=k * k).reshape(k, k)


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    """Precision, recall, F1 and support per class, accuracy, and the macro and support-weighted averages: the dict
    sklearn's `classification_report(..., output_dict=True, zero_division=0)` returns for labels 0..k-1."""
    m = confusion(y_true, y_pred, len(names)).astype(float)
    hits, support, predicted = np.diag(m), m.sum(1), m.sum(0)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(hits), where=total > 0)
    rows = np.stack([precision, recall, f1])
    out: dict = {name: {"precision": float(p), "recall": float(r), "f1-score": float(f), "support": float(n)}
                 for name, p, r, f, n in zip(names, precision, recall, f1, support)}
    out["accuracy"] = float(hits.sum() / max(m.sum(), 1))
    weights = support / max(support.sum(), 1)
    for key, avg in (("macro avg", rows.mean(1)), ("weighted avg", rows @ weights)):
        out[key] = {"precision": float(avg[0]), "recall": float(avg[1]), "f1-score": float(avg[2]),
                    "support": float(support.sum())}
    return out
