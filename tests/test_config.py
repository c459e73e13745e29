"""Every malformed input gives one line naming the key and the problem, exit code 2, and writes nothing."""
import subprocess
import sys
from pathlib import Path

import pytest

from fine_tune.__main__ import main
from fine_tune.config import Config
from fine_tune.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]

MALFORMED = [
    ("study: x\nlr: [1, 2\n", "YAML syntax error at line"),
    ("learning_rate: 0.1\n", "learning_rate: unknown key"),
    ("lr: fast\n", "lr: Input should be a valid number"),
    ("lr: 0\n", "lr: Input should be greater than 0"),
    ("epochs: -3\n", "epochs: Input should be greater than 0"),
    ("frozen_layers: 3\n", "frozen_layers=3 but simplenet has 2 backbone layers"),
    ("classes: []\n", "classes: the class list is empty"),
    ("classes: [1, 12]\n", "class ids [12] are out of range"),
    ("model: resnet\n", "model: 'resnet' is not a model here; use simplenet, cnn, resnet18"),
    ("budget_per_class: 5900\n", "exceeds the 6000 training images per class"),
    ("search:\n  lr: {low: 0.1, high: 0.001}\n", "search.lr: low (0.1) is above high (0.001)"),
    ("search:\n  head_size: []\n", "search.head_size: the list of choices is empty"),
    ("search:\n  frozen_layers: {low: 0, high: 4}\n", "search.frozen_layers.high=4 but simplenet has 2"),
    ("pretrain: {classes: [0, 0, 1]}\n", "class ids repeat"),
    ("- just\n- a list\n", "expected a mapping"),
    ("lora_rank: -4\n", "lora_rank: Input should be greater than or equal to 0"),
    ("lr_decay: 0\n", "lr_decay: Input should be greater than 0"),
    ("lr_decay: 1.5\n", "lr_decay: Input should be less than or equal to 1"),
    ("search:\n  lr_decay: {low: 0.5, high: 2}\n", "search.lr_decay: 2.0 is not a value `lr_decay` accepts"),
    ("epochs: 3\nlp_epochs: 3\n", "lp_epochs=3 leaves no epoch to fine-tune in (epochs=3"),
    ("search:\n  lp_epochs: {low: 0, high: 10}\n", "lp_epochs=10 leaves no epoch to fine-tune in (epochs=10"),
    ("lora_rank: 8\nfrozen_layers: 2\n", "LoRA adapts the unfrozen stages, but frozen_layers=2 freezes every stage"),
]


@pytest.mark.parametrize("text,message", MALFORMED)
def test_malformed_config_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    assert main(["train", "--config", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: bad.yaml: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


def test_missing_experiment_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "nope.yaml"]) == 2
    assert "cannot read the experiment file" in capsys.readouterr().err


def test_bad_override(capsys):
    assert main(["train", "--set", "lr"]) == 2
    assert "expected key=value" in capsys.readouterr().err


def test_cli_exit_code_and_no_traceback_in_a_real_process(tmp_path):
    (tmp_path / "bad.yaml").write_text("frozen_layers: 9\n")
    p = subprocess.run([sys.executable, "-m", "fine_tune", "train", "--config", "bad.yaml"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["lr=0.01", "pretrain.epochs=2", "classes=[1, 2]"])
    assert cfg.lr == 0.01 and cfg.pretrain.epochs == 2 and cfg.classes == [1, 2]


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_file_validates(path):
    cfg = load_config(path)
    assert cfg.study and cfg.epochs <= 30


def test_pretrain_key_ignores_fine_tuning_settings():
    a = Config(pretrain={}, lr=0.1, frozen_layers=1)
    assert a.pretrain_key() == Config(pretrain={}, lr=0.5, seed=1).pretrain_key()  # the fine-tuning seed: no retrain
    assert a.pretrain_key() != Config(pretrain={"epochs": 2}).pretrain_key()
    assert a.pretrain_key() != Config(pretrain={"seed": 1}).pretrain_key()
