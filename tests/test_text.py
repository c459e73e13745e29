"""Text classification on real texts (Debian's fortunes) with the real all-MiniLM-L6-v2 weights, offline; a tiny
randomly initialised BERT config only where a test needs a model folder of its own."""
import json

import pytest
import torch
from helpers import run_cli

from fine_tune.config import Config
from fine_tune.errors import CheckpointError, DataError
from fine_tune.learn.data import splits_for
from fine_tune.learn.encoders import model_dir
from fine_tune.learn.models import build_model
from fine_tune.learn.pretrain import backbone_for
from fine_tune.learn.text import labeled_texts, read_table
from fine_tune.learn.train import train

MINILM = "hf:sentence-transformers/all-MiniLM-L6-v2"
TOPICS = ["computers", "food", "love", "sports"]


def text_config(tmp_path, **overrides) -> Config:
    """Four fortune topics, 10 labeled texts each, 10 val and 20 test texts per topic, the real MiniLM."""
    fields = dict(study="text", model=MINILM, data={"kind": "fortunes", "max_length": 48}, classes=TOPICS,
                  budget_per_class=10, val_per_class=10, test_per_class=20, epochs=2, lr=1e-2, batch_size=8,
                  frozen_layers=5, runs_dir=str(tmp_path / "runs"))
    fields.update(overrides)
    return Config(**fields)


