"""The MLflow Model Registry: each study's champion, registered under the study's name with the alias `champion`.

The launcher registers once, when its sweep ends: the study's best complete trial, if it beats every version
registered so far (so a 30-trial sweep makes one version, and a later sweep that finds better makes the next). The
model is rebuilt from the trial's own artifacts (config.yaml, checkpoint/best.pt) and logged as an exported program
(`torch.export`, MLflow's "pt2" format): a graph of tensor operations and raw tensors, so it loads without our package
and no code travels with it, and under `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false` MLflow refuses an archive that
would unpickle anything (a pickled model runs whatever a replaced file holds). The model is logged to the trial's run
through the client, never by reopening the finished run; the alias then points at the best version registered so
far, so launchers on several machines converge on the best.
"""
from __future__ import annotations

import contextlib
import io
import os
import socket
import tempfile
from pathlib import Path

from fine_tune.archs import is_text
from fine_tune.track import model_card
from fine_tune.names import TRIAL, TRIAL_NUMBER, TRIAL_STATE, WORKER, role_filter, worker_id

CHAMPION = "champion"


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """MLflow's fluent API (log_model, register_model) at `uri`, leaving the process's setting as it was:
    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI, which `stores.tracking_uri` reads as the user's
    choice."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def champion(client, name: str):
    """The model version the alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no registered model or no alias yet
        return None


def _value(version) -> float:
    return float(version.tags.get("objective_value", "-inf"))


def _trial_model(client, run_id: str):
    """The trial's best-epoch model rebuilt from its artifacts (LoRA's adapters merged), and its resolved config."""
    import yaml
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from fine_tune.config import Config
    from fine_tune.learn import checkpoints, lora
    from fine_tune.learn.train import prepare_model

    repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config.model_validate(yaml.safe_load(Path(repo.download_artifacts("config.yaml", tmp)).read_text()))
        state = checkpoints.load(repo.download_artifacts("checkpoint/best.pt", tmp))
    num_classes = state[[k for k in state if k.startswith("head.")][-1]].shape[0]
    model = prepare_model(cfg, num_classes)  # with LoRA's adapters when the trial had them, as its checkpoint does
    model.load_state_dict(state)
    return lora.merged(model).eval(), cfg  # served without peft: each adapter folded into its layer


# --- a registration killed midway: the logged model it left, the run an older one left RUNNING


def _gone(registrar: str) -> bool:
    """Whether the process that tagged a logged model has ended: only a process of this host can be checked (one of
    another host may be registering right now), and this very pid is an earlier process's, since this one registers
    one model at a time."""
    host, _, pid = registrar.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _drop_unregistered(client, model) -> None:
    """Delete a logged model unless a version (of any registered model) was made from it."""
    versions = client.search_model_versions(f"run_id='{model.source_run_id}'")
    if not any(v.source == f"models:/{model.model_id}" for v in versions):
        client.delete_logged_model(model.model_id)


def _drop_orphans(client, experiment_id: str) -> None:
    """Delete the logged models that registrations killed on this machine left: tagged by a process that has ended,
    and no version made from them."""
    token = None
    while True:
        page = client.search_logged_models([experiment_id], page_token=token)
        for model in page:
            if model.source_run_id and _gone(model.tags.get(WORKER, "")):
                _drop_unregistered(client, model)
        token = page.token
        if not token:
            return


