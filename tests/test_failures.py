"""The bad-input catalogue for `python -m fine_tune sweep`: one line, exit code 2, and no study, run or file."""
import sqlite3
from pathlib import Path

import optuna
import pytest
import torch
from helpers import write_experiment
from optuna.distributions import CategoricalDistribution, FloatDistribution

from fine_tune.__main__ import main
from fine_tune.learn.models import build_model
from fine_tune.track.stores import optuna_storage

ROOT = Path(__file__).resolve().parents[1]
GOOD_KEYS = "classes: [5, 6, 7, 8, 9]\nsearch: {lr: {low: 1.0e-3, high: 1.0e-2, log: true}}\n"


def yaml_case(text):
    return lambda tmp, backbone, monkeypatch: (tmp / "e.yaml").write_text(text)


def experiment_with(**kw):
    return lambda tmp, backbone, monkeypatch: write_experiment(tmp / "e.yaml", **{"backbone": backbone, **kw})


def bad_checkpoint(content):
    def make(tmp, backbone, monkeypatch):
        path = tmp / "ck.pt"
        content(path)
        write_experiment(tmp / "e.yaml", backbone=path)
    return make


def env_case(key, value):
    def make(tmp, backbone, monkeypatch):
        write_experiment(tmp / "e.yaml", backbone=backbone)
        monkeypatch.setenv(key, value)
    return make


def broken_store(damage):
    def make(tmp, backbone, monkeypatch):
        write_experiment(tmp / "e.yaml", backbone=backbone)
        (tmp / "runs").mkdir()
        damage(tmp / "runs" / "mlflow.db")
    return make


def explicit_data_dir(tmp, backbone, monkeypatch):
    """./data holds Fashion-MNIST, yet the config names another folder: that folder is the user's choice."""
    (tmp / "data").symlink_to(ROOT / "data")
    monkeypatch.delenv("FINE_TUNE_DATA")
    write_experiment(tmp / "e.yaml", backbone=backbone).open("a").write("data_dir: /nonexistent\n")


def missing_data(tmp, backbone, monkeypatch):
    write_experiment(tmp / "e.yaml", backbone=backbone)
    with open(tmp / "e.yaml", "a") as f:
        f.write(f"data_dir: {tmp / 'no-such-dir'}\n")


