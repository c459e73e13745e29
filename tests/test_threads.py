"""The thread policy: one thread for our small models, the process's share of the cores for torchvision's, a passive
OpenMP wait when other processes already keep a core busy, and the user's overrides. Speed itself is measured by
`make bench` (j), not asserted here."""
import json
import os
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from fine_tune.errors import ConfigError
from fine_tune.learn import threads


@pytest.fixture(autouse=True)
def no_user_settings(monkeypatch):
    for name in ("FINE_TUNE_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)


def test_small_models_train_on_one_thread_and_backbones_on_their_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 8)
    assert threads.count("simplenet") == threads.count("cnn", workers=4) == 1
    assert threads.count("resnet18", workers=1) == 8
    assert threads.count("resnet18", workers=3) == 2
    assert threads.count("vit_b_16", workers=16) == 1


def test_a_spawned_workers_share_sets_its_backbone_threads(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 8)
    monkeypatch.setattr(threads, "_workers", 1)
    threads.share(4)
    assert threads.count("resnet50") == 2


def test_the_config_key_then_fine_tune_threads_then_omp_num_threads_override_the_policy(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.count("simplenet") == 3 and threads.count("resnet18") == 3
    monkeypatch.setenv("FINE_TUNE_THREADS", "5")
    assert threads.count("simplenet") == 5
    assert threads.count("simplenet", setting=2) == 2
    monkeypatch.setenv("FINE_TUNE_THREADS", "auto")
    assert threads.count("simplenet") == 3
    monkeypatch.setenv("FINE_TUNE_THREADS", "lots")
    with pytest.raises(ConfigError, match="FINE_TUNE_THREADS='lots'"):
        threads.count("simplenet")


def test_threads_wait_passively_only_when_several_run_next_to_other_work(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 2)
    assert threads.wait_policy(["resnet18"], busy=1.6) == "PASSIVE"
    assert threads.wait_policy(["resnet18"], busy=0.2) is None  # an idle machine keeps OpenMP's fast spinning
    assert threads.wait_policy(["simplenet", "cnn"], busy=2.0) is None  # one thread has no one to wait for
    assert threads.wait_policy(["simplenet", "resnet18"], busy=2.0) == "PASSIVE"  # a search over both
    assert threads.wait_policy(["resnet18"], workers=2, busy=2.0) is None  # one thread each
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.wait_policy(["resnet18"], busy=2.0) is None  # the user's choice stands
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert threads.wait_policy(["resnet18"], setting=2, busy=2.0) is None  # a fixed count leaves OpenMP alone


def test_busy_elsewhere_sees_a_cpu_bound_process():
    """Measured, not assumed: a process spinning on a core shows up as about one busy core (waits on the spinner's
    own CPU time, not on a fixed sleep)."""
    before = threads.snapshot()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with open(f"/proc/{hog.pid}/stat") as f:
                utime = int(f.read().rsplit(")", 1)[1].split()[11]) / os.sysconf("SC_CLK_TCK")
            if utime >= 0.5:
                break
            time.sleep(0.05)
        assert threads.busy_elsewhere(before) > 0.3
    finally:
        hog.kill()
        hog.wait()


def test_a_trial_reports_the_threads_it_trained_with(tmp_path):
    """Through the CLI, as a user runs it, next to a CPU-bound process per core: SimpleNet trains on one thread
    whatever torch's default and the load, unless told otherwise."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINE_TUNE_DATA": str(ROOT / "data")}
    env.pop("OMP_NUM_THREADS", None)
    args = [sys.executable, "-m", "fine_tune", "train", "--no-track", "--set", "epochs=1", "--set", "classes=[5,6]",
            "--set", "budget_per_class=20", "--set", "val_per_class=20", "--set", "test_per_class=20",
            "--set", f"runs_dir={tmp_path}"]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(threads.cores())]
    try:
        for extra, want in (([], 1), (["--set", "threads=2"], 2)):
            p = subprocess.run([*args, *extra, "--json", str(tmp_path / "m.json")], capture_output=True, text=True,
                               env=env, cwd=tmp_path)
            assert p.returncode == 0, p.stderr
            assert json.loads((tmp_path / "m.json").read_text())["threads"] == want
    finally:
        for h in hogs:
            h.kill()
            h.wait()