def _close_reopened(client, experiment_id: str) -> None:
    """Trial runs that a registration before this module's present form reopened (`start_run(run_id=...)`) and a
    kill left RUNNING: their trial had ended, as their state tag says, so they are FINISHED."""
    for run in client.search_runs([experiment_id], f"{role_filter(TRIAL)} and tags.`{TRIAL_STATE}` = 'COMPLETE' "
                                                   "and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, "FINISHED")


# --- registering


def _log_and_register(client, name: str, run_id: str, tags: dict, example) -> str:
    """Log the trial's model to its run (without reopening it) and register it as a new version of `name`. A failure
    deletes the logged model; a kill leaves it to the next registration's `_drop_orphans`."""
    import mlflow
    import torch
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import infer_signature

    model, cfg = _trial_model(client, run_id)
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                        params=run.data.params, tags={WORKER: worker_id()})
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    try:
        with _fluent_uri(client.tracking_uri), contextlib.redirect_stderr(io.StringIO()):
            if is_text(cfg.model):
                _log_text_model(model, cfg, run.data.params["class_names"].split("|"), logged.model_id, example,
                                requirements)
            else:
                with torch.no_grad():
                    signature = infer_signature(example.numpy(), model(example).numpy())
                mlflow.pytorch.log_model(
                    model, name="model", model_id=logged.model_id, serialization_format="pt2", signature=signature,
                    input_example=example.numpy(),  # also what torch.export traces, its batch dimension left free
                    pip_requirements=requirements)
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])  # the run's page lists it
            version = str(mlflow.register_model(f"models:/{logged.model_id}", name, tags=tags).version)
        model_card.describe(client, name, version, run, "text" if is_text(cfg.model) else "image",
                            tags["objective"], logged.model_id)
        return version
    except BaseException:  # an error, Ctrl-C or SIGTERM: unless it came after the version was made
        with contextlib.suppress(Exception):
            _drop_unregistered(client, logged)
        raise


def _log_text_model(model, cfg, class_names: list[str], model_id: str, example, requirements: list[str]) -> None:
    """A text champion: texts in, class names out (`textserve.py`, run as code, never unpickled), the network as an
    exported program over token ids padded to `max_length`, the tokenizer's files beside it."""
    import json

    import mlflow
    import torch
    from transformers import AutoTokenizer

    from fine_tune.learn.encoders import model_dir
    from fine_tune.learn.text import tokenized

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir(cfg.model)))
    texts = tokenizer.batch_decode(example[:, 0], skip_special_tokens=True)  # the input example, as text again
    ids = tokenized(texts, tokenizer, cfg.data.max_length, padding="max_length")
    program = torch.export.export(model, (ids,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    with tempfile.TemporaryDirectory() as tmp:
        torch.export.save(program, f"{tmp}/model.pt2")
        tokenizer.save_pretrained(f"{tmp}/tokenizer")
        Path(f"{tmp}/labels.json").write_text(json.dumps({"class_names": class_names,
                                                          "max_length": cfg.data.max_length}))
        mlflow.pyfunc.log_model(
            name="model", model_id=model_id, python_model=str(Path(__file__).with_name("textserve.py")),
            artifacts={"program": f"{tmp}/model.pt2", "tokenizer": f"{tmp}/tokenizer", "labels": f"{tmp}/labels.json"},
            input_example=texts, pip_requirements=[*requirements, f"transformers=={_version('transformers')}"])


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _point_alias(client, name: str) -> None:
    """The alias on the best version registered so far (also after a registration killed before it moved it)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(3):  # another launcher may set the alias at the same moment (the store's unique key)
        best = max(client.search_model_versions(f"name='{name}'"), key=_value)
        try:
            client.set_registered_model_alias(name, CHAMPION, best.version)
            return
        except MlflowException:
            if attempt == 2:
                raise


def register_best(client, name: str, run_id: str, value: float, objective: str, trial_number: int,
                  example) -> str | None:
    """Register trial `trial_number`'s model (its run `run_id`, objective `value`) as a new version of `name` if it
    beats every registered version; `example` is a small uint8 batch of the task's images (the input example).
    Returns the new version, or None when the champion stays."""
    experiment_id = client.get_run(run_id).info.experiment_id
    _close_reopened(client, experiment_id)
    _drop_orphans(client, experiment_id)
    versions = client.search_model_versions(f"name='{name}'")
    version = None
    if not versions or max(map(_value, versions)) < value:
        version = _log_and_register(client, name, run_id, {
            "objective": objective, "objective_value": str(value), TRIAL_NUMBER: str(trial_number),
            "run_id": run_id}, example)
    if version is not None or versions:
        _point_alias(client, name)
    return version
