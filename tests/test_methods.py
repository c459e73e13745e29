"""How to fine-tune, searched: LoRA (lora_rank), linear-probe-then-fine-tune (lp_epochs) and layer-wise learning-rate
decay (lr_decay) are hyperparameters like the others: sampled where they apply, logged, tabled, reported by method,
reproduced bit for bit, and a LoRA champion serves merged, without peft."""
import json
import os
import subprocess
import sys

import numpy as np
import optuna
import pytest
import torch
from helpers import SEARCH, own_stores, runs_of, tiny_sweep
from mlflow.tracking import MlflowClient

from fine_tune.config import Config
from fine_tune.learn import checkpoints, lora
from fine_tune.learn.data import splits_for
from fine_tune.learn.models import build_model
from fine_tune.learn.train import optimizer_for, prepare_model
from fine_tune.study.single import reproduce
from fine_tune.study.sweep import run_sweep
from fine_tune.track import registry
from fine_tune.track.stores import optuna_storage, optuna_url

METHODS = {**SEARCH, "lora_rank": [0, 4], "lp_epochs": [0, 1], "lr_decay": {"low": 0.5, "high": 1.0}}
# One trial per way of fine-tuning, then what TPE picks; a probe (both stages frozen) samples none of the three.
ENQUEUED = [{"frozen_layers": 1, "lora_rank": 4, "lp_epochs": 0, "lr_decay": 1.0},
            {"frozen_layers": 0, "lora_rank": 0, "lp_epochs": 1, "lr_decay": 1.0},
            {"frozen_layers": 0, "lora_rank": 0, "lp_epochs": 0, "lr_decay": 0.5},
            {"frozen_layers": 2}]


# module fixtures: the file's tests run in one of `make test`'s processes (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_methods")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_backbone):
    with own_stores():
        cfg = tiny_sweep(tmp_path_factory.mktemp("methods") / "runs", tiny_backbone[0], study="methods",
                         n_trials=len(ENQUEUED) + 1, search=METHODS)
        study = optuna.create_study(study_name=cfg.study, storage=optuna_storage(optuna_url(cfg.runs_dir)),
                                    direction="maximize")
        for params in ENQUEUED:
            study.enqueue_trial({"lr": 1e-2, "head_size": 16, **params})
        study = run_sweep(cfg, progress=False, log=lambda s: None)
        runs = runs_of(cfg.runs_dir, cfg.study)
        yield cfg, study, runs[runs["tags.fine_tune.role"] == "trial"].set_index("tags.optuna.trial_number")


def run_of(runs, method: str):
    return runs[runs["params.method"] == method].iloc[0]


def test_each_way_is_sampled_where_it_applies_and_logged(swept):
    cfg, study, runs = swept
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    probe = study.trials[3]
    assert probe.params["frozen_layers"] == 2 and not {"lora_rank", "lp_epochs", "lr_decay"} & set(probe.params)
    for t in study.trials:
        if t.params["frozen_layers"] < 2:
            assert {"lora_rank", "lp_epochs", "lr_decay"} <= set(t.params), t.params
    assert {"LoRA", "LP-FT", "full", "probe"} <= set(runs["params.method"])
    probed = run_of(runs, "probe")
    assert (probed["params.lora_rank"], probed["params.lp_epochs"], probed["params.lr_decay"]) == ("0", "0", "1.0")
    for _, run in runs.iterrows():  # trainable parameters as a param and a metric, peak memory as a metric
        assert run["metrics.trainable_params"] == int(run["params.trainable_params"]) > 0
        assert run["metrics.memory/peak_mb"] >= 0
    # LoRA trains stage 2's adapters (rank 4 on its 128 -> 64 Linear: A is 4 x 128, B 64 x 4) and the head
    lora_run, full = run_of(runs, "LoRA"), runs.loc["2"]  # the decayed trial trains everything
    head = 64 * 16 + 16 + 16 * 5 + 5
    assert int(lora_run["params.trainable_params"]) == 4 * (128 + 64) + head
    assert int(full["params.trainable_params"]) == 784 * 128 + 128 + 128 * 64 + 64 + head
    # LP-FT: the phase boundary is on the run's one curve
    lpft = run_of(runs, "LP-FT")
    history = MlflowClient().get_metric_history(lpft.run_id, "train/head_only")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.0), (2, 0.0)]


def test_the_console_table_and_the_report_show_them_and_group_trials_by_method(swept):
    from analysis.read import load_study
    from analysis.report import leaderboard, methods
    from fine_tune.study.summary import top_table

    cfg, study, runs = swept
    header = top_table(study).splitlines()[0]
    assert all(name in header for name in ("lora_rank", "lp_epochs", "lr_decay")), header
    data = load_study(cfg.study, cfg.runs_dir)
    assert {"lora_rank", "lp_epochs", "lr_decay"} <= set(leaderboard(data)[1].df.columns)
    table = methods(data)[1].df.set_index("method")
    assert {"LoRA", "LP-FT", "full", "probe"} <= set(table.index)
    assert table["complete"].astype(int).sum() == len(study.trials)
    best = max(t.value for t in study.trials if t.params["frozen_layers"] == 2)
    assert table.loc["probe", f"best {data.objective}"] == f"{best:.4f}"
    lora_params = table.loc["LoRA", "median trainable params"].replace(",", "")
    assert int(lora_params) == int(run_of(runs, "LoRA")["params.trainable_params"])


