"""What a run cost the machine: MLflow's system metrics of CPU and memory use (and each GPU's use, memory and power
when nvidia-ml-py is installed and finds one), logged under `system/` while the run lives: the run page's "System
metrics" tab draws them. MLflow starts its monitor only for `mlflow.start_run`; our runs are made through the client
with explicit ids, so `RunTracker.watch` registers each run here.

One sampler thread per process serves every run it watches (a trial and the sweep's parent at once): a thread per
run cost a trial of a second ~7 ms to start on a loaded machine. It samples every second; each run logs the mean of
its samples at its own interval: 1 s at first (a trial shorter than that still gets one sample, taken when it ends),
doubling after every 60 logged samples up to a minute, so an hours-long sweep's parent holds ~60 points an hour.
`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` sets the first interval; `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`
turns it off.
"""
from __future__ import annotations

import logging
import os
import threading
import time

DOUBLE_EVERY = 60  # samples logged at one interval before it doubles
MAX_INTERVAL_S = 60.0
WRITE_EVERY_S = 10.0  # the thread writes a run's samples at most this often; the rest ride the run's final write

_logger = logging.getLogger(__name__)


def enabled() -> bool:
    """On unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is set false (MLflow's own switch; we default it on)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as switch

    return not switch.is_set() or switch.get()


class Watch:
    """One run's samples: summed until its interval is up, then logged (as their mean) at the run's next step."""

    def __init__(self, client, run_id: str, step: int, interval: float):
        self.client, self.run_id, self.step, self.interval = client, run_id, step, interval
        self.sums: dict[str, float] = {}
        self.count, self.logged = 0, 0
        self.due = time.monotonic() + interval
        self.pending: list = []  # Metric entities not yet written
        self.written = time.monotonic()

    def add(self, sample: dict[str, float], now: float, final: bool = False) -> None:
        for k, v in sample.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if now < self.due and not final:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.pending += [Metric(k, round(v / self.count, 1), stamp, self.step) for k, v in self.sums.items()]
        self.sums, self.count, self.step, self.logged = {}, 0, self.step + 1, self.logged + 1
        if self.logged % DOUBLE_EVERY == 0:
            self.interval = min(2 * self.interval, max(MAX_INTERVAL_S, self.interval))
        self.due = now + self.interval


class Sampler:
    """MLflow's CPU monitor (and GPU monitor, where there is one), sampled by one daemon thread for every watched
    run of this process."""

    def __init__(self):
        from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor  # imports psutil

        # Its INFO lines ("Skip logging GPU metrics...") would break the sweep's progress bar.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self.monitors = [CPUMonitor(), *filter(None, [_gpu_monitor()])]
        self.first = MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 1.0
        self.watches: dict[int, Watch] = {}
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.sample()  # CPU use is measured between two samples: the first one starts the clock
        threading.Thread(target=self.loop, daemon=True, name="system-metrics").start()

    def sample(self) -> dict[str, float]:
        """One reading of every monitor (the caller holds the lock, or nobody else can reach the monitors yet)."""
        out = {}
        for m in self.monitors:
            m.collect_metrics()
            out |= {f"system/{k}": float(v) for k, v in m.aggregate_metrics().items()}
            m.clear_metrics()
        return out

    def watch(self, client, run_id: str, step: int) -> Watch:
        w = Watch(client, run_id, step, self.first)
        with self.lock:
            self.watches[id(w)] = w
        return w

    def stop(self, w: Watch) -> list:
        """Stop watching `w`: its samples not yet written, the last one taken now."""
        with self.lock:
            self.watches.pop(id(w), None)
            w.add(self.sample(), time.monotonic(), final=True)
            pending, w.pending = w.pending, []
        return pending

    def loop(self) -> None:
        while True:
            time.sleep(self.first)
            with self.lock:
                if not self.watches:
                    continue
                now, sample = time.monotonic(), self.sample()
                for w in self.watches.values():
                    w.add(sample, now)
                batches = [(w, w.pending) for w in self.watches.values()
                           if w.pending and now - w.written >= WRITE_EVERY_S]
                for w, _ in batches:
                    w.pending, w.written = [], now
            for w, metrics in batches:  # outside the lock: a slow store never holds up a run's own end
                try:
                    w.client.log_batch(w.run_id, metrics=metrics)
                except Exception as e:  # noqa: BLE001 - those samples are lost; the run goes on
                    _logger.debug("system metrics of run %s not written: %r", w.run_id, e)


def _gpu_monitor():
    """MLflow's NVIDIA (nvidia-ml-py) or AMD (pyrsmi) monitor, or None without either or without a GPU."""
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    for monitor in (GPUMonitor, ROCMMonitor):
        try:
            return monitor()
        except Exception:  # noqa: BLE001 - no library, no driver or no device: no GPU metrics
            continue
    return None


_sampler: Sampler | None = None


def watch(client, run_id: str, resume: bool = False) -> Watch | None:
    """Start sampling for `run_id`, written through `client` (its tracking URI, never the process's global one); None
    when sampling is off or cannot run here (no psutil): a run never fails for want of its system metrics. `resume`:
    a run continued (a retried trial, a resumed study's parent) logs after its last step."""
    global _sampler
    if not enabled():
        return None
    try:
        if _sampler is None or _sampler.pid != os.getpid():  # a forked child has no sampler thread
            _sampler = Sampler()
    except ImportError as e:
        _logger.debug("no system metrics: %s", e)
        return None
    return _sampler.watch(client, run_id, _next_step(client, run_id) if resume else 0)


def stop(w: Watch | None) -> list:
    """The run's last system metrics (Metric entities), for its final write; none for a run not watched."""
    return _sampler.stop(w) if w is not None and _sampler is not None else []


def _next_step(client, run_id: str) -> int:
    """The step after the run's last system sample (its latest values carry their step: no history is read)."""
    metrics = client.get_run(run_id).data._metric_objs
    return max((m.step + 1 for m in metrics if m.key.startswith("system/")), default=0)
