"""The MLflow Model Registry: each study's champion, registered under the study's name with the alias `champion`.

The launcher registers once, when its sweep ends: the study's best complete trial, if it beats the current champion
(so a 30-trial sweep makes one version, and a later sweep that finds better makes the next). The model is rebuilt
from the trial's own artifacts (config.yaml, checkpoint/best.pt) and logged with a signature and an input example;
the alias then points at the best version registered so far, so launchers on several machines converge on the best.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

CHAMPION = "champion"


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """MLflow's fluent API (log_model, register_model) at `uri`, leaving the process's setting as it was:
    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI, which `stores.tracking_uri` reads as the user's
    choice. An experiment the process set with `mlflow.set_experiment` (a notebook, another integration) is set aside
    meanwhile: `start_run(run_id=...)` refuses a run of any other experiment."""
    import mlflow
    from mlflow.tracking import fluent

    before, experiment = os.environ.get("MLFLOW_TRACKING_URI"), fluent._active_experiment_id
    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = None
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        fluent._active_experiment_id = experiment


def champion(client, name: str):
    """The model version the alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no registered model or no alias yet
        return None


def _trial_model(client, run_id: str):
    """The trial's best-epoch model rebuilt from its artifacts, and its resolved config."""
    import yaml
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from fine_tune.config import Config
    from fine_tune.learn import checkpoints
    from fine_tune.learn.models import build_model

    repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config.model_validate(yaml.safe_load(Path(repo.download_artifacts("config.yaml", tmp)).read_text()))
        state = checkpoints.load(repo.download_artifacts("checkpoint/best.pt", tmp))
    num_classes = state[[k for k in state if k.startswith("head.")][-1]].shape[0]
    model = build_model(cfg.model, num_classes, cfg.head_size, image_size=cfg.input_size())
    model.load_state_dict(state)
    return model.eval(), cfg


def register_best(client, name: str, run_id: str, value: float, objective: str, trial_number: int,
                  example) -> str | None:
    """Register trial `trial_number`'s model (its run `run_id`, objective `value`) as a new version of `name` if it
    beats the champion; `example` is a small uint8 batch of the task's images (the input example). Returns the new
    version, or None when the champion stays."""
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    current = champion(client, name)
    if current is not None and float(current.tags.get("objective_value", "-inf")) >= value:
        return None
    model, _ = _trial_model(client, run_id)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    with _fluent_uri(client.tracking_uri), mlflow.start_run(run_id=run_id), \
            contextlib.redirect_stderr(io.StringIO()):
        info = mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle", signature=signature, input_example=example.numpy(),
            code_paths=[str(Path(__file__).resolve().parents[1])],  # the Net class travels with the model
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])
        version = mlflow.register_model(info.model_uri, name, tags={
            "objective": objective, "objective_value": str(value), "optuna.trial_number": str(trial_number),
            "run_id": run_id})
    for attempt in range(3):  # another launcher may set the alias at the same moment (the store's unique key)
        versions = client.search_model_versions(f"name='{name}'")
        best = max(versions, key=lambda v: float(v.tags.get("objective_value", "-inf")))
        try:
            client.set_registered_model_alias(name, CHAMPION, best.version)
            break
        except MlflowException:
            if attempt == 2:
                raise
    return version.version