def tiny_bert(folder):
    """A BERT-family model folder of our own: a real tokenizer (MiniLM's), a tiny random config and weights."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    AutoTokenizer.from_pretrained(str(model_dir(MINILM))).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    return folder


def test_fortunes_are_read_by_topic_and_duplicates_kept_once(tmp_path):
    cfg = text_config(tmp_path)
    rows = labeled_texts(cfg.data, TOPICS)
    texts = [t for t, _ in rows]
    assert len(texts) == len(set(texts)) and {label for _, label in rows} == set(TOPICS)
    assert all("%" != t.strip() and t.strip() for t in texts)
    splits = splits_for(cfg)
    assert splits.class_names == TOPICS
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 40, 80)
    seen = [set(map(bytes, s.x.numpy())) for s in (splits.train, splits.val, splits.test)]  # token rows
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_a_csv_and_a_jsonl_file_give_the_same_examples(tmp_path):
    rows = [("the compiler crashed again", "computers"), ("bread and cheese", "food"), ("I adore you", "love")]
    (tmp_path / "t.csv").write_text("sentence,topic\n" + "".join(f'"{t}",{label}\n' for t, label in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"sentence": t, "topic": label}) + "\n" for t, label in rows))
    assert read_table(tmp_path / "t.csv", "sentence", "topic") == rows
    assert read_table(tmp_path / "t.jsonl", "sentence", "topic") == rows
    with pytest.raises(DataError, match="no column 'text'.*data.text_column"):
        read_table(tmp_path / "t.csv", "text", "topic")


def test_the_frozen_encoder_is_cached_and_gives_the_same_result_as_running_it(tmp_path):
    """The cache stores the hidden states after the frozen blocks (with the mask): a partly frozen run is the same
    with and without it, and a probe (all five stages frozen) learns the topics well above chance (0.25)."""
    cfg = text_config(tmp_path, frozen_layers=4, epochs=1, lr=1e-3)
    splits = splits_for(cfg)
    backbone = backbone_for(cfg, log=lambda s: None)
    cached = train(cfg, splits, backbone)
    plain = train(cfg.model_copy(update={"cache_features": False}), splits, backbone)
    assert cached.history[0]["train/loss"] == pytest.approx(plain.history[0]["train/loss"], rel=1e-4)
    assert cached.metrics["val/f1_macro"] == pytest.approx(plain.metrics["val/f1_macro"], abs=1e-6)
    probe = train(cfg.model_copy(update={"frozen_layers": 5, "epochs": 8, "lr": 1e-2}), splits, backbone)
    assert probe.metrics["test/accuracy"] > 0.5
    assert probe.metrics["trainable_params"] == 384 * 4 + 4  # the head alone


def test_lora_and_lp_ft_adapt_the_text_encoder_and_merge_back_into_plain_layers(tmp_path):
    """LoRA on the query and value projections of MiniLM's last two stages, after an LP-FT head-only epoch: a small
    fraction of the parameters trains, the frozen stages stay cached, and the merged model (what a champion serves)
    gives the adapted model's logits."""
    from fine_tune.learn import lora

    cfg = text_config(tmp_path, frozen_layers=3, lora_rank=4, lora_targets=["query", "value"], epochs=2, lp_epochs=1,
                      lr=1e-3, lp_lr=1e-2)
    splits = splits_for(cfg)
    result = train(cfg, splits, backbone_for(cfg, log=lambda s: None))
    adapted = 3 * 2 * (4 * 384 + 384 * 4)  # stages 4-5 hold blocks 4-6: their query and value, A 4x384 and B 384x4
    assert result.metrics["trainable_params"] == adapted + 384 * 4 + 4
    assert [h["train/head_only"] for h in result.history] == [1.0, 0.0]
    model = result.model.eval()
    x = splits.test.x[:8]
    with torch.no_grad():
        before = model(x)
        after = lora.merged(model)(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert result.metrics["test/accuracy"] > 0.25  # above chance on four topics


def test_the_packaged_minilm_is_the_real_one(tmp_path):
    model = build_model(MINILM, 2)
    encoder_params = sum(p.numel() for p in model.backbone.parameters())
    assert 22_000_000 < encoder_params < 23_000_000  # all-MiniLM-L6-v2: 22.7M parameters
    assert len(model.backbone) == 5


def test_a_model_folder_of_our_own_is_used_and_one_without_weights_is_refused(tmp_path):
    folder = tiny_bert(tmp_path / "tiny-bert")
    cfg = text_config(tmp_path, model=f"hf:{folder}", frozen_layers=0, epochs=1)
    result = train(cfg, splits_for(cfg), backbone_for(cfg, log=lambda s: None))
    assert result.status == "finished" and len(result.model.backbone) == 5
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        model_dir(f"hf:{folder}")


@pytest.mark.parametrize("change, says", [
    (["--set", "model=hf:nobody/no-such-model"], "not in huggingface_hub's cache"),
    (["--set", "frozen_layers=6"], "frozen_layers=6 but hf:sentence-transformers/all-MiniLM-L6-v2 has 5"),
    (["--set", "data.max_length=1"], "data.max_length"),
    (["--set", "classes=[computers, no-such-topic]"], "topic 'no-such-topic' is not in"),
    (["--set", "budget_per_class=500"], "training texts, fewer than"),
    (["--set", "model=simplenet"], "takes images but data.kind is fortunes"),
])
def test_bad_text_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, change, says):
    (tmp_path / "e.yaml").write_text(f"model: {MINILM}\ndata: {{kind: fortunes}}\nclasses: [computers, food]\n"
                                     "budget_per_class: 5\nval_per_class: 5\ntest_per_class: 5\nepochs: 1\n")
    p = run_cli(tmp_path, "train", "--config", "e.yaml", *change, HF_HUB_OFFLINE="1")
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1 and says in p.stderr
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_a_text_file_that_is_not_utf8_or_has_an_empty_text_is_refused(tmp_path):
    (tmp_path / "bad.csv").write_bytes(b"text,label\n\xff\xfe caf\xe9,food\n")
    (tmp_path / "empty.csv").write_text('text,label\n"",food\nsomething,love\n')
    for name, says in (("bad.csv", "is not UTF-8"), ("empty.csv", "example 1 has an empty text")):
        cfg = text_config(tmp_path, data={"kind": "text", "root": str(tmp_path / name)}, classes=None)
        with pytest.raises(DataError, match=says):
            splits_for(cfg)


