"""python -m benchmarks.bench [EXPERIMENT] [--quick] [--out reports] — our trial speed side by side with the
tutorial's loop and the hardware floor (`make bench`).

Everything is measured in one run on the same data and model and reported as ratios (these machines are noisy):
each figure is the median over repeats, with its spread (min-max). Writes reports/bench.md and reports/bench.json.
The sweep figures (e)-(g) use EXPERIMENT (default experiments/fashion_transfer.yaml, the study `make sweep` runs).
It is a tool for us, outside the package: it uses fine_tune's public functions only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fine_tune.config import Config
from fine_tune.experiment import load_config
from fine_tune.learn import checkpoints, features
from fine_tune.learn.data import splits_for
from fine_tune.learn.device import pick_device
from fine_tune.learn.fashion import prepare as prepare_data
from fine_tune.learn.models import build_model
from fine_tune.learn.train import train

DEFAULT_EXPERIMENT = Path("experiments/fashion_transfer.yaml")


def spread(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]  # a figure a run could not give (see steady_rate)
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def tutorial_epoch(cfg: Config, indices: torch.Tensor, device: torch.device) -> float:
    """The tutorial's loop: torchvision dataset with ToTensor through a DataLoader, batch 64, Adam; seconds."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    root = prepare_data(cfg.data_dir)
    ds = Subset(datasets.FashionMNIST(str(root), train=True, transform=transforms.ToTensor()), indices.tolist())
    loader = DataLoader(ds, batch_size=64, shuffle=True)
    torch.manual_seed(0)
    model = build_model("simplenet", 10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    model.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def ours_epochs(cfg: Config, splits, backbone: str | None, epochs: int) -> tuple[list[float], float]:
    """Per-epoch training-pass seconds of our loop, and the whole call's seconds (cache building included)."""
    start = time.perf_counter()
    result = train(cfg.model_copy(update={"epochs": epochs, "patience": None}), splits, backbone)
    return [h["time/train_pass_s"] for h in result.history], time.perf_counter() - start


def fwd_bwd_flops(model: nn.Module) -> int:
    """FLOPs of one forward + backward pass per image: 2 per multiply-add forward, twice that backward."""
    macs = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    return 3 * 2 * macs


def matmul_rate(device: torch.device, n: int = 1024, reps: int = 20) -> float:
    """This machine's float32 matmul rate in FLOP/s (a large square GEMM: the best case)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(2 * n**3 * reps / (time.perf_counter() - start))
    return statistics.median(rates)


def sampled_params(cfg: Config, n: int, seed: int) -> list[dict]:
    """`n` points of the experiment's search space, drawn at random: the same work for every sweep compared."""
    import optuna

    from fine_tune.study.samplers import suggest

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [suggest(trial := study.ask(), cfg) and trial.params for _ in range(n)]


def sweep_figures(cfg: Config, backbone: str, workers: int, n_trials: int, pruner: str, seed: int,
                  trials: list[dict] | None = None) -> dict:
    """One sweep in a fresh runs dir: completed trials per minute (from trial timestamps), epochs, best value.
    With `trials`, the study runs exactly those parameters (enqueued) instead of sampling its own."""
    import optuna

    from fine_tune.study.sweep import open_study, run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        c = Config.model_validate({**cfg.model_dump(), "runs_dir": tmp, "study": f"bench-{pruner}-{workers}",
                                   "pretrained": backbone, "seed": seed,
                                   "sweep": {**cfg.sweep.model_dump(), "pruner": pruner, "storage": None}})
        if trials:
            study = open_study(c)
            for params in trials:
                study.enqueue_trial(params)
        features.clear_memory()  # an in-process sweep starts as cold as a spawned worker
        start = time.perf_counter()
        study = run_sweep(c, n_trials, workers=workers, log=lambda s: None, progress=False)
        wall = time.perf_counter() - start
        ended = [t for t in study.trials if t.datetime_complete]
        span = (max(t.datetime_complete for t in ended) - min(t.datetime_start for t in ended)).total_seconds()
        done = [t for t in ended if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        # trials per minute while trials run; what the sweep spends outside them (worker start-up) apart
        return {"trials_per_min": len(done) / span * 60, "steady_trials_per_min": steady_rate(done),
                "epochs": sum(len(t.intermediate_values) for t in ended), "best": study.best_value,
                "outside_trials_s": wall - span}


def steady_rate(trials: list) -> float:
    """Trials per minute while every worker runs trials: from the last worker's first trial to the first worker's
    last, counting the part of each trial inside that window. Spawned workers finish starting up ~0.4 s apart and
    finish their last trials apart; in a sweep of 24 short trials that skew is a tenth of the span, in a long sweep
    nothing. With one worker this is the rate over the whole span."""
    by_worker: dict = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs.get("worker"), []).append(t)
    lo = max(min(t.datetime_start for t in ts) for ts in by_worker.values())
    hi = min(max(t.datetime_complete for t in ts) for ts in by_worker.values())
    window = (hi - lo).total_seconds()
    worth = sum(max(0.0, (min(t.datetime_complete, hi) - max(t.datetime_start, lo)).total_seconds())
                / max((t.datetime_complete - t.datetime_start).total_seconds(), 1e-9) for t in trials)
    return worth / window * 60 if window > 0 else float("nan")


class Timed:
    """A tracker seen from outside: every call to its methods is timed, so the seconds a trial spends in MLflow are
    measured without hooks inside the tracking code."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def tracking_overhead(cfg: Config, splits, backbone: str | None, repeats: int) -> dict:
    """The same trial with MLflow (run, per-epoch metrics, artifacts) and with the null tracker, run in pairs
    (alternating which goes first) so that the machine's drift cancels: the overhead is the median pair's."""
    from fine_tune.track.stores import tracking_uri
    from fine_tune.track.tree import StudyTracker

    null, tracked, pairs, inside = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tracker = StudyTracker("bench-tracking", tracking_uri(tmp))

        def with_mlflow(i: int) -> float:
            start = time.perf_counter()
            study = Timed(tracker)
            run = Timed(study.start_trial(i, {"lr": cfg.lr}))
            result = train(cfg, splits, backbone, tracker=run)
            run.log_result(result)
            run.end("FINISHED", "COMPLETE")
            total = time.perf_counter() - start
            # the same trial, timed from inside: seconds spent in MLflow calls over the rest of the trial
            spent = run.seconds + study.seconds
            inside.append(100 * spent / (total - spent))
            return total

        def without(i: int) -> float:
            start = time.perf_counter()
            train(cfg, splits, backbone)
            return time.perf_counter() - start

        without(-1)  # warm caches (features, allocator) before anything is timed
        for i in range(repeats):
            if i % 2:
                tracked.append(with_mlflow(i))
                null.append(without(i))
            else:
                null.append(without(i))
                tracked.append(with_mlflow(i))
            pairs.append(100 * (tracked[-1] - null[-1]) / null[-1])
        tracker.close()
    return {"null_s": spread(null), "mlflow_s": spread(tracked), "overhead_pct": statistics.median(pairs),
            "overhead_pct_per_pair": spread(pairs), "inside_pct": spread(inside)}


SECTIONS = ("speed", "startup", "load", "peer", "text", "methods")  # (a)-(h), (i), (j), (k), (l), (m)


def run_bench(experiment: str | Path = DEFAULT_EXPERIMENT, quick: bool = False, log: Callable[[str], None] = print,
              out: str | Path = "reports", only: tuple[str, ...] = SECTIONS) -> dict:
    """All figures of the table; `quick` shrinks every size for a smoke test.

    Every store it writes lives in one temporary folder, removed at the end: the user's OPTUNA_STORAGE and
    MLFLOW_TRACKING_URI are set aside meanwhile, so a benchmark never adds studies or runs to real stores.
    """
    saved = {k: os.environ.pop(k) for k in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI") if k in os.environ}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
            cfg, out, scratch = load_config(experiment), Path(out), Path(scratch)
            # a partial run (--only) updates the sections it measured in the last bench.json and keeps the others
            figures = {} if set(only) == set(SECTIONS) or not (out / "bench.json").is_file() else \
                json.loads((out / "bench.json").read_text())
            if "speed" in only:
                figures |= speed_figures(cfg, quick, log, scratch)
            if "startup" in only:
                from benchmarks.startup import startup_figures

                figures["i_startup"] = startup_figures(Path(experiment), quick)
                log(f"(i) time to first trial {figures['i_startup']['to_first_trial_s']:.2f} s")
            if "load" in only:
                from benchmarks.load import load_figures

                figures["j_load"] = load_figures(Path(experiment), scratch, quick)
                log(f"(j) loaded / idle, SimpleNet trial: {figures['j_load']['simplenet']['old_loaded_over_idle']:.1f}x "
                    f"old policy, {figures['j_load']['simplenet']['new_loaded_over_idle']:.1f}x new")
            if "peer" in only:
                from benchmarks.peer import peer_figures

                figures["k_peer"] = peer_figures(cfg, scratch / "peer", quick)
                if "speedup_per_trial" in figures["k_peer"]:
                    log(f"(k) ours vs the documented Optuna + MLflow sweep: "
                        f"{figures['k_peer']['speedup_per_trial']:.1f}x faster per trial")
            if "text" in only:
                from benchmarks.text_peer import text_figures

                figures["l_text"] = text_figures(scratch / "text", quick)
                if "speedup_per_trial" in figures["l_text"]:
                    log(f"(l) ours vs Trainer.hyperparameter_search on the text study: "
                        f"{figures['l_text']['speedup_per_trial']:.1f}x faster per trial")
            if "methods" in only:
                from benchmarks.methods import method_figures

                figures["m_methods"] = method_figures(scratch / "methods", quick)
                log(f"(m) LoRA vs full fine-tune: {figures['m_methods']['lora_epoch_ratio']:.2f}x the time per epoch, "
                    f"{figures['m_methods']['lora_memory_ratio']:.2f}x the peak memory")
            write(figures, out)
            return figures
    finally:
        for k in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI"):  # as they were, whatever a peer's callback set
            os.environ.pop(k, None)
        os.environ.update(saved)


def speed_figures(experiment: Config, quick: bool, log: Callable[[str], None], scratch: Path) -> dict:
    """(a)-(h): epochs and sweeps in this process."""
    device = pick_device("auto")
    repeats = 2 if quick else 5
    # (a)-(d): the tutorial's model on all ten classes
    full = Config(study="bench", classes=list(range(10)), val_per_class=600,
                  budget_per_class=200 if quick else None, runs_dir=str(scratch / "full"))
    splits = splits_for(full)
    log(f"device: {device}; {len(splits.train)} training images; {repeats} repeats per figure")
    tut = [tutorial_epoch(full, splits.train.index, device) for _ in range(repeats)]
    a = statistics.median(tut)
    log(f"(a) tutorial loop: {a:.2f} s/epoch")
    figures: dict = {"device": str(device), "train_images": len(splits.train), "repeats": repeats,
                     "a_tutorial_s_per_epoch": spread(tut)}

    ours64, _ = ours_epochs(full.model_copy(update={"batch_size": 64}), splits, None, repeats)
    figures["b_ours_b64"] = {"s_per_epoch": spread(ours64), "speedup_vs_a": a / statistics.median(ours64)}

    # freezing needs a backbone checkpoint; speed does not depend on its weights, so an untrained one stands in
    pre = build_model("simplenet", 10)
    backbone = str(checkpoints.save(pre.state_dict(), Path(full.runs_dir) / "backbone.pt"))
    for k in (1, 2):
        for cached in (False, True):
            c = full.model_copy(update={"frozen_layers": k, "cache_features": cached, "batch_size": 64,
                                        "runs_dir": str(scratch / f"frozen{k}-{cached}")})
            epochs, whole = ours_epochs(c, splits, backbone, repeats)
            figures[f"c_frozen{k}_{'cached' if cached else 'uncached'}"] = {
                "s_per_epoch": spread(epochs), "speedup_vs_a": a / statistics.median(epochs), "whole_call_s": whole}

    ours256, _ = ours_epochs(full.model_copy(update={"batch_size": 256}), splits, None, repeats)
    flops = fwd_bwd_flops(pre) * len(splits.train)
    rate = matmul_rate(device)
    floor = flops / rate
    figures["d_ours_b256"] = {"s_per_epoch": spread(ours256), "flops_per_epoch": flops, "matmul_flops_per_s": rate,
                              "floor_s": floor, "ratio_to_floor": statistics.median(ours256) / floor}
    log(f"(b)-(d) done: ours b64 {statistics.median(ours64):.3f} s/epoch, b256 {statistics.median(ours256):.3f}, "
        f"floor {floor:.3f} s")

    # (e)-(g): sweeps of the transfer experiment, the study `make sweep` runs
    transfer = experiment.model_copy(update={"runs_dir": str(scratch / "transfer")})
    tsplits = splits_for(transfer)
    from fine_tune.learn.pretrain import backbone_for

    tbackbone = backbone_for(transfer, log=lambda s: None)
    trial_cfg = transfer.model_copy(update={"lr": 2.6e-3, "frozen_layers": 0, "head_size": 64})
    figures["e_tracking_typical_trial"] = tracking_overhead(trial_cfg, tsplits, tbackbone, 2 if quick else 15)
    figures["e_tracking_full_trial"] = tracking_overhead(full.model_copy(update={"epochs": 2 if quick else 10}),
                                                         splits, None, 2 if quick else 3)
    log(f"(e) tracking overhead: typical trial {figures['e_tracking_typical_trial']['overhead_pct']:.1f}%, "
        f"full-data trial {figures['e_tracking_full_trial']['overhead_pct']:.1f}%")

    n_trials = 4 if quick else 24  # --quick: two trials per worker, enough to run every figure once
    one, two = [], []  # each round's sweep figures
    for r in range(1 if quick else 3):
        same = sampled_params(transfer, n_trials, seed=r)  # every sweep of this round runs exactly these trials
        one.append(sweep_figures(transfer, tbackbone, 1, n_trials, "none", seed=r, trials=same))
        two.append(sweep_figures(transfer, tbackbone, 2, n_trials, "none", seed=r, trials=same))

    def col(rounds: list[dict], key: str) -> list[float]:
        return [x[key] for x in rounds]

    def ratios(key: str) -> list[float]:  # 2 workers over 1, round by round
        return [x / y for x, y in zip(col(two, key), col(one, key))]
    figures["f_workers"] = {"one_worker_trials_per_min": spread(col(one, "trials_per_min")),
                            "two_workers_trials_per_min": spread(col(two, "trials_per_min")),
                            "speedup_per_pair": spread(ratios("trials_per_min")),
                            "speedup": spread(ratios("trials_per_min"))["median"],
                            "outside_trials_s_one_worker": spread(col(one, "outside_trials_s")),
                            "outside_trials_s_two_workers": spread(col(two, "outside_trials_s")),
                            "steady_one_worker_trials_per_min": spread(col(one, "steady_trials_per_min")),
                            "steady_two_workers_trials_per_min": spread(col(two, "steady_trials_per_min")),
                            "steady_speedup_per_pair": spread(ratios("steady_trials_per_min")),
                            "steady_speedup": spread(ratios("steady_trials_per_min"))["median"]}
    figures["f_trials"] = n_trials
    log(f"(f) 2 workers vs 1: {figures['f_workers']['speedup']:.2f}x first trial to last, "
        f"{figures['f_workers']['steady_speedup']:.2f}x while both run trials")

    pruned, unpruned = [], []
    for r in range(1 if quick else 2):
        pruned.append(sweep_figures(transfer, tbackbone, 1, n_trials, "median", seed=r))
        unpruned.append(sweep_figures(transfer, tbackbone, 1, n_trials, "none", seed=r))
    ep_p, ep_u = statistics.median(p["epochs"] for p in pruned), statistics.median(p["epochs"] for p in unpruned)
    figures["g_pruning"] = {"epochs_with_pruner": spread([p["epochs"] for p in pruned]),
                            "epochs_without": spread([p["epochs"] for p in unpruned]),
                            "epochs_saved_pct": 100 * (1 - ep_p / ep_u),
                            "best_with_pruner": spread([p["best"] for p in pruned]),
                            "best_without": spread([p["best"] for p in unpruned]),
                            "best_f1_gap_points": 100 * (statistics.median(p["best"] for p in unpruned)
                                                         - statistics.median(p["best"] for p in pruned))}
    figures["h_torchvision"] = torchvision_figures(scratch / "torchvision", quick, repeats)
    log(f"(h) {figures['h_torchvision']['model']}: linear probe "
        f"{figures['h_torchvision']['probe_cached']['images_per_s']:.0f} img/s cached")
    return figures


def fwd_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass per image (2 per multiply-add of every convolution and Linear layer), counted by
    running one image through with hooks."""
    flops = [0]

    def conv(m, inp, out):
        flops[0] += 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear(m, inp, out):
        flops[0] += 2 * out.numel() // out.shape[-1] * m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(torch.zeros(1, 1, image_size, image_size, dtype=torch.uint8))
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return flops[0]


def torchvision_figures(runs_dir: Path, quick: bool, repeats: int, model: str = "resnet18", size: int = 32) -> dict:
    """A torchvision backbone at a small image size on the transfer task's classes: images per second of a training
    epoch for a linear probe (all 5 stages frozen) and a partial fine-tune (3 frozen), each without and with the
    frozen-feature cache, and a full fine-tune against its FLOP floor."""

    cfg = Config(study="bench-torchvision", model=model, image_size=size, classes=[5, 6, 7, 8, 9],
                 budget_per_class=40 if quick else 200, val_per_class=20 if quick else 100, test_per_class=20,
                 batch_size=64, runs_dir=str(runs_dir))
    splits = splits_for(cfg)
    # speed does not depend on the weights: an untrained backbone stands in for a downloaded one
    net = build_model(model, 5, image_size=size)
    backbone = str(checkpoints.save({k: v for k, v in net.state_dict().items() if k.startswith("backbone.")},
                                    runs_dir / "backbone.pt"))
    n = len(splits.train)
    out: dict = {"model": model, "image_size": size, "train_images": n}
    for key, frozen, cached in (("probe_uncached", 5, False), ("probe_cached", 5, True),
                                ("partial_uncached", 3, False), ("partial_cached", 3, True), ("full", 0, False)):
        c = cfg.model_copy(update={"frozen_layers": frozen, "cache_features": cached,
                                   "runs_dir": str(runs_dir / key)})
        epochs, whole = ours_epochs(c, splits, backbone, repeats)
        out[key] = {"s_per_epoch": spread(epochs), "images_per_s": n / statistics.median(epochs), "whole_call_s": whole}
    flops = 3 * fwd_flops(net, size) * n  # forward + backward of every image, once
    rate = matmul_rate(pick_device("auto"))
    out["full"] |= {"flops_per_epoch": flops, "floor_s": flops / rate,
                    "ratio_to_floor": out["full"]["s_per_epoch"]["median"] / (flops / rate)}
    return out


def s(d: dict) -> str:
    return f"{d['median']:.3f} s ({d['min']:.3f}-{d['max']:.3f})"


def table(f: dict) -> str:
    """The figures as a Markdown table, targets beside them (the sections that were measured)."""
    rows = (speed_rows(f) if "a_tutorial_s_per_epoch" in f else []) + (startup_rows(f["i_startup"]) if "i_startup"
                                                                       in f else [])
    rows += (load_rows(f["j_load"]) if "j_load" in f else []) + (peer_rows(f["k_peer"]) if "k_peer" in f else [])
    if "l_text" in f:
        from benchmarks.text_peer import text_rows

        rows += text_rows(f["l_text"])
    if "m_methods" in f:
        from benchmarks.methods import method_rows

        rows += method_rows(f["m_methods"])
    head = "| figure | measured (median, spread) | ratio | target |\n|---|---|---|---|\n"
    return head + "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)


def speed_rows(f: dict) -> list[tuple[str, str, str, str]]:
    rows = [("(a) tutorial loop, DataLoader + ToTensor, batch 64", s(f["a_tutorial_s_per_epoch"]), "1.0x", "")]
    rows.append(("(b) ours, in-memory batches, batch 64", s(f["b_ours_b64"]["s_per_epoch"]),
                 f"{f['b_ours_b64']['speedup_vs_a']:.1f}x faster", ">= 5x"))
    for k in (1, 2):
        for mode in ("uncached", "cached"):
            d = f[f"c_frozen{k}_{mode}"]
            rows.append((f"(c) ours, {k} frozen layer{'s' if k > 1 else ''}, {mode}", s(d["s_per_epoch"]),
                         f"{d['speedup_vs_a']:.1f}x faster", ">= 10x" if (k, mode) == (2, "cached") else ""))
    d = f["d_ours_b256"]
    rows.append(("(d) ours, batch 256, vs FLOP floor", s(d["s_per_epoch"]),
                 f"{d['ratio_to_floor']:.1f}x the floor ({d['floor_s']:.3f} s at "
                 f"{d['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)", "<= 3x"))
    for key, label in (("e_tracking_typical_trial", "typical sweep trial"), ("e_tracking_full_trial", "full-data trial")):
        d = f[key]
        p = d["overhead_pct_per_pair"]
        rows.append((f"(e) MLflow vs null tracker, {label}", f"{s(d['null_s'])} vs {s(d['mlflow_s'])}",
                     f"{d['overhead_pct']:+.1f}% (median of {p['n']} pairs, {p['min']:+.1f} to {p['max']:+.1f}; "
                     f"timed inside the trial: {d['inside_pct']['median']:.1f}%)", "<= 3%"))
    d = f["f_workers"]
    rows.append(("(f) sweep throughput, 2 workers vs 1", f"{d['two_workers_trials_per_min']['median']:.1f} vs "
                 f"{d['one_worker_trials_per_min']['median']:.1f} trials/min, the same {f['f_trials']} trials "
                 f"(outside the trials: {d['outside_trials_s_two_workers']['median']:.1f} vs "
                 f"{d['outside_trials_s_one_worker']['median']:.1f} s of start-up)",
                 f"{d['speedup']:.2f}x ({d['speedup_per_pair']['min']:.2f}-{d['speedup_per_pair']['max']:.2f})",
                 ">= 1.8x"))
    rows.append(("(f) the same sweeps, while both workers run trials (no start-up skew, no last-trial tail)",
                 f"{d['steady_two_workers_trials_per_min']['median']:.1f} vs "
                 f"{d['steady_one_worker_trials_per_min']['median']:.1f} trials/min",
                 f"{d['steady_speedup']:.2f}x ({d['steady_speedup_per_pair']['min']:.2f}-"
                 f"{d['steady_speedup_per_pair']['max']:.2f})", ">= 1.8x"))
    d = f["g_pruning"]
    rows.append(("(g) median pruner vs none, same seed and trial count",
                 f"{d['epochs_with_pruner']['median']:.0f} vs {d['epochs_without']['median']:.0f} epochs; best val F1 "
                 f"{d['best_with_pruner']['median']:.4f} vs {d['best_without']['median']:.4f}",
                 f"{d['epochs_saved_pct']:.0f}% fewer epochs, best val F1 {d['best_f1_gap_points']:.2f} pt lower",
                 ">= 40% fewer, within 1 pt"))
    d = f["h_torchvision"]
    what = f"{d['model']} at {d['image_size']} px, {d['train_images']} images"
    for kind, label in (("probe", "linear probe (5 stages frozen)"), ("partial", "partial fine-tune (3 stages frozen)")):
        u, c = d[f"{kind}_uncached"], d[f"{kind}_cached"]
        rows.append((f"(h) {what}: {label}, uncached vs cached",
                     f"{u['images_per_s']:.0f} vs {c['images_per_s']:.0f} images/s ({s(u['s_per_epoch'])} vs "
                     f"{s(c['s_per_epoch'])} per epoch)", f"{c['images_per_s'] / u['images_per_s']:.1f}x faster", ""))
    full = d["full"]
    rows.append((f"(h) {what}: full fine-tune vs FLOP floor", f"{full['images_per_s']:.0f} images/s "
                 f"({s(full['s_per_epoch'])} per epoch)", f"{full['ratio_to_floor']:.1f}x the floor "
                 f"({full['floor_s']:.3f} s)", ""))
    return rows


def startup_rows(d: dict) -> list[tuple[str, str, str, str]]:
    fl, inst, prof = d["floor_s"], d["instant_s"], d["import_profile_s"]
    floor = fl["torch"] + fl["mlflow"] - fl["python"]  # one interpreter start, torch and MLflow as a sweep needs them
    lo, hi = d["to_first_trial_range"]
    top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(prof.items(), key=lambda kv: -kv[1])
                    if k not in ("total", "other"))
    return [
        ("(i) time to first trial: `sweep --n-trials 1`, warm runs dir, launch to the trial's start",
         f"{d['to_first_trial_s']:.2f} s ({lo:.2f}-{hi:.2f}); first epoch logged at {d['to_first_epoch_s']:.2f} s; "
         f"whole command {d['sweep_wall_s']:.2f} s", f"{d['to_first_trial_s'] / floor:.2f}x the floor ({floor:.2f} s: "
         f"python {fl['python']:.2f} + torch with its first optimizer {fl['torch'] - fl['python']:.2f} + MLflow with "
         f"its SQL store {fl['mlflow'] - fl['python']:.2f})", "<= 2 s"),
        ("(i) import seconds of that sweep process, by package (`python -X importtime`)",
         f"{prof['total']:.2f} s: {top}, other {prof['other']:.2f}", "", ""),
        ("(i) `keys`, `--help`, a malformed config", f"{inst['keys']:.2f} / {inst['help']:.2f} / "
         f"{inst['bad_config']:.2f} s (python alone {fl['python']:.2f} s)", "", "< 1 s")]


