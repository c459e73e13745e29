"""The peer in the benchmark: the sweep a user writes from Optuna's and MLflow's documentation, beside ours.

The peer is what those documents show: torchvision's FashionMNIST with ToTensor and Normalize through a DataLoader,
the tutorial's SimpleNet with a new head, Adam, sklearn's F1 per epoch, `trial.report` / `should_prune`, and
optuna-integration's `MLflowCallback` with its `track_in_mlflow` decorator so the per-epoch metrics reach the trial's
run. optuna-integration is installed for the benchmark only (`make bench` puts it in .bench-deps/), never a runtime
requirement. Both sweeps run in this process, on the same images (our splits' indices), from the same pretrained
backbone, with TPE and the median pruner, so what differs is the machinery.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fine_tune.config import Config

DEPS = Path(".bench-deps")  # where `make bench` installs optuna-integration (pip install --target)


def integration():
    """optuna_integration's MLflowCallback, or None when it is not installed."""
    if DEPS.is_dir() and str(DEPS.resolve()) not in sys.path:
        sys.path.append(str(DEPS.resolve()))
    try:
        from optuna_integration import MLflowCallback
    except ImportError:
        return None
    return MLflowCallback


class SimpleNet(nn.Module):
    """The tutorial's model: 784-128-64-10, its last layer replaced by the head the trial asks for."""

    def __init__(self, head_size: int, num_classes: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 128), nn.Linear(128, 64)
        self.fc3 = (nn.Linear(64, num_classes) if head_size == 0 else
                    nn.Sequential(nn.Linear(64, head_size), nn.ReLU(), nn.Linear(head_size, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def tutorial_weights(backbone: str) -> dict[str, torch.Tensor]:
    """Our pretrained backbone's weights under the tutorial's layer names (fc1, fc2): the peer starts from the same
    pretrained network, as a user who pretrained with the tutorial would."""
    state = torch.load(backbone, map_location="cpu", weights_only=True)
    names = {"backbone.0.1": "fc1", "backbone.1.0": "fc2"}
    return {names[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in state.items()
            if k.rsplit(".", 1)[0] in names}


def peer_sweep(cfg: Config, splits, backbone: str, n_trials: int, seed: int, tracking_uri: str) -> dict:
    """The documented sweep on `cfg`'s task; seconds per trial and the study it leaves."""
    import mlflow
    import optuna
    from sklearn.metrics import f1_score
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from fine_tune.learn.fashion import prepare

    MLflowCallback = integration()
    remap = {c: i for i, c in enumerate(cfg.classes)}
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    full = datasets.FashionMNIST(str(prepare(cfg.data_dir)), train=True, transform=tf,
                                 target_transform=lambda y: remap[y])
    train_set, val_set = Subset(full, splits.train.index.tolist()), Subset(full, splits.val.index.tolist())
    pretrained = tutorial_weights(backbone)
    mlflc = MLflowCallback(tracking_uri=tracking_uri, metric_name="val_f1")

    @mlflc.track_in_mlflow()
    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", cfg.search.lr.low, cfg.search.lr.high, log=True)
        frozen = trial.suggest_int("frozen_layers", cfg.search.frozen_layers.low, cfg.search.frozen_layers.high)
        head = trial.suggest_categorical("head_size", list(cfg.search.head_size.root))
        torch.manual_seed(cfg.seed)
        model = SimpleNet(head, len(cfg.classes))
        model.load_state_dict(pretrained, strict=False)
        for layer in [model.fc1, model.fc2][:frozen]:
            layer.requires_grad_(False)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True)
        f1 = 0.0
        for epoch in range(cfg.epochs):
            model.train()
            total = 0.0
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(y)
            model.eval()
            preds, ys = [], []
            with torch.no_grad():
                for x, y in DataLoader(val_set, batch_size=1000):
                    preds.append(model(x).argmax(1))
                    ys.append(y)
            y_true, y_pred = torch.cat(ys).numpy(), torch.cat(preds).numpy()
            f1 = f1_score(y_true, y_pred, average="macro")
            mlflow.log_metrics({"train_loss": total / len(train_set), "val_f1": f1,
                                "val_accuracy": float((y_true == y_pred).mean())}, step=epoch)
            trial.report(f1, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return f1

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        study = optuna.create_study(study_name="peer", direction="maximize", storage=f"sqlite:///{tmp}/optuna.db",
                                    sampler=optuna.samplers.TPESampler(seed=seed),
                                    pruner=optuna.pruners.MedianPruner())
        start = time.perf_counter()
        with fluent_store(tracking_uri):
            study.optimize(objective, n_trials=n_trials, callbacks=[mlflc])
        wall = time.perf_counter() - start
        return per_trial(study, wall)


@contextlib.contextmanager
def fluent_store(uri: str, experiment: str | None = None):
    """MLflow's fluent API (what the peers log through) at `uri`, and MLFLOW_EXPERIMENT_NAME at `experiment`, for
    the block only: `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI, which our sweeps read as the user's
    store, and a peer's callback would leave it pointing into a deleted temporary folder."""
    import mlflow

    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    mlflow.set_tracking_uri(uri)
    if experiment:
        os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
    try:
        yield
    finally:
        while mlflow.active_run():  # a callback may leave its last run open
            mlflow.end_run()
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])
        os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        if before["MLFLOW_EXPERIMENT_NAME"] is not None:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = before["MLFLOW_EXPERIMENT_NAME"]


def ours_sweep(cfg: Config, backbone: str | None, n_trials: int, seed: int, trials: list[dict] | None = None,
               study: str = "ours", pruner: str = "median") -> dict:
    """`fine_tune sweep` on the same task, with everything it tracks; with `trials`, exactly those parameters
    (enqueued) instead of its own samples."""
    from fine_tune.learn import features
    from fine_tune.study.sweep import open_study, run_sweep

    c = Config.model_validate({**cfg.model_dump(), "study": study, "pretrained": backbone, "seed": seed,
                               "sweep": {**cfg.sweep.model_dump(), "storage": None, "sampler": "tpe",
                                         "pruner": pruner, "n_trials": n_trials}})
    if trials:
        queued = open_study(c, log=lambda s: None)
        for params in trials:
            queued.enqueue_trial(params)
    features.clear_memory()
    start = time.perf_counter()
    study = run_sweep(c, n_trials, workers=1, log=lambda s: None, progress=False)
    return per_trial(study, time.perf_counter() - start)


def per_trial(study, wall: float) -> dict:
    import optuna

    states = [t.state for t in study.trials]
    ended = [t for t in study.trials if t.datetime_complete]
    span = (max(t.datetime_complete for t in ended) - min(t.datetime_start for t in ended)).total_seconds()
    return {"trials": len(ended), "pruned": states.count(optuna.trial.TrialState.PRUNED),
            "epochs": sum(len(t.intermediate_values) for t in ended), "wall_s": wall, "span_s": span,
            "s_per_trial": span / len(ended), "s_per_epoch": span / max(1, sum(len(t.intermediate_values) for t in ended)),
            "best": study.best_value, "params": [t.params for t in sorted(study.trials, key=lambda t: t.number)],
            "trial_s": [(t.datetime_complete - t.datetime_start).total_seconds()
                        for t in sorted(ended, key=lambda t: t.number)]}


def holdings(tracking_uri: str, experiment: str, searched: tuple[tuple[str, ...], ...] = ()) -> dict:
    """What an MLflow tree holds for a study: runs, params, metrics and tags per trial run, metric curves (keys with
    more than one step), artifacts, datasets, how a pruned trial shows, and how many trial runs hold each
    hyperparameter in `searched` (given by the names it may be logged under, the first naming it)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    # the trials' runs: every run that is no other run's parent (ours nest theirs under the study's run)
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    trials = [r for r in runs if r.info.run_id not in parents]

    def files(run_id: str, path: str | None = None) -> int:
        return sum(files(run_id, f.path) if f.is_dir else 1 for f in client.list_artifacts(run_id, path))

    curves = [k for r in trials[:1] for k in r.data.metrics if len(client.get_metric_history(r.info.run_id, k)) > 1]
    pruned = [r for r in trials if r.data.tags.get("state") == "PRUNED"
              or r.data.tags.get("fine_tune.outcome", "").startswith("pruned")]
    shown = (f"status {pruned[0].info.status}, " + ("tag fine_tune.outcome=pruned" if "fine_tune.outcome" in
                                                    pruned[0].data.tags else "tag state=PRUNED")) if pruned else "-"
    return {"runs": len(runs), "trial_runs": len(trials), "nested": any("mlflow.parentRunId" in r.data.tags for r in runs),
            "params_per_trial": max(len(r.data.params) for r in trials),
            "params_per_trial_min": min(len(r.data.params) for r in trials),
            "metrics_per_trial": max(len(r.data.metrics) for r in trials),
            "tags_per_trial": max(len(r.data.tags) for r in trials), "curves_per_trial": len(curves),
            "artifacts_per_trial": max(files(r.info.run_id) for r in trials[:3]), "pruned_shown_as": shown,
            "datasets": sum(bool(r.inputs and r.inputs.dataset_inputs) for r in trials),
            "searched_params": {names[0]: sum(any(k in r.data.params for k in names) for r in trials)
                                for names in searched}}


def peer_figures(transfer: Config, scratch: Path, quick: bool, seed: int = 0) -> dict:
    """Row (j): the same task swept by the peer and by us, seconds per trial and what each MLflow tree holds.
    The task is the issue's: SimpleNet pretrained on 0-4, fine-tuned on 5-9 with 500 labels per class, 5 epochs."""
    from fine_tune.learn.data import splits_for
    from fine_tune.learn.pretrain import backbone_for
    from fine_tune.track.stores import tracking_uri

    if integration() is None:
        return {"skipped": "optuna-integration is not installed: `make bench` installs it into .bench-deps/"}
    cfg = transfer.model_copy(update={"runs_dir": str(scratch), "budget_per_class": 40 if quick else 500,
                                      "epochs": 2 if quick else 5, "patience": None})
    backbone = backbone_for(cfg, log=lambda s: None)
    splits = splits_for(cfg)
    n = 4 if quick else 12
    uri = tracking_uri(str(scratch))
    peer = peer_sweep(cfg, splits, backbone, n, seed, uri)
    ours = ours_sweep(cfg, backbone, n, seed)
    return {"trials": n, "train_images": len(splits.train), "epochs": cfg.epochs, "peer": peer, "ours": ours,
            "speedup_per_trial": peer["s_per_trial"] / ours["s_per_trial"],
            "speedup_per_epoch": peer["s_per_epoch"] / ours["s_per_epoch"],
            "peer_holds": holdings(uri, "peer"), "ours_holds": holdings(uri, "ours")}