@pytest.mark.slow
def test_a_text_study_is_tracked_reproduced_confirmed_reported_and_compared_with_an_image_study(tmp_path,
                                                                                              tiny_backbone):
    """The text path downstream, end to end: a 3-trial sweep on real stores (params, per-epoch metrics, the text
    splits as dataset inputs), `make rerun` identical, `make confirm`, the report's per-class F1 by topic name and a
    comparison beside an image study in the same stores."""
    from analysis.__main__ import main as analysis
    from helpers import runs_of, tiny_sweep
    from mlflow.tracking import MlflowClient

    from fine_tune.study.confirm import confirm
    from fine_tune.study.single import reproduce
    from fine_tune.study.sweep import run_sweep

    cfg = text_config(tmp_path, study="text-study", search={"lr": {"low": 3e-3, "high": 3e-2, "log": True},
                                                            "frozen_layers": {"low": 4, "high": 5},
                                                            "head_size": [0, 16]},
                      sweep={"n_trials": 3, "pruner": "none"})
    study = run_sweep(cfg, progress=False, log=lambda s: None)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3
    runs = runs_of(cfg.runs_dir, "text-study")
    trials = runs[runs["tags.fine_tune.role"] == "trial"]
    assert set(trials["params.class_names"]) == {"|".join(TOPICS)}
    assert set(trials["params.model"]) == {MINILM}
    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    run = client.get_run(trials.run_id.iloc[0])
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {f"fortunes:{'+'.join(TOPICS)}"}
    assert len(client.get_metric_history(run.info.run_id, "val/f1_macro")) == 2
    same, text = reproduce(run.info.run_id, cfg, log=lambda s: None)
    assert same, text
    assert confirm(cfg, top_k=1, seeds=1, log=lambda s: None) == 1
    run_sweep(tiny_sweep(tmp_path / "runs", tiny_backbone[0], "image-study", 2), progress=False, log=lambda s: None)
    out = tmp_path / "reports"
    assert analysis(["report", "--study", "text-study", "--runs-dir", cfg.runs_dir, "--out", str(out),
                     "--resamples", "100"]) == 0
    md = (out / "text-study" / "report.md").read_text()
    assert all(f"| {topic} |" in md for topic in TOPICS)
    assert analysis(["compare", "--studies", "image-study", "text-study", "--runs-dir", cfg.runs_dir, "--out",
                     str(out), "--resamples", "100"]) == 0
    assert "text-study" in (out / "compare-image-study-text-study" / "report.md").read_text()
    assert_the_champion_serves_text(tmp_path, cfg, client, study)


def assert_the_champion_serves_text(tmp_path, cfg, client, study):
    """From a process outside the repo that cannot import fine_tune: texts in, topic names out, the same names the
    champion trial's own checkpoint gives."""
    import subprocess
    import sys

    from fine_tune.learn import checkpoints
    from fine_tune.learn.text import labeled_texts, tokenized
    from transformers import AutoTokenizer

    texts = [t for t, _ in labeled_texts(cfg.data, TOPICS)][::97][:12]
    script = ("import json, sys, mlflow; m = mlflow.pyfunc.load_model('models:/text-study@champion'); "
              "print(json.dumps(m.predict(json.loads(sys.stdin.read()))))")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/runs/mlflow.db", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    p = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    served = json.loads(p.stdout.strip().splitlines()[-1])
    best = max((t for t in study.trials if t.value is not None), key=lambda t: (t.value, -t.number))
    trial_cfg = cfg.model_copy(update=best.params)
    model = build_model(MINILM, len(TOPICS), trial_cfg.head_size)
    (tmp_path / "champion").mkdir()
    path = client.download_artifacts(best.user_attrs["mlflow_run_id"], "checkpoint/best.pt", str(tmp_path / "champion"))
    model.load_state_dict(checkpoints.load(path))
    with torch.no_grad():
        own = model.eval()(tokenized(texts, AutoTokenizer.from_pretrained(str(model_dir(MINILM))), 48)).argmax(1)
    assert served == [TOPICS[i] for i in own.tolist()]


@pytest.mark.slow
def test_the_label_efficiency_curve_runs_for_text(tmp_path):
    """`make curve` for text: the pretrained MiniLM fine-tuned, the same architecture from its config trained from
    scratch, and a linear probe of the pretrained encoder, each a tracked run with what it trained."""
    from helpers import runs_of

    from fine_tune.study.efficiency import run_curve

    cfg = text_config(tmp_path, study="text-curve", epochs=1, frozen_layers=4, curve={"budgets": [5], "seeds": 1})
    assert run_curve(cfg, log=lambda s: None) == 3
    runs = runs_of(cfg.runs_dir, "text-curve-curve")
    runs = runs[runs["tags.fine_tune.role"] == "curve"].set_index("tags.fine_tune.arm")
    assert runs.loc["from scratch", "params.pretrained"] == "none"
    assert runs.loc["from scratch", "params.frozen_layers"] == "0"
    assert runs.loc["linear probe", "params.frozen_layers"] == "5"
    assert runs.loc["linear probe", "params.trainable_params"] == str(384 * 4 + 4)
    assert runs.loc["fine-tuned", "params.pretrained"].endswith(".pt")
