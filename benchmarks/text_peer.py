"""The text peer in the benchmark: the study through the path a Hugging Face user takes, beside ours.

The peer is what transformers' documentation shows: AutoModelForSequenceClassification from the same local
all-MiniLM-L6-v2 folder, the texts tokenized once and padded per batch by the default collator,
`Trainer.hyperparameter_search(backend="optuna")` with a `model_init` that freezes the trial's first stages (the
embeddings, then the transformer blocks in the same four groups as ours) and `report_to="mlflow"`. Ours is
`fine_tune sweep` of the same study. Both train the same texts (our splits of Debian's fortunes), for the same epochs,
on the same points of the search space (drawn once, enqueued in both studies), in this process, on as many threads.
Trainer needs accelerate (pinned in requirements.txt: peft needs it too).

Heads: HF's is its pooler (dense + tanh over the first token) and a linear layer, trained in every trial; there is no
`head_size` to map onto it, so both sides keep `head_size: [0]` (ours: one linear layer over the mean of the tokens).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from fine_tune.config import Config
from fine_tune.experiment import load_config

from benchmarks.peer import fluent_store, ours_sweep, per_trial

FLAGSHIP = Path(__file__).resolve().parent.parent / "experiments" / "fortunes_minilm.yaml"
TOPICS = ["computers", "food", "love", "sports"]
SEARCHED = (("lr", "learning_rate"), ("frozen_layers",))  # the trial's hyperparameters, by the names each side logs


def text_config(runs_dir: Path, quick: bool) -> Config:
    """The flagship text study made small: 4 topics x 10 labeled texts, frozen_layers in [3, 5], head_size [0]."""
    flagship = load_config(FLAGSHIP)
    return Config.model_validate({
        **flagship.model_dump(), "study": "ours-text", "runs_dir": str(runs_dir), "classes": TOPICS,
        "budget_per_class": 10, "val_per_class": 10, "test_per_class": 10, "epochs": 1 if quick else 2,
        "patience": None, "search": {"lr": flagship.search.lr.model_dump(), "frozen_layers": {"low": 3, "high": 5},
                                     "head_size": [0]},
        "sweep": {**flagship.sweep.model_dump(), "pruner": "none", "storage": None}})


def accelerate_ready() -> bool:
    """Whether Trainer can run: accelerate importable, as transformers sees it."""
    from transformers.utils import import_utils

    return import_utils.is_accelerate_available()


def split_texts(cfg: Config, splits) -> dict[str, tuple[list[str], list[int]]]:
    """The texts and labels of each split, as our splits hold them (their `index` is the position in the source)."""
    from fine_tune.learn.text import labeled_texts

    rows = labeled_texts(cfg.data, cfg.classes)
    return {name: ([rows[i][0] for i in split.index.tolist()], split.y.tolist())
            for name, split in (("train", splits.train), ("val", splits.val))}


def hf_stages(model) -> list:
    """The encoder of a sequence classifier as our five stages: the embeddings, then the blocks in four groups."""
    from torch import nn

    from fine_tune.archs import TEXT_STAGES

    bert = model.base_model
    layers = list(bert.encoder.layer)
    cuts = [round(i * len(layers) / (TEXT_STAGES - 1)) for i in range(TEXT_STAGES)]
    return [bert.embeddings] + [nn.ModuleList(layers[a:b]) for a, b in zip(cuts, cuts[1:])]


def hf_sweep(cfg: Config, texts: dict, trials: list[dict], seed: int, uri: str) -> dict:
    """The documented Trainer search on `texts`, trying exactly `trials`; seconds per trial and its study."""
    import optuna
    import torch
    from sklearn.metrics import f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from fine_tune.learn.encoders import model_dir

    hf_logging.set_verbosity_error()  # "newly initialized" and "no field frozen_layers" lines, once per trial
    hf_logging.disable_progress_bar()  # a bar per model load
    folder = str(model_dir(cfg.model))
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def dataset(name: str) -> list[dict]:
        enc = tokenizer(texts[name][0], truncation=True, max_length=cfg.data.max_length)
        return [{"input_ids": i, "attention_mask": m, "labels": y}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], texts[name][1])]

    def hp_space(trial) -> dict:
        return {"learning_rate": trial.suggest_float("lr", cfg.search.lr.low, cfg.search.lr.high, log=True),
                "frozen_layers": trial.suggest_int("frozen_layers", cfg.search.frozen_layers.low,
                                                   cfg.search.frozen_layers.high),
                "head_size": trial.suggest_categorical("head_size", list(cfg.search.head_size.root))}

    def model_init(trial):
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(cfg.classes))
        # Trainer calls model_init before hp_space: suggest here (Optuna returns the same value again later)
        for stage in hf_stages(model)[:hp_space(trial)["frozen_layers"] if trial is not None else 0]:
            stage.requires_grad_(False)
        return model

    def metrics(p) -> dict:
        pred = p.predictions.argmax(-1)
        return {"accuracy": float((pred == p.label_ids).mean()),
                "f1_macro": float(f1_score(p.label_ids, pred, average="macro"))}

    with tempfile.TemporaryDirectory() as tmp, fluent_store(uri, experiment="hf-peer"):
        args = TrainingArguments(output_dir=tmp, num_train_epochs=cfg.epochs,
                                 per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=64,
                                 eval_strategy="epoch", logging_strategy="epoch", save_strategy="no",
                                 report_to="mlflow", seed=cfg.seed, disable_tqdm=True,
                                 dataloader_pin_memory=torch.cuda.is_available())  # else a warning per epoch
        trainer = Trainer(model_init=model_init, args=args, train_dataset=dataset("train"),
                          eval_dataset=dataset("val"), processing_class=tokenizer, compute_metrics=metrics)
        trainer.remove_callback(PrinterCallback)  # its dict per epoch would run through the benchmark's output
        storage = f"sqlite:///{tmp}/optuna.db"
        queued = optuna.create_study(study_name="hf-peer", storage=storage, direction="maximize")
        for params in trials:
            queued.enqueue_trial(params)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        start = time.perf_counter()
        trainer.hyperparameter_search(hp_space=hp_space, compute_objective=lambda m: m["eval_f1_macro"],
                                      n_trials=len(trials), direction="maximize", backend="optuna",
                                      study_name="hf-peer", storage=storage, load_if_exists=True,
                                      sampler=optuna.samplers.TPESampler(seed=seed),
                                      pruner=optuna.pruners.NopPruner())  # as ours: every trial runs its epochs
        wall = time.perf_counter() - start
        return per_trial(optuna.load_study(study_name="hf-peer", storage=storage), wall)


def text_figures(scratch: Path, quick: bool, seed: int = 0) -> dict:
    """Row (l): the small text study through Trainer's search and through ours, seconds per trial side by side and
    what each MLflow tree holds."""
    import torch

    from fine_tune.learn import threads
    from fine_tune.learn.data import splits_for
    from fine_tune.learn.pretrain import backbone_for

    from benchmarks.bench import sampled_params
    from benchmarks.peer import holdings

    if not accelerate_ready():
        return {"skipped": "accelerate is not installed: `make venv` installs it (requirements.txt)"}
    scratch.mkdir(parents=True, exist_ok=True)
    cfg = text_config(scratch, quick)
    backbone = backbone_for(cfg, log=lambda s: None)
    splits = splits_for(cfg)
    n = 2 if quick else 6
    trials = sampled_params(cfg, n, seed)
    uri = f"sqlite:///{scratch.resolve()}/mlflow.db"
    n_threads = threads.count(cfg.model)
    torch.set_num_threads(n_threads)  # the peer on as many threads as ours takes
    with fluent_store(uri):  # ours reads MLFLOW_TRACKING_URI as the user's store: both trees in one database
        hf = hf_sweep(cfg, split_texts(cfg, splits), trials, seed, uri)
        ours = ours_sweep(cfg, backbone, n, seed, trials, study="ours-text", pruner="none")
    return {"trials": n, "train_texts": len(splits.train), "val_texts": len(splits.val), "epochs": cfg.epochs,
            "threads": n_threads, "hf": hf, "ours": ours, "by_frozen": by_frozen(hf, ours),
            "speedup_per_trial": hf["s_per_trial"] / ours["s_per_trial"],
            "hf_holds": holdings(uri, "hf-peer", SEARCHED), "ours_holds": holdings(uri, "ours-text", SEARCHED)}


def by_frozen(hf: dict, ours: dict) -> dict[int, dict[str, float]]:
    """Seconds per trial of each side by the trial's frozen_layers (both ran the same trials in the same order), the
    mean and the fastest trial: what caching the frozen stages saves depends on how many there are, and on a shared
    machine the fastest trial is the one the other processes slowed least."""
    import statistics

    out: dict[int, dict[str, float]] = {}
    for k in sorted({p["frozen_layers"] for p in hf["params"]}, reverse=True):
        at = [i for i, p in enumerate(hf["params"]) if p["frozen_layers"] == k]
        out[k] = {"trials": len(at)}
        for side, d in (("hf", hf), ("ours", ours)):
            out[k] |= {f"{side}_s": statistics.mean(d["trial_s"][i] for i in at),
                       f"{side}_fastest_s": min(d["trial_s"][i] for i in at)}
    return out


def text_rows(d: dict) -> list[tuple[str, str, str, str]]:
    """Row (l) of the table: seconds per trial side by side, then what each MLflow tree holds."""
    if "skipped" in d:
        return [("(l) the text study through Trainer.hyperparameter_search", d["skipped"], "", "")]
    h, o = d["hf"], d["ours"]

    def holds(t: dict) -> str:
        params = (f"{t['params_per_trial']}" if t["params_per_trial"] == t["params_per_trial_min"] else
                  f"{t['params_per_trial_min']}-{t['params_per_trial']}")
        held = ", ".join(f"{name} in {n} of {t['trial_runs']}" for name, n in t["searched_params"].items())
        return (f"{t['trial_runs']} trial runs{' nested under a parent' if t['nested'] else ''}, {params} params "
                f"(the trial's {held}), "
                f"{t['metrics_per_trial']} metrics ({t['curves_per_trial']} per-epoch curves), "
                f"{t['artifacts_per_trial']} artifacts per trial, {t['datasets']} with datasets")
    return [(f"(l) the text study the Hugging Face way (`Trainer.hyperparameter_search`, optuna backend, "
             f"report_to=mlflow) vs `fine_tune sweep`: all-MiniLM-L6-v2, the same {d['trials']} trials "
             f"(frozen_layers {', '.join(str(p['frozen_layers']) for p in h['params'])}), {d['train_texts']} training "
             f"texts, {d['epochs']} epochs, {d['threads']} threads",
             f"{h['s_per_trial']:.2f} vs {o['s_per_trial']:.2f} s per trial; by frozen_layers, mean (fastest): "
             + ", ".join(f"{k}: {b['hf_s']:.2f} ({b['hf_fastest_s']:.2f}) vs {b['ours_s']:.2f} "
                         f"({b['ours_fastest_s']:.2f}) s"  # most frozen first, also as read back from the JSON
                         for k, b in sorted(d["by_frozen"].items(), key=lambda kb: -int(kb[0])))
             + f" (whole search {h['wall_s']:.1f} vs {o['wall_s']:.1f} s)",
             f"ours {d['speedup_per_trial']:.1f}x faster per trial", ">= 3x"),
            ("(l) what each MLflow tree holds", f"Trainer: {holds(d['hf_holds'])}<br>ours: {holds(d['ours_holds'])}",
             "", "")]
