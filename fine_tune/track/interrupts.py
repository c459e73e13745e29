"""Ctrl-C and SIGTERM stop a sweep or a confirm cleanly: never inside a store write, and always as an exception the
code in progress can handle (close its run, re-queue its trial).

An interrupt raised in the middle of an SQLite write can leave this process holding the database lock, and the
cleanup that follows (closing the run as KILLED) then waits on itself. The signal handlers call `interrupt`, which
defers the exception until the write in progress (inside `shielded()`) has finished.
"""
from __future__ import annotations

import contextlib
import functools
import signal

_shield = {"depth": 0, "pending": None, "fired": False}


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (the trial is closed and re-queued) but exiting with 143."""


@contextlib.contextmanager
def shielded():
    """Interrupts arriving inside this block are raised when it ends."""
    _shield["depth"] += 1
    try:
        yield
    finally:
        _shield["depth"] -= 1
        if _shield["depth"] == 0 and _shield["pending"] is not None:
            exc, _shield["pending"] = _shield["pending"], None
            raise exc


def store_write(method):
    """Mark a method that writes to the stores: interrupts wait until it returns."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with shielded():
            return method(*args, **kwargs)
    return wrapper


def interrupt(exc: BaseException) -> None:
    """Raise `exc` now, or as soon as the store write in progress is done; later signals are ignored so that
    the cleanup the first one started runs to its end."""
    if _shield["fired"]:
        return
    _shield["fired"] = True
    if _shield["depth"]:
        _shield["pending"] = exc
    else:
        raise exc


def rearm() -> None:
    """Accept the next interrupt (a new sweep in the same process)."""
    _shield["fired"], _shield["pending"] = False, None


def _on_signal(signum, frame):
    interrupt(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())


@contextlib.contextmanager
def interruptible(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """Within this block, Ctrl-C and SIGTERM raise KeyboardInterrupt / Terminated, deferred past store writes."""
    rearm()
    previous = {sig: signal.signal(sig, _on_signal) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
