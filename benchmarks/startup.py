"""Rows (i) of `make bench`: the seconds before anything happens, as a user meets them.

Every figure is a fresh `python -m fine_tune ...` process, as typed at a shell, timed from launch: time to the first
trial of a sweep in a warm runs dir (venv, data, backbone and stores present), the answers that should be instant
(`keys`, `--help`, a malformed config), the floor any such process pays (the interpreter, torch with its optimizer's
first use, MLflow with its SQL store), and where a sweep process's import seconds go, package by package.
"""
from __future__ import annotations

import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _python(args: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.time()
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    return time.time() - start, p


def _sweep_args(experiment: Path, runs_dir: Path, study: str) -> list[str]:
    return ["-m", "fine_tune", "sweep", "--config", str(experiment), "--n-trials", "1", "--set", f"study={study}",
            "--set", f"runs_dir={runs_dir}"]


def first_trial(experiment: Path, runs_dir: Path, study: str) -> dict:
    """One `sweep --n-trials 1` process: seconds from launch to its first trial's start (Optuna's datetime_start),
    to that trial's first epoch (the first metric MLflow holds for it), and to the end of the command."""
    import optuna
    from mlflow import MlflowClient

    from fine_tune.track.stores import optuna_url, tracking_uri

    launched = time.time()
    wall, p = _python(_sweep_args(experiment, runs_dir, study))
    if p.returncode:
        raise RuntimeError(f"sweep failed: {p.stderr[-500:]}")
    trial = optuna.load_study(study_name=study, storage=optuna_url(str(runs_dir), None)).trials[0]
    client = MlflowClient(tracking_uri(str(runs_dir)))
    exp = client.get_experiment_by_name(study)
    run = client.search_runs([exp.experiment_id], "tags.`optuna.trial_number` = '0'")[0]
    first_epoch = min(m.timestamp for m in client.get_metric_history(run.info.run_id, "val/f1_macro")) / 1000
    start = trial.datetime_start.replace(tzinfo=None)
    return {"to_first_trial_s": start.timestamp() - launched, "to_first_epoch_s": first_epoch - launched,
            "trial_s": (trial.datetime_complete - trial.datetime_start).total_seconds(), "wall_s": wall}


def import_profile(experiment: Path, runs_dir: Path, study: str, top: int = 8) -> dict[str, float]:
    """Seconds a `sweep --n-trials 1` process spends importing, per top-level package (each module's own time,
    summed: `python -X importtime`)."""
    _, p = _python(["-X", "importtime", *_sweep_args(experiment, runs_dir, study)])
    per: dict[str, float] = {}
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        if own.isdigit():
            package = name.split(".")[0]
            per[package] = per.get(package, 0.0) + int(own) / 1e6
    ranked = dict(sorted(per.items(), key=lambda kv: -kv[1]))
    rest = sum(list(ranked.values())[top:])
    return {**dict(list(ranked.items())[:top]), "other": rest, "total": sum(ranked.values())}


def startup_figures(experiment: Path, quick: bool) -> dict:
    repeats = 1 if quick else 5  # --quick: each figure once, a smoke test of the measurement
    bad = Path(tempfile.mkdtemp(prefix="bench-bad-")) / "bad.yaml"
    bad.write_text("lr: [1\n")
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        runs = Path(tmp)
        first_trial(experiment, runs, "warm")  # the backbone pretrained and the stores created: a warm runs dir
        runs_ = [first_trial(experiment, runs, f"ttft-{i}") for i in range(repeats)]
        profile = import_profile(experiment, runs, "profile")
        floor = {name: [_python(["-c", code])[0] for _ in range(repeats)] for name, code in (
            ("python", "pass"),
            ("torch", "import torch; torch.optim.Adam([torch.zeros(1, requires_grad=True)])"),
            ("mlflow", f"import mlflow; mlflow.MlflowClient('sqlite:///{runs.resolve()}/mlflow.db').search_experiments()"))}
    instant = {name: [_python(args)[0] for _ in range(repeats)] for name, args in (
        ("keys", ["-m", "fine_tune", "keys"]), ("help", ["-m", "fine_tune", "--help"]),
        ("bad_config", ["-m", "fine_tune", "sweep", "--config", str(bad)]))}

    def med(values: list[float]) -> float:
        return statistics.median(values)
    return {"repeats": repeats, "to_first_trial_s": med([r["to_first_trial_s"] for r in runs_]),
            "to_first_trial_range": [min(r["to_first_trial_s"] for r in runs_), max(r["to_first_trial_s"] for r in runs_)],
            "to_first_epoch_s": med([r["to_first_epoch_s"] for r in runs_]),
            "trial_s": med([r["trial_s"] for r in runs_]), "sweep_wall_s": med([r["wall_s"] for r in runs_]),
            "instant_s": {k: med(v) for k, v in instant.items()}, "floor_s": {k: med(v) for k, v in floor.items()},
            "import_profile_s": profile, "measured_at": dt.datetime.now().isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count()}
