"""Peak memory of one run, what LoRA and a frozen backbone are meant to save: on CUDA the allocator's peak, on CPU
(Linux) the process's peak resident memory over the run, which the kernel lets a process reset
(/proc/self/clear_refs), so a run in a long-lived worker is measured alone and not against the worker's lifetime
peak. Both are measured above what was in use when the run started, so the weights a worker already holds (a
backbone read by an earlier trial) are not counted again. Elsewhere (macOS, Windows) there is no honest per-run
measure on the CPU, and none is logged.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _resident_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M).group(1))


def _trim() -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc:
        getattr(ctypes.CDLL(libc), "malloc_trim", lambda _: None)(0)  # glibc only


class PeakMemory:
    """Started when created; `mb()` is the peak above the start so far, in MiB (None where nothing honest exists)."""

    def __init__(self, device: torch.device):
        self.device, self.start = device, None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
            return
        try:
            _trim()  # memory an earlier run freed but the allocator kept would be reused unseen
            _CLEAR.write_text("5")  # resets VmHWM, the peak resident set size, to the current size
            self.start = _resident_kb("VmRSS") * 1024
        except (OSError, AttributeError):  # not Linux, or a kernel without the reset
            self.start = None

    def mb(self) -> float | None:
        if self.start is None:
            return None
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else _resident_kb("VmHWM") * 1024)
        return max(0, peak - self.start) / 2**20
