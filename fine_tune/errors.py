"""The errors a user can act on, in one light module: the CLI catches them (one `error:` line, exit 2; a dead
worker exit 1) without importing torch, Optuna or MLflow, so `keys`, `--help` and a bad config answer at once."""


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
