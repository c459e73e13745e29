"""Load one study from its two stores: Optuna (trial states, values) and MLflow (params, metrics, artifacts).

Store locations come from `fine_tune.track.stores` (SQLite files under the runs directory unless OPTUNA_STORAGE /
MLFLOW_TRACKING_URI point elsewhere), the one place the sweep reads them from too. Nothing here writes to a store, and
a missing SQLite file is reported instead of being created empty. The hyperparameters are the study's own: whatever
its trials sampled, as Optuna records them, so a new searchable hyperparameter needs nothing here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from fine_tune import names
from fine_tune.names import RERUN, RERUN_OF, SCORE, SEED, STUDY, TRIAL, TRIAL_NUMBER, VARY
from fine_tune.track.stores import optuna_url, tracking_uri

ROLE = f"tags.{names.ROLE}"
TAGS = (ROLE, f"tags.{TRIAL_NUMBER}", f"tags.{RERUN_OF}", f"tags.{SEED}", f"tags.{VARY}")

# MLflow metric columns -> report columns. Metric names stay in the project's one vocabulary; the val/* columns are
# the best epoch's (`best/val/*`), the values the checkpoint, the test metrics and Optuna's objective refer to. Every
# param a run logged becomes a column under its own name (`params.lr` -> `lr`).
METRICS = {
    "metrics.best/val/accuracy": "val/accuracy", "metrics.best/val/f1_macro": "val/f1_macro",
    "metrics.test/accuracy": "test/accuracy", "metrics.test/f1_macro": "test/f1_macro",
    "metrics.best_epoch": "best_epoch", "metrics.epochs_run": "epochs_run", "metrics.memory/peak_mb": "memory/peak_mb",
}
# Params the report reads whether or not the runs logged them (older runs, a store written elsewhere).
PARAMS = ("seed", "trainable_params", "epochs", "method")


class StoreError(ValueError):
    """A study that cannot be reported on; the message names the study and the fix."""


@dataclass
class StudyData:
    """One study as the stores hold it."""

    name: str
    study: optuna.Study
    storage_url: str
    tracking_uri: str
    parent_run_id: str
    experiment_id: str
    trials: pd.DataFrame  # one row per Optuna trial, joined with its MLflow run (its params and METRICS)
    reruns: pd.DataFrame  # one row per re-run (`make confirm`): rerun_of, seed and the same columns
    objective: str
    distributions: dict[str, optuna.distributions.BaseDistribution]  # the searched hyperparameters, in order

    @property
    def hyperparameters(self) -> list[str]:
        return list(self.distributions)

    @property
    def finished(self) -> pd.DataFrame:
        """Complete and pruned trials with a score, best first: what every plot shows."""
        done = self.trials[self.trials.state.isin(["COMPLETE", "PRUNED"])].dropna(subset=["score"])
        return done.sort_values(["score", "number"], ascending=[False, True])

    @property
    def complete(self) -> pd.DataFrame:
        """Complete trials, best objective value first."""
        return self.trials[self.trials.state == "COMPLETE"].sort_values(["value", "number"],
                                                                        ascending=[False, True])


def _require_sqlite_file(url: str, what: str, study: str) -> None:
    """Opening a missing SQLite file would create an empty store; say where we looked instead."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise StoreError(f"study {study!r}: no {what} at {url.removeprefix('sqlite:///')}; run `make sweep` first "
                         "or pass --runs-dir pointing at the sweep's runs directory")


def load_study(name: str, runs_dir: str | Path = "runs", storage: str | None = None) -> StudyData:
    """The study `name` from both stores, or a StoreError saying what is missing and how to fix it; `storage` is
    the experiment's `sweep.storage`, if it sets one."""
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, uri = optuna_url(runs_dir, storage), tracking_uri(runs_dir)
    study = _optuna_study(name, url)
    experiment_id, runs, columns = _mlflow_runs(name, uri)
    parents = runs[runs[ROLE] == STUDY]
    if parents.empty:
        raise StoreError(f"study {name!r}: the MLflow experiment in {uri} has no parent run "
                         f"(tag {names.ROLE}={STUDY}); was it logged by `make sweep`?")
    parent_run_id = parents.sort_values("start_time").run_id.iloc[0]  # the earliest, as fine_tune settles on it
    distributions: dict = {}
    for t in study.get_trials(deepcopy=False):
        for k, d in t.distributions.items():
            distributions.setdefault(k, d)
    return StudyData(name=name, study=study, storage_url=url, tracking_uri=uri, parent_run_id=parent_run_id,
                     experiment_id=experiment_id, trials=_trials(study, runs[runs[ROLE] == TRIAL], columns),
                     reruns=_reruns(runs[runs[ROLE] == RERUN], columns),
                     objective=study.user_attrs.get("objective", SCORE), distributions=distributions)


