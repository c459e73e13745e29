"""Pictures drawn from what a run logged, shared by the champion's run and the report: the confusion matrix."""
from __future__ import annotations

from pathlib import Path


def confusion_png(matrix: list[list[int]], names: list[str], title: str, path: Path, dpi: int = 80) -> Path:
    """The confusion matrix as a PNG, sized to the number of classes."""
    # matplotlib's object API without pyplot, fixed margins instead of tight_layout: a third of the time per trial
    import numpy as np
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    # Past ~30 classes a cell's count is unreadable, and drawing one text per cell took minutes at 250 classes; the
    # colours (with their scale) carry it, the figure stops growing and long names are cut.
    many = len(names) > 30
    side = min(max(6.0, 0.6 * len(names) + 3), 30.0)
    labels = [n if len(n) <= 40 else n[:39] + "…" for n in names]
    fig = Figure(figsize=(side + 0.5, side))
    fig.subplots_adjust(left=0.2, bottom=0.2, right=0.97, top=0.93)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(np.array(matrix), display_labels=labels).plot(
        ax=ax, colorbar=many, include_values=not many, xticks_rotation=90 if many else 45)
    ax.set_title(title)
    fig.savefig(path, dpi=dpi)
    return path
