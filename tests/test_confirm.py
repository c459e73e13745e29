"""`make confirm`: re-runs of the top trials with new seeds, closed whatever stops them, logged like trials."""
import os
import shutil
import socket
import subprocess
import sys

import pandas as pd
import pytest
from helpers import runs_of, tiny_sweep

from fine_tune.study.confirm import confirm
from fine_tune.study.sweep import run_sweep
from fine_tune.track.interrupts import interrupt, rearm, shielded
from fine_tune.track.stores import tracking_uri
from fine_tune.track.tracking import RunTracker
from fine_tune.track.tree import StudyTracker


def test_reruns_log_the_params_their_trial_logged(tmp_path, tiny_backbone):
    """A re-run is the trial again with another seed: the same params (hyperparameters and context), seed aside."""
    cfg = tiny_sweep(tmp_path / "runs", tiny_backbone[0], "rep-params", 2)
    run_sweep(cfg, progress=False, log=lambda s: None)
    assert confirm(cfg, top_k=1, seeds=1, log=lambda s: None) == 1
    runs = runs_of(cfg.runs_dir, cfg.study)
    rerun = runs[runs["tags.fine_tune.role"] == "rerun"].iloc[0]
    trial = runs[(runs["tags.fine_tune.role"] == "trial")
                 & (runs["tags.optuna.trial_number"] == rerun["tags.fine_tune.rerun_of"])].iloc[0]
    params = [c for c in runs.columns if c.startswith("params.") and (pd.notna(trial[c]) or pd.notna(rerun[c]))]
    assert {c for c in params if pd.notna(trial[c])} == {c for c in params if pd.notna(rerun[c])}
    assert {c for c in params if trial[c] != rerun[c]} == {"params.seed"}
    assert {"params.batch_size", "params.epochs", "params.patience", "params.weight_decay"} <= set(params)


def test_a_rerun_whose_artifacts_cannot_be_written_ends_failed_not_running(tmp_path, tiny_backbone):
    """`make confirm` when the artifact store refuses the re-run's files (here its folder became a file after a first
    confirm): the new re-run is closed FAILED with the reason, the error reaches the user, the confirm's run too."""
    runs = tmp_path / "runs"
    cfg = tiny_sweep(runs, tiny_backbone[0], "rep-broken", 2)
    run_sweep(cfg, progress=False, log=lambda s: None)
    assert confirm(cfg, top_k=1, seeds=1, log=lambda s: None) == 1
    shutil.rmtree(runs / "mlartifacts")
    (runs / "mlartifacts").write_text("not a folder")
    with pytest.raises(OSError):
        confirm(cfg, top_k=1, seeds=2, log=lambda s: None)
    found = runs_of(runs, "rep-broken")
    reruns = found[found["tags.fine_tune.role"] == "rerun"]
    assert list(reruns.status) == ["FAILED", "FINISHED"] and reruns["tags.fine_tune.reason"].iloc[0]
    assert "RUNNING" not in set(found.status)


@pytest.mark.parametrize("cls, method, status, expected", [
    (StudyTracker, "start_run", None, "KILLED"),  # while the re-run is created: closed KILLED
    (RunTracker, "end", "FINISHED", "FINISHED"),  # while it is closed FINISHED: it stays so (else it is trained again)
])
def test_a_ctrl_c_inside_a_rerun_write_never_leaves_it_running(cls, method, status, expected, tmp_path, tiny_backbone,
                                                               monkeypatch):
    """The Ctrl-C lands inside a store write of `make confirm` (the signal handler defers it to the end of that
    write, as `interrupt` does here): the re-run ends `expected`, never RUNNING, and the interrupt reaches the user."""
    runs = tmp_path / "runs"
    cfg = tiny_sweep(runs, tiny_backbone[0], "rep-ctrl-c", 2)
    run_sweep(cfg, progress=False, log=lambda s: None)
    write = getattr(cls, method)

    def write_then_ctrl_c(self, *args, **kwargs):
        with shielded():
            out = write(self, *args, **kwargs)
            if status is None or args[0] == status:
                interrupt(KeyboardInterrupt())  # what the signal handler does mid-write
        return out
    monkeypatch.setattr(cls, method, write_then_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            confirm(cfg, top_k=1, seeds=1, log=lambda s: None)
    finally:
        rearm()
    found = runs_of(runs, "rep-ctrl-c")
    assert list(found[found["tags.fine_tune.role"] == "rerun"].status) == [expected]
    assert "RUNNING" not in set(found.status)


def test_confirm_closes_the_reruns_a_killed_confirm_left_running(tmp_path, tiny_backbone):
    """What a `make confirm` killed with SIGKILL leaves: a RUNNING re-run tagged with its host:pid, the pid gone. The
    next confirm closes it FAILED (and re-trains that seed); a re-run of a live process, or of another machine, is
    left alone."""
    runs = tmp_path / "runs"
    cfg = tiny_sweep(runs, tiny_backbone[0], "rep-orphans", 2)
    run_sweep(cfg, progress=False, log=lambda s: None)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    tracker = StudyTracker(cfg.study, tracking_uri(cfg.runs_dir))
    host = socket.gethostname()
    for name, owner in (("killed", f"{host}:{gone.pid}"), ("alive", f"{host}:{os.getpid()}"),
                        ("elsewhere", f"another-host:{gone.pid}")):
        tracker.start_run(name, {"fine_tune.role": "rerun", "fine_tune.rerun_of": "0", "fine_tune.seed": "1",
                                 "fine_tune.worker": owner}, {})
    assert confirm(cfg, top_k=1, seeds=1, log=lambda s: None) == 1
    found = runs_of(runs, "rep-orphans").set_index("tags.mlflow.runName")
    assert found.loc["killed", "status"] == "FAILED" and "ended without closing" in found.loc["killed",
                                                                                             "tags.fine_tune.reason"]
    assert found.loc["alive", "status"] == "RUNNING" and found.loc["elsewhere", "status"] == "RUNNING"


def test_vary_backbone_pretrains_again_per_seed(tmp_path):
    """`confirm --vary backbone`: each re-run's backbone is pretrained with its own seed (a new checkpoint), and the
    re-runs say so; the plain confirm keeps the trial's backbone."""
    cfg = tiny_sweep(tmp_path / "runs", None, "rep-vary", 2, pretrain={"classes": [0, 1, 2, 3, 4], "epochs": 1},
                     budget_per_class=10, val_per_class=10)
    run_sweep(cfg, progress=False, log=lambda s: None)
    assert confirm(cfg, top_k=1, seeds=1, log=lambda s: None, vary="backbone") == 1
    runs = runs_of(cfg.runs_dir, cfg.study)
    trial = runs[runs["tags.fine_tune.role"] == "trial"]
    rerun = runs[runs["tags.fine_tune.role"] == "rerun"].iloc[0]
    assert rerun["tags.fine_tune.vary"] == "backbone"
    assert rerun["params.pretrained_sha256"] not in set(trial["params.pretrained_sha256"])
    assert len(list((tmp_path / "runs" / "pretrained").glob("*.pt"))) == 2