CASES = {
    "yaml syntax error": (yaml_case("study: x\nsearch: {lr: [1\n"), "YAML syntax error"),
    "unknown key": (yaml_case(GOOD_KEYS + "n_trails: 4\n"), "n_trails: unknown key"),
    "wrong type": (yaml_case(GOOD_KEYS + "epochs: many\n"), "epochs: Input should be a valid integer"),
    "inverted range": (yaml_case("search: {lr: {low: 0.1, high: 0.01}}\n"), "search.lr: low (0.1) is above high"),
    "negative epochs": (yaml_case(GOOD_KEYS + "epochs: -1\n"), "epochs: Input should be greater than 0"),
    "frozen beyond backbone": (yaml_case("search: {frozen_layers: {low: 0, high: 5}}\n"),
                               "search.frozen_layers.high=5 but simplenet has 2"),
    "empty class list": (yaml_case("classes: []\n"), "the class list is empty"),
    "class id out of range": (yaml_case("classes: [3, 10]\n"), "class ids [10] are out of range"),
    "unknown model": (yaml_case("model: vit\n"), "model: 'vit' is not a model here"),
    "unreachable storage": (env_case("OPTUNA_STORAGE", "postgresql://127.0.0.1:1/nowhere"),
                            "Optuna storage postgresql://127.0.0.1:1/nowhere is unusable"),
    "unreachable tracking server": (env_case("MLFLOW_TRACKING_URI", "http://127.0.0.1:1"),
                                    "MLflow tracking server http://127.0.0.1:1 is unreachable"),
    "corrupt checkpoint": (bad_checkpoint(lambda p: p.write_bytes(b"\x80\x02garbage")), "is corrupt"),
    "checkpoint of the wrong shape": (bad_checkpoint(lambda p: torch.save(build_model("cnn", 5).state_dict(), p)),
                                      "does not fit this model's backbone: missing keys"),
    "missing data directory": (missing_data, "does not hold the Fashion-MNIST files"),
    # names: every store and file system a study name reaches must take it (issue 16, items 1-3)
    "study name climbing out of runs/": (experiment_with(study="../../../tmp/x"), "is not a usable study name"),
    "study name with a slash": (experiment_with(study="a/b"), "'a/b' is not a usable study name"),
    "study name with a colon": (experiment_with(study="a:b"), "is not a usable study name"),
    "study name with a quote": (experiment_with(study='"o\'brien"'), "is not a usable study name"),
    "study name of 300 characters": (experiment_with(study="s" * 300), "is not a usable study name"),
    # values the config took and a run then choked on (items 9, 10, 13)
    "seed beyond int64": (yaml_case(GOOD_KEYS + "seed: 99999999999999999999\n"), "seed: Input should be less than"),
    "head too large to allocate": (yaml_case(GOOD_KEYS + "head_size: 1000000000\n"),
                                   "head_size: Input should be less than or equal to 65536"),
    "infinite learning rate": (yaml_case(GOOD_KEYS + "lr: .inf\n"), "lr: Input should be a finite number"),
    "infinite weight decay": (yaml_case(GOOD_KEYS + "weight_decay: .inf\n"), "weight_decay: Input should be a finite"),
    "duplicate key": (yaml_case(GOOD_KEYS + "lr: 0.1\nlr: 0.2\n"), "key 'lr' appears twice"),
    "booleans as head sizes": (yaml_case("search: {head_size: [true, false]}\n"), "True is not a value `head_size`"),
    "booleans as classes": (yaml_case("classes: [true, 2]\nsearch: {lr: {low: 0.001, high: 0.01}}\n"),
                            "classes.0"),
    "grace period under two heartbeats": (yaml_case(GOOD_KEYS + "sweep: {grace_period: 5, heartbeat_interval: 10}\n"),
                                          "grace_period (5 s) must be at least twice heartbeat_interval"),
    # files that are not experiments (item 11)
    "not UTF-8": (lambda tmp, backbone, mp: (tmp / "e.yaml").write_bytes(b"study: caf\xe9\n"), "not UTF-8 text"),
    "nested aliases": (yaml_case("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))), "aliases (at most 20)"),
    "50 MB file": (lambda tmp, backbone, mp: (tmp / "e.yaml").write_text("# padding\n" * 5_000_000),
                   "is not an experiment file"),
    # stores and places that cannot take a sweep (items 4, 8, 14)
    "runs_dir on a read-only file system": (lambda tmp, backbone, mp: write_experiment(
        tmp / "e.yaml", backbone=backbone).open("a").write("runs_dir: /proc/1/fine-tune-runs\n"), "is not writable"),
    "corrupt MLflow store": (broken_store(lambda db: db.write_bytes(b"garbage" * 100)), "is not a usable SQLite"),
    "half-created MLflow store": (broken_store(lambda db: sqlite3.connect(db).execute(
        "CREATE TABLE _alembic_tmp_experiments (x)")), "was left half-created"),
    "explicit data_dir beside ./data": (explicit_data_dir, "does not hold the Fashion-MNIST files"),
}


if not torch.cuda.is_available():
    CASES["device cuda on a machine without"] = (yaml_case(GOOD_KEYS + "device: cuda\n"), "device: cuda is not available")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_creates_nothing(case, tmp_path, monkeypatch, capsys, tiny_backbone):
    make, message = CASES[case]
    monkeypatch.setenv("FINE_TUNE_DATA", str(ROOT / "data"))  # else the data would be extracted into tmp_path
    monkeypatch.chdir(tmp_path)
    make(tmp_path, tiny_backbone[0], monkeypatch)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert main(["sweep", "--config", "e.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # no store, run or file


@pytest.mark.parametrize("args,message", [(["--n-trials", "-3"], "--n-trials: -3 is not at least 1"),
                                          (["--n-trials", "0"], "--n-trials: 0 is not at least 1"),
                                          (["--workers", "0"], "--workers: 0 is not at least 1"),
                                          (["--workers", "-2"], "--workers: -2 is not at least 1")])
def test_counts_below_one_are_refused(args, message, tmp_path, monkeypatch, capsys, tiny_backbone):
    """Item 12: `--n-trials -3` used to exit 0 having created the study, `--workers 0` to run one worker."""
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "e.yaml", backbone=tiny_backbone[0])
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--config", "e.yaml", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.yaml"]


SPACE_CHANGES = {  # what a study's trials recorded, and what the experiment file (helpers.TINY_YAML) now says
    "head_size": (CategoricalDistribution([0, 32]), 32,
                  "search.head_size: study changed has trials with the choices [0, 32], and Optuna cannot change that "
                  "to the choices [0, 16] within a study; keep the choices [0, 32], or give the new search a new study "
                  "name"),
    "lr": (FloatDistribution(1e-3, 3e-2), 0.01,
           "search.lr: study changed has trials with a range [0.001, 0.03], and Optuna cannot change that to a "
           "log-scale range [0.001, 0.03]"),
}


@pytest.mark.parametrize("name", SPACE_CHANGES)
def test_a_search_space_the_study_cannot_take_is_refused_before_any_trial(name, tmp_path, monkeypatch, capsys,
                                                                         tiny_backbone):
    """Issue 22 item 10: `head_size [0, 32]` -> `[0, 16]` on the same study ended each new trial in Optuna's "does not
    support dynamic value space" and a FAIL trial per attempt. Now one line naming the study and the fix, exit 2, and
    no trial added."""
    before, value, message = SPACE_CHANGES[name]
    monkeypatch.setenv("FINE_TUNE_DATA", str(ROOT / "data"))
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "e.yaml", backbone=tiny_backbone[0], study="changed")
    study = optuna.create_study(study_name="changed", direction="maximize",
                                storage=optuna_storage(f"sqlite:///{tmp_path}/runs/optuna.db"))
    study.add_trial(optuna.trial.create_trial(params={name: value}, distributions={name: before}, value=0.5))
    assert main(["sweep", "--config", "e.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"]
