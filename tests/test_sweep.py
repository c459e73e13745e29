"""A real sweep on real stores: SQLite Optuna + SQLite MLflow, a few hundred Fashion-MNIST images, 2 epochs."""
import re

import mlflow
import optuna
import pytest
import torch
from helpers import SEARCH, runs_of, study_in, tiny_sweep
from mlflow.tracking import MlflowClient

from fine_tune.errors import ConfigError
from fine_tune.learn import checkpoints
from fine_tune.learn.data import splits_for
from fine_tune.learn.models import build_model
from fine_tune.learn.train import evaluate, scores
from fine_tune.study.sweep import run_sweep, trial_outcome
from fine_tune.study.workers import Attempt
from fine_tune.track.stores import optuna_storage, optuna_url, tracking_uri
from fine_tune.track.tracking import train_in_run
from fine_tune.track.tree import StudyTracker


@pytest.fixture
def sweep_cfg(tmp_path, tiny_backbone):
    return lambda **kw: tiny_sweep(tmp_path / "runs", tiny_backbone[0], **kw)


def runs_by_role(cfg):
    df = runs_of(cfg.runs_dir, cfg.study)
    return df[df["tags.fine_tune.role"] == "study"], df[df["tags.fine_tune.role"] == "trial"]


def val_f1_of(state, params, cfg, splits):
    model = build_model(cfg.model, 5, int(params["head_size"]))
    model.load_state_dict(state)
    _, pred = evaluate(model, splits.val, torch.device("cpu"))
    return scores("val", splits.val.y.numpy(), pred)["val/f1_macro"]


def test_sweep_builds_one_parent_and_a_child_per_trial_and_resumes(sweep_cfg, tmp_path):
    cfg = sweep_cfg()
    study = run_sweep(cfg, progress=False, log=lambda s: None)
    parents, children = runs_by_role(cfg)
    assert len(parents) == 1 and len(children) == 3
    parent_id = parents.run_id.iloc[0]
    assert (children["tags.mlflow.parentRunId"] == parent_id).all()
    assert sorted(children["tags.mlflow.runName"]) == ["t000", "t001", "t002"]  # short: the experiment is the study
    assert set(children["tags.optuna.trial_state"]) == {"COMPLETE"} and set(children.status) == {"FINISHED"}
    assert parents.status.iloc[0] == "FINISHED"
    assert parents["metrics.trials_complete"].iloc[0] == 3
    assert parents["metrics.best_value"].iloc[0] == pytest.approx(study.best_value)
    for col in ("params.lr", "params.frozen_layers", "params.head_size", "params.model", "params.pretrained_sha256",
                "params.trainable_params", "params.data_fingerprint", "params.classes"):
        assert children[col].notna().all(), col

    # every finished trial: full metric history, and a checkpoint that reproduces its logged val metric
    client, splits = MlflowClient(), splits_for(cfg)
    for _, run in children.iterrows():
        history = client.get_metric_history(run.run_id, "val/f1_macro")
        assert [m.step for m in history] == list(range(1, int(run["metrics.epochs_run"]) + 1))
        for key in ("train/loss", "val/loss", "val/accuracy"):
            assert len(client.get_metric_history(run.run_id, key)) == len(history)
        assert 0 <= run["metrics.test/accuracy"] <= 1 and "metrics.test/f1/Ankle boot" in run
        path = mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="checkpoint/best.pt",
                                                   dst_path=str(tmp_path / run.run_id))
        f1 = val_f1_of(checkpoints.load(path), run.filter(like="params.").rename(lambda c: c[7:]), cfg, splits)
        assert f1 == pytest.approx(run["metrics.best/val/f1_macro"], abs=1e-9)
        assert f1 == max(m.value for m in history)
        # the confusion-matrix picture is drawn for the trials that became champion (trial 0 always does)
        names = {a.path for a in client.list_artifacts(run.run_id, "evaluation")}
        became_champion = int(run["tags.optuna.trial_number"]) == study.user_attrs["champion_trial"]
        assert names == {"evaluation/confusion_matrix.json", "evaluation/per_class_report.json",
                         "evaluation/per_class_f1.json", "evaluation/test_predictions.json"} | ({"evaluation/confusion_matrix.png"}
                                                                if became_champion else set())
    assert study.user_attrs["champion_trial"] == study.best_trial.number  # what is registered: test_registry.py

    # a rerun continues the same study under the same parent; it registers a second version only if it found better
    best_before = study.best_value
    study = run_sweep(cfg, progress=False, log=lambda s: None)
    assert len(client.search_model_versions(f"name='{cfg.study}'")) == 1 + (study.best_value > best_before)
    parents, children = runs_by_role(cfg)
    assert len(parents) == 1 and parents.run_id.iloc[0] == parent_id and len(children) == 6
    assert sorted(int(n) for n in children["tags.optuna.trial_number"]) == list(range(6))
    assert (children["tags.mlflow.parentRunId"] == parent_id).all()
    assert "RUNNING" not in set(children.status) | set(parents.status)
    params = [tuple(sorted(t.params.items())) for t in study_in(cfg.runs_dir, cfg.study).trials]
    assert len(set(params)) == 6  # the resumed sampler does not replay the first run's samples