def _optuna_study(name: str, url: str) -> optuna.Study:
    """The study with at least one complete trial, or a StoreError naming what is missing."""
    _require_sqlite_file(url, "Optuna storage", name)
    try:
        studies = optuna.get_all_study_names(storage=url)
    except Exception as e:  # sqlalchemy's OperationalError, a missing driver, a file that is not an Optuna store...
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise StoreError(f"study {name!r}: Optuna storage {url} is unusable ({first}); start the database or fix "
                         "OPTUNA_STORAGE / --runs-dir") from None
    if name not in studies:
        raise StoreError(f"study {name!r} is not in {url} (studies there: {', '.join(studies) or 'none'}); "
                         "check the name (the `study:` key of the experiment YAML) or run `make sweep`")
    study = optuna.load_study(study_name=name, storage=url)
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise StoreError(f"study {name!r} has no finished trials yet; run `make sweep` until one completes")
    return study


def _mlflow_runs(name: str, uri: str) -> tuple[str, pd.DataFrame, list[str]]:
    """The study's experiment id, its runs (mlflow.search_runs: params typed, metrics renamed to our vocabulary, every
    column the report reads present even when no run logged it) and the names of those metric and param columns."""
    import mlflow
    from mlflow.tracking import MlflowClient

    _require_sqlite_file(uri, "MLflow store", name)
    mlflow.set_tracking_uri(uri)  # mlflow.search_runs and runs:/ artifact URIs resolve against it
    experiment = MlflowClient(uri).get_experiment_by_name(name)
    if experiment is None:
        raise StoreError(f"study {name!r} has no MLflow experiment in {uri}; point MLFLOW_TRACKING_URI or "
                         "--runs-dir at the store the sweep logged to")
    runs = mlflow.search_runs(experiment_ids=[experiment.experiment_id])
    runs = runs.reindex(columns=list(dict.fromkeys([*runs.columns, *METRICS, *(f"params.{p}" for p in PARAMS),
                                                    *TAGS])))
    runs["duration_s"] = (runs.end_time - runs.start_time).dt.total_seconds()
    params = {c: c.removeprefix("params.") for c in runs.columns if c.startswith("params.")}
    runs = runs.rename(columns={**METRICS, **params})
    columns = [*METRICS.values(), *params.values()]
    for col in columns:
        runs[col] = _typed(runs[col])
    return experiment.experiment_id, runs, columns


def _typed(column: pd.Series) -> pd.Series:
    """MLflow keeps params as strings: numbers become numbers, anything else (a model name) stays text."""
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.notna().sum() != column.notna().sum():
        return column
    whole = numbers.dropna()
    return numbers.astype("Int64") if len(whole) and (whole == whole.round()).all() and whole.abs().max() < 2**53 \
        else numbers


def _trials(study: optuna.Study, runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Optuna's view of each trial (state, value, epochs reported) beside its MLflow run's columns."""
    number = f"tags.{TRIAL_NUMBER}"
    by_number = runs.dropna(subset=[number]).drop_duplicates(number)
    by_number = dict(zip(by_number[number].astype(int), by_number.run_id))
    rows = []
    for t in study.get_trials(deepcopy=False):
        # The trial's own record of its run; a retried trial carries the run id of the run it continued.
        run_id = t.user_attrs.get("mlflow_run_id") or by_number.get(t.number)
        # what the plots compare trials by: the objective of a complete trial; for a pruned one, the best value it
        # reported before it was stopped (so it stands where the pruner saw it, marked as pruned)
        score = t.value if t.state == TrialState.COMPLETE else (
            max(t.intermediate_values.values()) if t.state == TrialState.PRUNED and t.intermediate_values else np.nan)
        # the trial's own time: its run may have been written to after it (a champion's registration, a retry)
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "score": score, "run_id": run_id,
                     "epochs_reported": max(t.intermediate_values, default=np.nan),
                     "duration_s": t.duration.total_seconds() if t.duration else np.nan})
    trials = pd.DataFrame(rows).merge(runs[["run_id", "status", *columns]], on="run_id", how="left")
    return trials.sort_values("number").reset_index(drop=True)


def _reruns(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    reruns = runs.assign(rerun_of=pd.to_numeric(runs[f"tags.{RERUN_OF}"], errors="coerce"),
                         seed=pd.to_numeric(runs[f"tags.{SEED}"], errors="coerce").fillna(runs.seed),
                         vary=runs[f"tags.{VARY}"].fillna("seed"))
    return reruns[["run_id", "rerun_of", "status", "duration_s", "vary", *columns]].reset_index(drop=True)


def metric_history(client, run_id: str, key: str) -> pd.Series:
    """A run's metric `key` by epoch (MLflow step)."""
    history = client.get_metric_history(run_id, key)
    return pd.Series({m.step: m.value for m in history}, name=key, dtype=float).sort_index()


def load_json(run_id: str, path: str) -> dict | None:
    """A JSON artifact of a run, or None if the run never logged it (e.g. written by an older fine_tune)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except (MlflowException, OSError):
        return None
