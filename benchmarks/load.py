"""Rows (j) of `make bench`: the same trial on an idle machine and next to two CPU-bound processes, under torch's
default thread policy (one spinning OpenMP thread per core: FINE_TUNE_THREADS=<cores>) and under ours
(fine_tune/learn/threads.py). Each trial is a fresh `python -m fine_tune train --no-track` process, as a user runs it, and
the figure is the run's own `time/train_s`; old and new alternate within each repeat so the machine's drift cancels.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fine_tune.learn.threads import cores

# The transfer study's SimpleNet with 500 labels per class, every layer trained (with frozen layers cached the trial
# takes hundredths of a second, too short to time), and a torchvision backbone.
TRIALS = {
    "simplenet": ["--set", "budget_per_class=500", "--set", "val_per_class=200", "--set", "epochs=5", "--set",
                  "frozen_layers=0"],
    "resnet18": ["--set", "model=resnet18", "--set", "image_size=32", "--set", "frozen_layers=0", "--set",
                 "budget_per_class=200", "--set", "val_per_class=50", "--set", "test_per_class=50", "--set", "epochs=1",
                 "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=256"],
}


def trial_seconds(experiment: Path, runs_dir: Path, extra: list[str], policy: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "FINE_TUNE_THREADS")}
    if policy == "old":
        env["FINE_TUNE_THREADS"] = str(cores())
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        p = subprocess.run([sys.executable, "-m", "fine_tune", "train", "--config", str(experiment), "--no-track",
                            "--set", f"runs_dir={runs_dir}", *extra, "--json", out.name],
                           capture_output=True, text=True, env=env)
        if p.returncode:
            raise RuntimeError(f"train failed: {p.stderr[-500:]}")
        return json.loads(Path(out.name).read_text())["time/train_s"]


def load_figures(experiment: Path, scratch: Path, quick: bool) -> dict:
    repeats = 1 if quick else 3
    out: dict = {"cores": cores(), "repeats": repeats}
    for name, extra in list(TRIALS.items())[:1 if quick else None]:  # --quick: the SimpleNet trial only
        if quick:
            extra = [*extra, "--set", "epochs=1"]
        runs_dir = scratch / f"load-{name}"
        trial_seconds(experiment, runs_dir, extra, "new")  # pretrains the backbone once, outside the timing
        times: dict = {f"{policy}_{cond}": [] for policy in ("old", "new") for cond in ("idle", "loaded")}
        for cond in ("idle", "loaded"):
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)] \
                if cond == "loaded" else []
            try:
                for r in range(repeats):
                    for policy in (("old", "new") if r % 2 == 0 else ("new", "old")):
                        times[f"{policy}_{cond}"].append(trial_seconds(experiment, runs_dir, extra, policy))
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {"s": med, "all": times,
                     "old_loaded_over_idle": med["old_loaded"] / med["old_idle"],
                     "new_loaded_over_idle": med["new_loaded"] / med["new_idle"],
                     "new_loaded_over_old_idle": med["new_loaded"] / med["old_idle"],
                     "new_idle_over_old_idle": med["new_idle"] / med["old_idle"]}
    return out
