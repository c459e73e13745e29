"""What the Model Registry says about a champion: the registered model's description (the task, its classes, the
objective, how to load it and what `predict` takes and returns), each version's description and tags (the trial's
hyperparameters and its val / test metrics), and the logged model's metrics linked to the datasets they were
measured on, so its page and the experiment's Models tab show them."""
from __future__ import annotations

import time

from fine_tune.config import Hyperparameters
from fine_tune.names import SUMMARY, TRIAL_NUMBER

SCORES = ("best/val/accuracy", "best/val/f1_macro", "test/accuracy", "test/f1_macro")  # the run's single values

LOADING = {
    "image": ("`m = mlflow.pytorch.load_model(\"models:/{name}@champion\")` (set "
              "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false: an exported program, no code, no pickle). `m(x)` takes a uint8 "
              "batch (N, C, H, W) shaped as the signature says and returns float logits (N, {n}), columns in the "
              "class order above; `mlflow.pyfunc.load_model(...).predict(array)` does the same on NumPy arrays."),
    "text": ("`mlflow.pyfunc.load_model(\"models:/{name}@champion\").predict([\"some text\", ...])` returns the "
             "predicted class names, one per text (needs torch, mlflow and transformers; loading runs the model's "
             "code file `textserve.py` from the store: load from a store you trust)."),
}


def _fmt(value) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}" if number != int(number) else str(int(number))


def describe(client, name: str, version: str, run, task: str, objective: str, model_id: str) -> None:
    """Descriptions, tags and linked metrics of version `version` of `name`, made from the trial's run `run`."""
    params, metrics = run.data.params, run.data.metrics
    classes = params.get("class_names", "").split("|")
    client.update_registered_model(name, description=(
        f"**{name}**: {task} classification of {len(classes)} classes ({', '.join(classes)}), fine-tuned from "
        f"`{params.get('model')}` by an Optuna study that maximises `{objective}` on validation data (the test set "
        f"never drove a decision). The alias `@champion` points at the best version.\n\n**Load**: "
        + LOADING[task].format(name=name, n=len(classes))))
    hyper = {k: params[k] for k in Hyperparameters.model_fields if k in params}
    scores = {k: metrics[k] for k in SCORES if k in metrics}
    client.update_model_version(name, version, description=(
        f"Trial {run.data.tags.get(TRIAL_NUMBER)} (run `{run.info.run_id}`): "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in hyper.items()) + ". Best epoch "
        f"{_fmt(metrics.get('best_epoch'))} of {_fmt(metrics.get('epochs_run'))}: "
        + ", ".join(f"{k.removeprefix('best/')} {v:.4f}" for k, v in scores.items()) + "."))
    for key, value in {**hyper, **{k.removeprefix("best/"): f"{v:.4f}" for k, v in scores.items()}}.items():
        client.set_model_version_tag(name, version, key, _fmt(value)[:250])
    _link_metrics(client, run, model_id, scores, metrics)


def _link_metrics(client, run, model_id: str, scores: dict, metrics: dict) -> None:
    """The champion's val and test metrics logged again against its logged model and the dataset each was measured
    on (MLflow 3 links a metric to a model and a dataset by these fields): the same single values at step 0, so the
    run's own are unchanged and its per-epoch curves get no extra point."""
    from mlflow.entities import Metric

    by_context = {i.tags[0].value if i.tags else "": i.dataset for i in run.inputs.dataset_inputs}
    now = int(time.time() * 1000)
    linked = []
    for key, value in scores.items():
        dataset = by_context.get("validation" if key.startswith("best/val/") else "test")
        linked.append(Metric(key, value, now, 0, model_id=model_id, dataset_name=dataset.name if dataset else None,
                             dataset_digest=dataset.digest if dataset else None))
    linked += [Metric(k, metrics[k], now, 0, model_id=model_id) for k in SUMMARY if k in ("best_epoch", "epochs_run")
               and k in metrics]
    client.log_batch(run.info.run_id, metrics=linked)
