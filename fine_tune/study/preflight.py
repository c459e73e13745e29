"""The checks every command makes before it creates anything: the device the config names, LoRA that has layers to
adapt, a writable runs folder and, when the run is tracked, a reachable tracking store. One place, so `make train`, `make rerun`, a sweep, confirm
and the curve refuse the same bad input with the same line."""
from __future__ import annotations

from fine_tune.config import Config
from fine_tune.learn import lora
from fine_tune.learn.device import check_device
from fine_tune.track.stores import check_reachable, check_writable, tracking_uri


def preflight(cfg: Config, track: bool = True) -> str | None:
    """Refuse what cannot work, in one line each, before any store, run or file is made; returns the tracking URI
    (None when the run is not tracked)."""
    check_device(cfg.device)
    lora.check(cfg)
    check_writable(cfg.runs_dir)
    if not track:
        return None
    uri = tracking_uri(cfg.runs_dir)
    check_reachable(uri)
    return uri
