"""Where the two stores live and how they are opened: the Optuna storage (trials) and the MLflow tracking store (runs).

Both default to SQLite files under the runs directory, so a newcomer needs nothing running; `OPTUNA_STORAGE` /
`sweep.storage` and `MLFLOW_TRACKING_URI` point them at PostgreSQL or an MLflow server. The analysis package reads
the same locations from here. Nothing heavy is imported at module level: `make report` imports this without torch.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sqlite3
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from fine_tune.errors import StorageError, TrackingError

# MLflow draws a progress bar on stderr for every artifact it downloads (a champion's checkpoint, a re-run's config),
# and with a tracking server prints "View run ... / View experiment ..." on stdout at the end of every run, through
# the sweep's progress bar (`make ui` prints the one URL that matters). A user's own setting still wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def optuna_url(runs_dir: str | Path, storage: str | None = None) -> str:
    """OPTUNA_STORAGE, else the experiment's `sweep.storage`, else SQLite in the runs directory."""
    return os.environ.get("OPTUNA_STORAGE") or storage or f"sqlite:///{Path(runs_dir).resolve()}/optuna.db"


def tracking_uri(runs_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI, else SQLite in the runs directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).resolve()}/mlflow.db"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local database (`mlartifacts/` in the database's
    folder, so `make clean` or moving the folder takes both), while a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on a tracking server that is down: MLflow's own client would retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except OSError as e:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({getattr(e, 'reason', e)}); "
                            "start it (`make server`) or fix MLFLOW_TRACKING_URI") from None


def tracking_lost(exc: BaseException | None, uri: str) -> bool:
    """Whether `exc` (or what it was raised from) says the tracking server at `uri` could not be reached: MLflow's
    client gives up after its retries with "Max retries exceeded" / "Connection refused" around the HTTP library's
    connection error. A local store is never "lost": its errors are the run's own."""
    if not uri.startswith(("http://", "https://")):
        return False
    while exc is not None:
        text = str(exc)
        if (isinstance(exc, ConnectionError) or type(exc).__name__ in ("ConnectionError", "MaxRetryError",
                                                                         "NewConnectionError")
                or "Max retries exceeded" in text or "Connection refused" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def wait_for_tracking(uri: str, patience_s: float, log: Callable[[str], None], every_s: float = 2.0) -> bool:
    """Wait until the tracking server at `uri` answers again, at most `patience_s`; whether it did."""
    log(f"MLflow tracking server {uri} is unreachable: waiting for it (at most {patience_s:.0f}s)")
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        try:
            check_reachable(uri)
            log(f"MLflow tracking server {uri} is back")
            return True
        except TrackingError:
            time.sleep(every_s)
    return False


def check_writable(runs_dir: str | Path) -> None:
    """The runs directory must take files (a read-only mount, a folder of another user's): one line, before
    anything is created."""
    path = Path(runs_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())  # tried without creating anything
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise StorageError(f"runs_dir {path} is not writable ({e.strerror}); point runs_dir at a writable folder or "
                           "fix its permissions") from None


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def check_sqlite(url: str, what: str, created_by: str) -> None:
    """An existing SQLite store must be a whole one: not a file of another kind, not left half-created by a first
    sweep that was stopped while it built its tables (that left a traceback on every later sweep)."""
    path = _sqlite_path(url)
    if path is None or not path.exists():
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise StorageError(f"{what} {path} is not a usable SQLite database ({e}); move it aside, or delete it if it "
                           "holds nothing you need, and run again") from None
    if any(t.startswith("_alembic_tmp_") for t in tables) or (tables and "alembic_version" not in tables):
        raise StorageError(f"{what} {path} was left half-created (its tables were being built when {created_by} "
                           "was stopped); delete it (a new one is made) unless it holds runs you need")


def create_atomically(url: str, create) -> None:
    """Make a new SQLite store whole or not at all: `create(temp_url)` builds it in a temporary file beside it, which
    is linked into place only when complete. A Ctrl-C or a kill meanwhile leaves no half-made store, and of two
    sweeps starting at once one links its file and the other's is dropped."""
    path = _sqlite_path(url)
    if path is None or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)  # the store is built from nothing, under this free name
    try:
        create(f"sqlite:///{tmp}")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another sweep made it first: theirs is whole too
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(tmp + suffix).unlink(missing_ok=True)


