"""What both command lines (`python -m fine_tune`, `python -m analysis`) share: an argument parser whose errors are
one `error:` line and exit code 2, like every other bad input, and argument types that refuse what cannot work."""
from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {self.prog}: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    """An integer of at least 1 (`--n-trials 0` would run nothing, `--workers -2` no worker)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value
