"""How the reports show values: numbers, durations, folder names, hyperparameters by their kind, run ids (as links when
the MLflow UI's address is known), and the staged folder a report is written into."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from analysis.read import StudyData
from analysis.render import Link
from fine_tune.track.stores import masked


def slug(name: str) -> str:
    """A study name as a folder name: letters, digits, '_' and '-' only, so no name (a store may hold any, ".." too)
    can climb out of the reports folder or name it."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in name)[:100] or "_"


def fmt(value, spec: str) -> str:
    return "-" if value is None or pd.isna(value) else format(value, spec)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


@contextmanager
def staged(folder: Path):
    """A temporary sibling folder that replaces `folder` only once the report in it is complete. `folder` must be a
    plain child of its parent: it is deleted and replaced, so it may never resolve to the parent or above."""
    if folder.name in ("", ".", "..") or folder.resolve().parent != folder.parent.resolve():
        raise ValueError(f"refusing to replace {folder}: not a plain folder inside {folder.parent}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def discrete(distribution) -> bool:
    """Whether a hyperparameter takes few enough values to group trials by: choices, or a short integer range."""
    import optuna

    return (isinstance(distribution, optuna.distributions.CategoricalDistribution)
            or (isinstance(distribution, optuna.distributions.IntDistribution)
                and distribution.high - distribution.low <= 10))


def hyperparameter_columns(data: StudyData, rows: pd.DataFrame) -> dict[str, pd.Series]:
    """The searched hyperparameters of `rows` as table columns, each formatted for its kind."""
    import optuna

    def spec(d) -> str:
        if isinstance(d, optuna.distributions.FloatDistribution):
            return ".2e" if d.log else ".3g"
        return ".0f" if isinstance(d, optuna.distributions.IntDistribution) else ""

    return {name: rows[name].map(lambda v, s=spec(d): fmt(v, s) if s else str(v))
            for name, d in data.distributions.items() if name in rows}


def run_link(data: StudyData):
    """A run id as the report shows it: a link to the run in the MLflow UI when one is known (MLFLOW_UI_URL, or a
    tracking server; its password masked), else the id in backticks (paste it into the UI's search, or into
    `make rerun RUN=...`). The id is the store's (a trial's user attribute), so it is quoted into the link."""
    import os
    from urllib.parse import quote

    base = os.environ.get("MLFLOW_UI_URL") or (data.tracking_uri if data.tracking_uri.startswith("http") else None)

    def cell(run_id) -> str | Link:
        if not isinstance(run_id, str):
            return "-"
        if base is None:
            return f"`{run_id}`"
        where = f"#/experiments/{quote(str(data.experiment_id), safe='')}/runs/{quote(run_id, safe='')}"
        return Link(run_id[:8], f"{masked(base).rstrip('/')}/{where}")
    return cell
