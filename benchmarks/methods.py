"""Row (m) of the benchmark: what each way of fine-tuning costs, on the text study's model (the real all-MiniLM-L6-v2
on fortunes): seconds per epoch and peak memory of a LoRA run against a full fine-tune of the same model, and the
seconds of an LP-FT run against fine-tuning alone for as many epochs (--quick: the last two stages only). The runs alternate, in this process, so the
machine's load falls on each alike; the figures are ratios within one run.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from fine_tune.archs import TEXT_STAGES
from fine_tune.learn.data import splits_for
from fine_tune.learn.pretrain import backbone_for
from fine_tune.learn.train import train

from benchmarks.text_peer import text_config

RANK = 8


def method_figures(runs_dir: Path, quick: bool) -> dict:
    base = text_config(runs_dir, quick).model_copy(update={
        "search": None, "frozen_layers": 3 if quick else 0, "lr": 1e-4, "epochs": 2 if quick else 4, "patience": None})
    runs = {"full": base, "lora": base.model_copy(update={"lora_rank": RANK}),
            "lp_ft": base.model_copy(update={"lp_epochs": base.epochs // 2, "lp_lr": 1e-2})}
    splits = splits_for(base)
    backbone = backbone_for(base, log=lambda s: None)
    got: dict[str, dict[str, list]] = {k: {"epoch_s": [], "trial_s": [], "peak_mb": [], "params": []} for k in runs}
    for _ in range(1 if quick else 2):
        for key, cfg in runs.items():
            result = train(cfg, splits, backbone)
            phase = [h for h in result.history if not h.get("train/head_only")]  # LP-FT: its fine-tuning epochs
            got[key]["epoch_s"] += [h["time/epoch_s"] for h in phase]
            got[key]["trial_s"].append(result.metrics["time/train_s"])
            got[key]["peak_mb"].append(result.metrics.get("memory/peak_mb", float("nan")))
            got[key]["params"].append(result.metrics["trainable_params"])
    out: dict = {"model": base.model, "train_texts": len(splits.train), "epochs": base.epochs, "rank": RANK,
                 "frozen_layers": base.frozen_layers,
                 "lp_epochs": runs["lp_ft"].lp_epochs}
    for key, d in got.items():
        out[key] = {"s_per_epoch": statistics.median(d["epoch_s"]), "s_per_trial": statistics.median(d["trial_s"]),
                    "peak_mb": statistics.median(d["peak_mb"]), "trainable_params": d["params"][0]}
    full, lora, lp = out["full"], out["lora"], out["lp_ft"]
    out |= {"lora_epoch_ratio": lora["s_per_epoch"] / full["s_per_epoch"],
            "lora_memory_ratio": lora["peak_mb"] / full["peak_mb"],
            "lp_ft_trial_ratio": lp["s_per_trial"] / full["s_per_trial"]}
    return out


def method_rows(d: dict) -> list[tuple[str, str, str, str]]:
    full, lora, lp = d["full"], d["lora"], d["lp_ft"]
    what = f"{d['model'].removeprefix('hf:')}, {d['train_texts']} training texts, {d['epochs']} epochs"
    tuned = "full fine-tune" if not d["frozen_layers"] else f"fine-tune of the last {TEXT_STAGES - d['frozen_layers']} stages"
    return [(f"(m) LoRA (rank {d['rank']}, every Linear layer the fine-tune trains) vs {tuned}, {what}",
             f"{lora['s_per_epoch']:.2f} vs {full['s_per_epoch']:.2f} s per epoch; peak memory {lora['peak_mb']:.0f} "
             f"vs {full['peak_mb']:.0f} MiB; {lora['trainable_params']:,} vs {full['trainable_params']:,} trainable",
             f"{d['lora_epoch_ratio']:.2f}x the time, {d['lora_memory_ratio']:.2f}x the memory", ""),
            (f"(m) LP-FT ({d['lp_epochs']} head-only epochs on cached features, then fine-tuning) vs fine-tuning "
             f"alone, {what}",
             f"{lp['s_per_trial']:.2f} vs {full['s_per_trial']:.2f} s per run", f"{d['lp_ft_trial_ratio']:.2f}x the "
             "time", "")]