@pytest.mark.parametrize("method", ["LoRA", "LP-FT"])
def test_a_rerun_of_a_lora_an_lp_ft_and_a_decayed_run_is_identical(swept, method):
    cfg, _, runs = swept
    run_id = run_of(runs, method).run_id
    same, text = reproduce(run_id, Config(runs_dir=cfg.runs_dir, pretrained=cfg.pretrained), log=lambda s: None)
    assert same, text
    if method == "LoRA":  # and the decayed one, in the same test: a third re-run costs a few seconds more
        decayed = runs.loc["2"]
        assert float(decayed["params.lr_decay"]) == 0.5
        same, text = reproduce(decayed.run_id, Config(runs_dir=cfg.runs_dir, pretrained=cfg.pretrained),
                               log=lambda s: None)
        assert same, text


# Loads a registered model with peft made unimportable: the champion must serve without it.
NO_PEFT = """
import json, sys
sys.modules["peft"] = None
import mlflow, numpy as np, torch
with torch.no_grad():
    logits = mlflow.pytorch.load_model(sys.argv[1])(torch.from_numpy(np.load(sys.argv[2]))).numpy()
print(json.dumps(logits.tolist()))
"""


def test_a_lora_champion_is_merged_serves_without_peft_and_predicts_as_its_checkpoint(swept, tmp_path):
    cfg, _, runs = swept
    run = run_of(runs, "LoRA")
    client = MlflowClient()
    images = splits_for(cfg).test.x[:16]
    version = registry.register_best(client, "methods-lora", run.run_id, float(run["metrics.best/val/f1_macro"]),
                                     cfg.sweep.objective, int(run.name), images[:2])
    assert version == "1"
    # the trial's checkpoint, as trained: peft's adapters beside the layers they adapt
    trial_cfg = Config.model_validate({**cfg.model_dump(), "frozen_layers": 1, "lora_rank": 4, "head_size": 16,
                                       "search": None})
    model = prepare_model(trial_cfg, 5)
    state = checkpoints.load(client.download_artifacts(run.run_id, "checkpoint/best.pt"))
    assert any(".lora_A." in k for k in state)
    model.load_state_dict(state)
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    np.save(tmp_path / "images.npy", images.numpy())
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           "MLFLOW_TRACKING_URI": client.tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-c", NO_PEFT, "models:/methods-lora@champion",
                           str(tmp_path / "images.npy")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    served = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    assert (served.argmax(1) == expected.argmax(1)).all()


# --- units: what each way changes in the model and the optimizer


def test_lr_decay_gives_each_stage_below_the_head_a_smaller_rate():
    cfg = Config(model="cnn", lr=1e-2, lr_decay=0.5, frozen_layers=1)
    model = prepare_model(cfg, 5)
    groups = optimizer_for(cfg, model, torch.device("cpu")).param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-2 * 0.5 ** 3, 1e-2 * 0.5 ** 2, 1e-2 * 0.5, 1e-2])
    assert len(groups) == 4  # the frozen first stage has no group; then stages 2-4 and the head
    head_only = optimizer_for(cfg.model_copy(update={"lp_lr": 0.1}), model, torch.device("cpu"), head_only=True)
    assert [g["lr"] for g in head_only.param_groups] == [0.1]
    assert sum(p.numel() for g in head_only.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.head.parameters())


def test_merging_lora_keeps_the_function_and_leaves_plain_layers():
    torch.manual_seed(0)
    model = lora.adapt(build_model("cnn", 5).freeze(1), rank=2, alpha=4.0)
    for name, p in model.named_parameters():  # only the adapters of stages 2-4 and the head train
        assert p.requires_grad == (".lora_" in name or name.startswith("head.")), name
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_()  # as after training: a zero B would make any merge look right
        x = torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8)
        before = model.eval()(x)
        after = lora.merged(model)(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert not any("lora" in n or "base_layer" in n for n in model.state_dict())
    assert all(type(m).__module__.startswith("torch.") for m in model.backbone.modules())


def test_lora_targets_picks_layers_by_name_and_leaves_attention_projections_alone():
    model = build_model("vit_b_16", 2, image_size=32)
    names = lora.targets(model, 4)
    assert names and all(n.startswith("backbone.4.") and ".mlp." in n for n in names)
    assert lora.targets(model, 4, ["mlp.3"]) == [n for n in names if n.endswith("mlp.3")]
    assert lora.targets(model, 5) == []  # every stage frozen: nothing to adapt


@pytest.mark.parametrize("verb, text, says", [
    ("train", "lora_rank: 4\nlora_targets: [query]\n",
     "simplenet's unfrozen stages (1-2) have no layers named ['query'] to adapt"),
    ("sweep", "lora_targets: [nothing]\nsearch: {lora_rank: [0, 8], frozen_layers: {low: 1, high: 2}}\n",
     "simplenet's unfrozen stages (2-2) have no layers named ['nothing'] to adapt"),
])
def test_lora_with_nothing_to_adapt_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, verb, text,
                                                                             says):
    from fine_tune.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    assert main([verb, "--config", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: lora_rank: ") and says in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
