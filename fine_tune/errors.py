"""The errors a user can act on, in one light module: the CLI catches them (one `error:` line, exit 2; a dead
worker exit 1) without importing torch, Optuna or MLflow, so `keys`, `--help` and a bad config answer at once."""
from __future__ import annotations

from typing import Iterator


class ConfigError(ValueError):
    """A bad experiment file or override; its message is the one line the user sees."""


class DataError(RuntimeError):
    """The data could not be found or read; the message says what was tried and how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint that is unreadable or does not fit the model; the message names the file and the fix."""


class StorageError(RuntimeError):
    """The Optuna storage cannot be reached; the message names the URL and the fix."""


class TrackingError(RuntimeError):
    """The tracking store cannot be reached; the message names the URI and the fix."""


class WorkerDied(RuntimeError):
    """A worker process ended abnormally (killed, out of memory)."""


def causes(e: BaseException | None) -> Iterator[BaseException]:
    """`e`, then what it was raised from or while handling, and so on: a library often wraps the error that says
    what happened (a full disk, a server that went away) in one of its own."""
    seen = set()
    while e is not None and id(e) not in seen:  # a chain can loop back on itself
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__
