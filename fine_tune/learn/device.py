"""Which device a run trains on: the config's choice, checked before anything is created, or the best one here."""
from __future__ import annotations

import torch

from fine_tune.errors import ConfigError


def check_device(name: str) -> None:
    """A device the config names must be on this machine: one line now, not a traceback in the first trial."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda is not available on this machine (no GPU or no CUDA build of torch); use "
                          "device: auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: mps is not available on this machine (Apple silicon only); use device: auto or cpu")


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
