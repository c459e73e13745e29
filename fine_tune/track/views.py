"""What the MLflow UI (3.17) opens on: a study's trials as a saved view of its runs table. A link alone can filter and
sort that table (its search facets) but not choose its columns, and the UI applies a saved view only to a link without
facets; so the view (filter, sort and columns) is an experiment tag, `mlflow.sharedViewState.trials`, which the UI
lists under Views and `view_link` opens."""
from __future__ import annotations

import json
import time
from typing import Any

from fine_tune.names import OUTCOME, TRIAL, role_filter
from fine_tune.track.interrupts import store_write

VIEW = "trials"  # the view's id: its experiment tag's suffix and its link's viewStateShareKey


def trials_view(hyperparameters: list[str], objective: str) -> dict[str, Any]:
    """The table a study is searched in, in the UI's view-state keys: its trials only (not the parent runs nor
    `make confirm`'s re-runs), best first by what each reached on the objective (`best/...`: a pruned trial's best
    epoch too), with its outcome (complete / pruned at epoch k / failed: reason: KILLED and FAILED share one icon),
    the searched hyperparameters, its best epoch and the epochs it ran."""
    score = f"metrics.`best/{objective}`"
    columns = [f"tags.`{OUTCOME}`", score, *(f"params.`{name}`" for name in hyperparameters), "metrics.`best_epoch`",
               "metrics.`epochs_run`"]
    return {"searchFilter": role_filter(TRIAL), "orderByKey": score, "orderByAsc": False, "selectedColumns": columns,
            "columnOrder": ["attributes.`Run Name`", *columns],  # the UI's own columns (Created, Duration) after
            "columnWidths": {columns[0]: 170, score: 150}}  # "pruned at epoch 12" and the key, uncut


@store_write
def save_trials_view(client, experiment_id: str, hyperparameters: list[str], objective: str) -> None:
    """Write the trials view into the experiment (again: the search space may have changed since)."""
    now = int(time.time() * 1000)
    envelope = {"name": f"Trials by {objective}", "createdAt": now, "updatedAt": now,
                "state": json.dumps(trials_view(hyperparameters, objective))}
    key, value = f"mlflow.sharedViewState.{VIEW}", json.dumps(envelope)
    try:
        client.set_experiment_tag(experiment_id, key, value)
    except Exception as e:  # noqa: BLE001 - MlflowException, from the store or through a tracking server
        # Two sweeps starting together: MLflow reads the tag, then inserts it, and the other sweep's row landed in
        # between (seen on a loaded machine). Written again, the tag exists and is updated.
        if not any(said in str(e) for said in ("UNIQUE constraint", "duplicate key", "IntegrityError")):
            raise
        client.set_experiment_tag(experiment_id, key, value)


def view_link(experiment_id: str) -> str:
    """The trials view, relative to the UI's root, in the model-training layout (the UI opens an experiment on its
    GenAI overview otherwise)."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW}"
