"""The bad-input catalogue for `python -m fine_tune sweep`: one line, exit code 2, and no study, run or file."""
from pathlib import Path

import pytest
import torch

from fine_tune.__main__ import main
from fine_tune.models import build_model

from helpers import write_experiment

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
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_creates_nothing(case, tmp_path, monkeypatch, capsys, tiny_backbone):
    make, message = CASES[case]
    monkeypatch.setenv("FINE_TUNE_DATA", str(ROOT / "data"))  # else the data would be extracted into tmp_path
    monkeypatch.chdir(tmp_path)
    make(tmp_path, tiny_backbone[0], monkeypatch)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["sweep", "--config", "e.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/, no store, no checkpoint