def test_pruned_and_diverged_trials_are_closed_with_their_reason(sweep_cfg):
    cfg = sweep_cfg(epochs=3, sweep={"n_trials": 3, "pruner": "median", "prune_startup_trials": 1,
                                     "prune_warmup_epochs": 0},
                    search={"lr": {"low": 1e-3, "high": 1e12, "log": True}, "frozen_layers": {"low": 0, "high": 2},
                            "head_size": [0, 16]})
    study = optuna.create_study(study_name=cfg.study, storage=optuna_storage(optuna_url(cfg.runs_dir)),
                                direction="maximize")
    study.enqueue_trial({"lr": 3e-2, "frozen_layers": 0, "head_size": 16})  # learns: sets the median
    study.enqueue_trial({"lr": 1e-3, "frozen_layers": 2, "head_size": 0})  # barely moves: below the median
    study.enqueue_trial({"lr": 1e12, "frozen_layers": 0, "head_size": 0})  # diverges
    run_sweep(cfg, progress=False, log=lambda s: None)

    _, children = runs_by_role(cfg)
    by_trial = {int(r["tags.optuna.trial_number"]): r for _, r in children.iterrows()}
    assert by_trial[0].status == "FINISHED"
    assert by_trial[1].status == "KILLED" and by_trial[1]["tags.optuna.trial_state"] == "PRUNED"
    # KILLED is MLflow's nearest status; the outcome tag and the description say it was pruned, and at which epoch
    assert re.fullmatch(r"pruned at epoch \d", by_trial[1]["tags.fine_tune.outcome"])
    assert by_trial[1]["tags.mlflow.note.content"].startswith("**Pruned** (pruned at epoch")
    assert by_trial[0]["tags.fine_tune.outcome"] == "complete"
    assert len(MlflowClient().get_metric_history(by_trial[1].run_id, "val/f1_macro")) >= 1  # its curve is kept
    reported = study_in(cfg.runs_dir, cfg.study).trials[1].intermediate_values  # and what it reached, as Optuna has it
    assert by_trial[1]["metrics.best/val/f1_macro"] == max(reported.values())
    assert by_trial[1]["metrics.epochs_run"] == len(reported) and by_trial[1]["metrics.best_epoch"] >= 1
    assert by_trial[2].status == "FAILED" and "lower the learning rate" in by_trial[2]["tags.fine_tune.reason"]
    states = [t.state.name for t in study_in(cfg.runs_dir, cfg.study).trials]
    assert states[:3] == ["COMPLETE", "PRUNED", "FAIL"]
    assert len(states) == 4 and states[3] in ("COMPLETE", "PRUNED")  # n_trials counts finished trials


def test_a_pruned_trial_logs_the_best_epoch_it_reached_not_its_last(tmp_path):
    """One column of the runs table compares every trial: a pruned trial's run logs `best/val/*` of its best epoch (the
    value Optuna and the report give it), `best_epoch` and `epochs_run`, as a finished trial's does; its curves keep
    the last epoch as their latest point."""
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=0.65, n_warmup_steps=3))
    tracker = StudyTracker("s", tracking_uri(tmp_path / "runs"))
    epochs = [{"train/loss": 1.0, "val/loss": 1.5 - f, "val/accuracy": f + 0.01, "val/f1_macro": f}
              for f in (0.5, 0.7, 0.6)]
    trial = study.ask()
    attempt = Attempt(trial, tmp_path / "state", "val/f1_macro")

    def train(run):  # what the training loop does each epoch: log it, then hand it to on_epoch
        for epoch, metrics in enumerate(epochs, start=1):
            run.log_metrics(metrics, step=epoch)
            attempt.report(epoch, metrics)

    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 3"):
        train_in_run(lambda: attempt.open_run(tracker, {"lr": 0.1}, None), train, trial_outcome)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    tracker.close()
    run = tracker.client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    m = run.data.metrics
    assert run.info.status == "KILLED" and run.data.tags["fine_tune.outcome"] == "pruned at epoch 3"
    assert m["best/val/f1_macro"] == max(study.trials[0].intermediate_values.values()) == 0.7
    assert (m["best_epoch"], m["epochs_run"]) == (2, 3)
    assert (m["best/val/loss"], m["best/val/accuracy"]) == (epochs[1]["val/loss"], epochs[1]["val/accuracy"])
    assert m["val/f1_macro"] == 0.6  # the curve's latest point: the epoch it was pruned at


