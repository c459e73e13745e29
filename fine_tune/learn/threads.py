"""How many threads a process trains with, and how its idle threads wait: a policy that holds up on a busy machine.

PyTorch's default (one OpenMP thread per core, threads that spin while they wait) is right for a large model on an
idle machine and wrong next to other work: when another process holds a core, a spinning thread burns its share
waiting for one that is not running. Measured on 2 cores next to two CPU-bound processes (make bench (j)):

- our own models (SimpleNet, the CNN: ~100k parameters) gain 1.15x (a sweep's short trials) to 2x (a full-data
  epoch) from a second thread when the machine is idle and lose 3-17x with it when it is busy, so they train on one
  thread. Always one, not only when the machine is busy: the thread count changes the floating-point sums, and a
  count that followed the load would give the same config different numbers from one run to the next (`make
  sweep`: 12 complete / best 0.8819 on one thread, 11 / 0.8853 on two). One thread gives the same numbers from run
  to run on one machine and library build, which `make rerun` relies on (another CPU's kernels order the sums
  differently);
- a torchvision backbone gains ~1.9x from a second thread, so it gets its share of the cores (cores / workers); if
  other processes already keep a core busy when the process starts, its threads sleep while they wait
  (OMP_WAIT_POLICY=PASSIVE: ResNet-18 2.2x faster than spinning next to the load, 1.3x slower on an idle machine,
  which is why it is not the default).

Overrides: the config key `threads` (a number, or auto), then the environment variable FINE_TUNE_THREADS, then
OMP_NUM_THREADS; any one fixes the count for every model and leaves the wait policy to OpenMP (OMP_WAIT_POLICY, which
a user may set too). Every run logs the count it trained with (metric `threads`), and `make rerun` uses it again.
The wait policy must be set before torch is imported (OpenMP reads it once): `configure` runs in the CLI right after
the config is read, and the choice passes to spawned workers through the environment.
"""
from __future__ import annotations

import os
import time

from fine_tune.archs import SMALL


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot, or None where /proc/stat does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def snapshot() -> tuple[float, float, tuple[int, int] | None]:
    return time.monotonic(), time.process_time(), _busy_jiffies()


# The machine when this module was imported (the CLI imports it first thing): the interval until `configure` tells
# how busy other processes keep the cores, at no extra wait.
_START = snapshot()


def busy_elsewhere(since: tuple | None = None) -> float:
    """Cores kept busy by other processes since `since` (default: this module's import); the 1-minute load average
    where that interval is too short to tell or /proc/stat is missing."""
    wall0, cpu0, stat0 = since or _START
    now, wall = _busy_jiffies(), time.monotonic() - wall0
    if now is None or stat0 is None or wall < 0.05 or now[1] == stat0[1]:
        return max(0.0, os.getloadavg()[0] - 1)  # minus this process, which is running
    busy_cores = (now[0] - stat0[0]) / (now[1] - stat0[1]) * cores()
    own = (time.process_time() - cpu0) / wall
    return max(0.0, busy_cores - own)


def override(setting: int | None = None) -> int | None:
    """The thread count the user fixed: the config's `threads`, else FINE_TUNE_THREADS, else OMP_NUM_THREADS;
    None for the policy."""
    if setting is not None:
        return setting
    for name in ("FINE_TUNE_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip().lower()
        if value in ("", "auto"):
            continue
        if not value.isdigit() or int(value) < 1:
            from fine_tune.errors import ConfigError

            raise ConfigError(f"{name}={value!r}: give a whole number of threads (1 or more)"
                              + (" or auto" if name == "FINE_TUNE_THREADS" else ""))
        return int(value)
    return None


# How many training processes share this machine's cores: set by a sweep's spawned workers (`share`).
_workers = 1


def share(workers: int) -> None:
    """Record that this process is one of `workers` training processes on this machine."""
    global _workers
    _workers = max(1, workers)


def count(model: str, workers: int | None = None, setting: int | None = None) -> int:
    """Threads for training `model` in one of `workers` processes (default: this process's share) on this machine."""
    fixed = override(setting)
    if fixed is not None:
        return fixed
    return 1 if model in SMALL else max(1, cores() // (workers or _workers))


def wait_policy(models: list[str], workers: int = 1, setting: int | None = None,
                busy: float | None = None) -> str | None:
    """OMP_WAIT_POLICY for a process that will train `models`: PASSIVE when it will run more than one thread and
    other processes keep at least one core busy; None to leave OpenMP's default (or the user's choice)."""
    if "OMP_WAIT_POLICY" in os.environ or override(setting) is not None:
        return None
    # our small models drop to one thread on a busy machine, so only a torchvision model's threads would wait
    large = [m for m in models if m not in SMALL]
    if not large or max(count(m, workers, setting) for m in large) < 2:
        return None
    return "PASSIVE" if (busy_elsewhere() if busy is None else busy) >= 1.0 else None


def configure(cfg, workers: int = 1) -> None:
    """Before torch is imported: choose the wait policy for this process and the workers it spawns."""
    policy = wait_policy(cfg.trial_models(), workers, cfg.threads)
    if policy:
        os.environ["OMP_WAIT_POLICY"] = policy


def apply(cfg) -> int:
    """Set torch's thread count for a run of `cfg` in this process; returns it."""
    import torch

    n = count(cfg.model, None, cfg.threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
