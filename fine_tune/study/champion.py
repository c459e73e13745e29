"""The study's champion: when a sweep ends, its best complete trial is registered in the MLflow Model Registry if it
beats the registered one (`track/registry.py` does the registering)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from fine_tune.config import Config
from fine_tune.names import CHAMPION
from fine_tune.study.inputs import Inputs
from fine_tune.study.summary import best_of
from fine_tune.track import figures, registry
from fine_tune.track.tracking import RunTracker
from fine_tune.track.tree import StudyTracker


def register_champion(study: optuna.Study, inputs: Inputs, tracker: StudyTracker, log: Callable[[str], None]) -> None:
    """When a sweep ends: register the study's best complete trial as the champion if it beats the registered one,
    with a signature, an input example and its confusion matrix as a picture (drawn for the champion only: every
    run keeps the numbers in evaluation/confusion_matrix.json)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return
    best = best_of(complete)
    run_id = best.user_attrs["mlflow_run_id"]
    splits, _ = inputs.for_run(Config.model_validate({**inputs.cfg.model_dump(), **best.params}))
    version = registry.register_best(tracker.client, inputs.cfg.study, run_id, best.value, inputs.cfg.sweep.objective,
                                     best.number, splits.val.x[:2])
    if version is None:
        current = registry.champion(tracker.client, inputs.cfg.study)
        log(f"champion unchanged: version {current.version} (trial {current.tags.get('optuna.trial_number')}) is at "
            f"least as good as trial {best.number}")
        return
    study.set_user_attr("champion_trial", best.number)
    run = RunTracker(tracker.client, run_id)
    run.set_tags({CHAMPION: f"version {version}"})
    with tempfile.TemporaryDirectory() as tmp:
        matrix = json.loads(run.download("evaluation/confusion_matrix.json", tmp).read_text())
        run.log_file(figures.confusion_png(matrix["matrix"], matrix["class_names"], "test confusion matrix (best epoch)",
                                        Path(tmp) / "confusion_matrix.png"),
                     "evaluation")
    log(f"champion: trial {best.number} ({inputs.cfg.sweep.objective} {best.value:.4f}) registered as "
        f"{inputs.cfg.study} version {version}, alias @champion")