def load_rows(d: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, label in (("simplenet", "SimpleNet, 500 labels/class, 5 epochs, all layers trained"),
                        ("resnet18", "ResNet-18 at 32 px, full fine-tune, 1 epoch")):
        if name not in d:
            continue
        m = d[name]["s"]
        rows.append((f"(j) {label}: idle vs next to 2 CPU-bound processes, old thread policy vs new",
                     f"old {m['old_idle']:.2f} -> {m['old_loaded']:.2f} s; new {m['new_idle']:.2f} -> "
                     f"{m['new_loaded']:.2f} s", f"loaded/idle: old {d[name]['old_loaded_over_idle']:.1f}x, new "
                     f"{d[name]['new_loaded_over_idle']:.1f}x (new loaded / old idle "
                     f"{d[name]['new_loaded_over_old_idle']:.1f}x; new idle / old idle "
                     f"{d[name]['new_idle_over_old_idle']:.2f}x)", "<= 2.5x"))
    return rows


def peer_rows(d: dict) -> list[tuple[str, str, str, str]]:
    if "skipped" in d:
        return [("(k) the documented Optuna + MLflow sweep", d["skipped"], "", "")]
    p, o, ph, oh = d["peer"], d["ours"], d["peer_holds"], d["ours_holds"]

    def holds(h: dict) -> str:
        return (f"{h['trial_runs']} trial runs{' nested under a parent' if h['nested'] else ''}, "
                f"{h['params_per_trial']} params, {h['curves_per_trial']} per-epoch curves, "
                f"{h['artifacts_per_trial']} artifacts per trial, {h['datasets']} with datasets; pruned: "
                f"{h['pruned_shown_as']}")
    return [(f"(k) the sweep a user writes from Optuna's and MLflow's docs (DataLoader loop + optuna-integration "
             f"MLflowCallback) vs `fine_tune sweep`, {d['trials']} TPE + median-pruner trials, {d['train_images']} "
             f"images, {d['epochs']} epochs",
             f"{p['s_per_trial']:.2f} vs {o['s_per_trial']:.2f} s per trial ({p['s_per_epoch']:.3f} vs "
             f"{o['s_per_epoch']:.3f} s per epoch trained; {p['pruned']} vs {o['pruned']} pruned)",
             f"ours {d['speedup_per_trial']:.1f}x faster per trial, {d['speedup_per_epoch']:.1f}x per epoch", ">= 5x"),
            ("(k) what each MLflow tree holds", f"peer: {holds(ph)}<br>ours: {holds(oh)}", "", "")]


def write(figures: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    checkpoints.save_json(figures, out / "bench.json")
    where = (f" on {figures['device']}, {figures['train_images']} training images, {figures['repeats']} repeats per "
             "figure" if "device" in figures else "")
    md = f"# Benchmark\n\n`make bench` (python -m benchmarks.bench){where}.\n\n{table(figures)}\n"
    (out / "bench.md").write_text(md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", type=Path, default=DEFAULT_EXPERIMENT,
                        help="experiment YAML whose study the sweep figures run (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmark itself")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where bench.md and bench.json go")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to measure, of {', '.join(SECTIONS)} (default: all); the "
                             "others are kept from the last bench.json")
    args = parser.parse_args(argv)
    from fine_tune.errors import ConfigError

    try:
        only = tuple(x.strip() for x in args.only.split(",") if x.strip())
        if set(only) - set(SECTIONS):
            parser.error(f"--only takes {', '.join(SECTIONS)}")
        figures = run_bench(args.experiment, quick=args.quick, out=args.out, only=only)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n" + table(figures) + f"\n\nwritten: {args.out}/bench.md, {args.out}/bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