def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
    """WAL lets readers work beside a writer (several workers on one machine), and synchronous=NORMAL drops the
    fsync per commit that made each per-epoch log call cost milliseconds; a crashed process loses nothing."""
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def tune_sqlite(engine) -> None:
    """Apply our SQLite settings to one of our two engines (Optuna's, MLflow's); nobody else's is touched."""
    import sqlalchemy

    if engine.dialect.name != "sqlite" or sqlalchemy.event.contains(engine, "connect", _sqlite_pragmas):
        return
    sqlalchemy.event.listen(engine, "connect", _sqlite_pragmas)
    engine.dispose()  # connections opened before the hook (table creation) are replaced by tuned ones


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna's ExperimentalWarning silenced for a block: features we rely on on purpose (heartbeats, metric names,
    its matplotlib plots) warn on every use."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def optuna_storage(url: str, heartbeat: int = 10, grace: int = 30,
                   on_stale: Callable[[Any, Any], None] | None = None):
    """Optuna's RDB storage with heartbeats, so a trial whose worker died is failed (and `on_stale` called on it)
    instead of staying RUNNING."""
    import optuna

    check_sqlite(url, "Optuna storage", "a sweep")

    def create(temp: str) -> None:
        with quiet_experimental():
            optuna.storages.RDBStorage(temp).engine.dispose()  # journal mode DELETE: all of it in the one file

    create_atomically(url, create)
    # SQLite serialises writers; with several local workers a write may wait, so wait long instead of failing.
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with quiet_experimental():
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat,
                                                 grace_period=grace, heartbeat_stale_trial_callback=on_stale)
    except Exception as e:  # sqlalchemy's OperationalError, ArgumentError, a missing driver...
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise StorageError(f"Optuna storage {url} is unusable ({first}); start the database or fix OPTUNA_STORAGE "
                           "/ sweep.storage") from None
    tune_sqlite(storage.engine)
    return storage


def existing_study(name: str, url: str):
    """The Optuna study `name` in the storage at `url`, or None when it does not exist there."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=optuna_storage(url))
    except KeyError:
        return None


def mlflow_client(uri: str):
    """An MLflow client on `uri`, its SQLite engine tuned like Optuna's."""
    from mlflow.tracking import MlflowClient

    check_sqlite(uri, "MLflow store", "a first run")

    def create(temp: str) -> None:
        made = MlflowClient(temp)
        for store in (made._tracking_client.store, made._get_registry_client().store):  # creates the tables
            store.engine.dispose()

    create_atomically(uri, create)
    client = MlflowClient(uri)
    # MLflow keeps one engine per URI for runs and another for the registry (private attributes: if a later MLflow
    # renames them, its stores just keep SQLite's defaults)
    for store in (client._tracking_client.store, client._get_registry_client().store):
        if hasattr(store, "engine"):  # a SQLAlchemy store (not an http one)
            tune_sqlite(store.engine)
    return client


def trial_counts(study) -> collections.Counter:
    """The study's trials by state, counted by the database itself: Optuna's per-process trial cache can miss a
    trial another worker created, and an exact count is what keeps parallel workers from overshooting. One COUNT
    query: reading every trial instead took 35 ms before each trial of a 40-trial study, and grew with the study."""
    import sqlalchemy
    from optuna.storages._rdb.models import TrialModel

    storage = study._storage._backend if hasattr(study._storage, "_backend") else study._storage
    query = (sqlalchemy.select(TrialModel.state, sqlalchemy.func.count())
             .where(TrialModel.study_id == study._study_id).group_by(TrialModel.state))
    with storage.engine.connect() as conn:
        return collections.Counter(dict(conn.execute(query).all()))