def test_sweep_without_a_search_space_is_refused(sweep_cfg, tmp_path):
    with pytest.raises(ConfigError, match="search: not set"):
        run_sweep(sweep_cfg(search=None), progress=False)
    assert not (tmp_path / "runs").exists()


def test_artifacts_live_beside_a_tracking_database_elsewhere(sweep_cfg, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI naming a SQLite file outside runs/: the artifacts go beside that file, so moving or
    cleaning the checkout's runs/ never orphans them."""
    elsewhere = tmp_path / "shared-tracking"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}/mlflow.db")
    cfg = sweep_cfg(sweep={"n_trials": 1, "pruner": "none"})
    run_sweep(cfg, progress=False, log=lambda s: None)
    assert list(elsewhere.glob("mlartifacts/*/artifacts/checkpoint/best.pt"))
    assert not (cfg.run_dir() / "mlartifacts").exists()


def test_parent_run_counts_failures_before_any_trial_completes(sweep_cfg):
    """The parent's summary metrics are written from the first trial on, even while none has completed."""
    cfg = sweep_cfg(sweep={"n_trials": 1, "pruner": "none"})
    study = optuna.create_study(study_name=cfg.study, storage=optuna_storage(optuna_url(cfg.runs_dir)),
                                direction="maximize")
    study.enqueue_trial({"lr": 1e12, "frozen_layers": 0, "head_size": 0})  # diverges: fails before any completes
    run_sweep(cfg, progress=False, log=lambda s: None)
    parents, _ = runs_by_role(cfg)
    failed = MlflowClient().get_metric_history(parents.run_id.iloc[0], "trials_failed")
    assert (0, 1.0) in {(m.step, m.value) for m in failed}


def test_a_searched_hyperparameter_is_sampled_logged_tabled_and_reported(sweep_cfg):
    """label_smoothing is one field of Hyperparameters and one use in the loss, nothing else: a sweep samples it,
    every run logs it, the console table and the report's leaderboard show it."""
    from analysis.read import load_study
    from analysis.report import leaderboard
    from fine_tune.study.summary import top_table

    cfg = sweep_cfg(n_trials=2, search={**SEARCH, "label_smoothing": {"low": 0.0, "high": 0.2}})
    study = run_sweep(cfg, progress=False, log=lambda s: None)
    sampled = {t.number: t.params["label_smoothing"] for t in study.trials}
    assert len(sampled) == 2 and all(0.0 <= v <= 0.2 for v in sampled.values())
    _, children = runs_by_role(cfg)
    logged = {int(r["tags.optuna.trial_number"]): float(r["params.label_smoothing"]) for _, r in children.iterrows()}
    assert logged == pytest.approx(sampled)
    assert "label_smoothing" in top_table(study).splitlines()[0]
    board = leaderboard(load_study(cfg.study, cfg.runs_dir))[1].df
    assert "label_smoothing" in board.columns and len(board) == 2


def test_the_model_is_searchable_and_the_report_groups_by_it(tmp_path):
    """`model` is a hyperparameter like any other: trials sample it, each trains its own architecture, and the report
    gives each model's best trial."""
    from analysis.read import load_study
    from analysis.report import by_model

    cfg = tiny_sweep(tmp_path / "runs", None, study="models", n_trials=4,
                     search={"model": ["simplenet", "cnn"], "lr": {"low": 1e-3, "high": 1e-2, "log": True}})
    study = optuna.create_study(study_name=cfg.study, storage=optuna_storage(optuna_url(cfg.runs_dir)),
                                direction="maximize")
    for model in ("simplenet", "cnn"):
        study.enqueue_trial({"model": model, "lr": 3e-3})
    study = run_sweep(cfg, progress=False, log=lambda s: None)
    _, children = runs_by_role(cfg)
    trainable = dict(zip(children["params.model"], children["params.trainable_params"]))
    assert trainable == {"simplenet": str(109_386 - 64 * 10 - 10 + 64 * 5 + 5), "cnn": "93157"}
    table = by_model(load_study(cfg.study, cfg.runs_dir))[0].df
    assert sorted(table.model) == ["cnn", "simplenet"]
    assert table["complete trials"].astype(int).sum() == 4
