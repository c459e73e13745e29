"""Where the two stores live and how they are opened: the Optuna storage (trials) and the MLflow tracking store (runs).

Both default to SQLite files under the runs directory, so a newcomer needs nothing running; `OPTUNA_STORAGE` /
`sweep.storage` and `MLFLOW_TRACKING_URI` point them at PostgreSQL or an MLflow server. The analysis package reads
the same locations from here. Nothing heavy is imported at module level: `make report` imports this without torch.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import sqlite3
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from fine_tune.errors import StorageError, TrackingError, causes

# MLflow draws a progress bar on stderr for every artifact it downloads (a champion's checkpoint, a re-run's config),
# and with a tracking server prints "View run ... / View experiment ..." on stdout at the end of every run, through
# the sweep's progress bar (`make ui` prints the one URL that matters). A user's own setting still wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


# scheme://user:password@ in a URL or in any text (a diff, an error line). A password may hold unescaped '/', ':' or
# '@', so it runs to the last '@' before whitespace: masking too much beats showing part of a password.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s:/@]*)(?P<password>:\S*)?@")


def masked(text: str) -> str:
    """`text` (a URL, or any text holding URLs) with every URL's password shown as *** (`user:***@host`): what we
    print, log or write into a report. A user name alone is kept (`postgresql://me@host`, `ssh://git@host`) except
    over http(s), where it is how a token rides (`https://TOKEN@github.com/...`)."""
    def mask(m: re.Match) -> str:
        if m["password"]:
            return f"{m['scheme']}{m['user']}:***@"
        web = m["scheme"].lower().endswith(("http://", "https://"))
        return f"{m['scheme']}***@" if web and m["user"] else m[0]
    return _USERINFO.sub(mask, text)


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


# The health check a proxy answers, then one read through the API: MLflow's own `--app-name basic-auth` asks for
# credentials there only (it leaves /health open), a reverse proxy with basic auth on every path.
_PROBES = ("/health", "/api/2.0/mlflow/experiments/search?max_results=1")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, on a tracking server that is down or turns us away: MLflow's own client would retry for
    minutes, then end in a traceback. The probe goes through MLflow's HTTP layer, so it carries what every later call
    carries: MLFLOW_TRACKING_USERNAME / _PASSWORD, MLFLOW_TRACKING_TOKEN, ~/.mlflow/credentials, the TLS settings."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    for endpoint in _PROBES:
        try:
            answer = http_request(creds, endpoint, "GET", max_retries=0, timeout=timeout, raise_on_status=False)
        except Exception as e:  # noqa: BLE001 - MLflow wraps the HTTP library's errors: refused, timed out, no host
            raise _unreachable(uri, _root_cause(e)) from None
        status = f"HTTP {answer.status_code} {answer.reason}"
        if answer.status_code in (401, 403):
            given = "the credentials given" if creds.username or creds.token else "no credentials"
            raise TrackingError(masked(f"MLflow tracking server {uri} turned us away with {given} ({status}); set "
                                       "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                                       "MLFLOW_TRACKING_TOKEN) to an account it accepts"))
        if answer.status_code != 200:
            raise _unreachable(uri, status)


def _unreachable(uri: str, why: str) -> TrackingError:
    return TrackingError(masked(f"MLflow tracking server {uri} is unreachable ({why}); start it (`make server`) or "
                                "fix MLFLOW_TRACKING_URI"))


def _root_cause(e: BaseException) -> str:
    """What lies under MLflow's wrapping of a failed request, in a few words ("Connection refused", "timed out")."""
    *_, e = causes(e)  # the innermost error
    return getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def tracking_lost(exc: BaseException | None, uri: str) -> bool:
    """Whether `exc` (or what it was raised from) says the tracking server at `uri` could not be reached: MLflow's
    client gives up after its retries with "Max retries exceeded" / "Connection refused" around the HTTP library's
    connection error. A local store is never "lost": its errors are the run's own."""
    if not uri.startswith(("http://", "https://")):
        return False
    return any(isinstance(e, ConnectionError) or type(e).__name__ in ("ConnectionError", "MaxRetryError",
                                                                      "NewConnectionError")
               or "Max retries exceeded" in str(e) or "Connection refused" in str(e) for e in causes(exc))


def wait_for_tracking(uri: str, patience_s: float, log: Callable[[str], None], every_s: float = 2.0) -> bool:
    """Wait until the tracking server at `uri` answers again, at most `patience_s`; whether it did."""
    log(f"MLflow tracking server {masked(uri)} is unreachable: waiting for it (at most {patience_s:.0f}s)")
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        try:
            check_reachable(uri)
            log(f"MLflow tracking server {masked(uri)} is back")
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
                   on_stale: Callable[[Any, Any], None] | None = None, patience_s: float = 600.0,
                   log: Callable[[str], None] = print):
    """Optuna's RDB storage with heartbeats, so a trial whose worker died is failed (and `on_stale` called on it)
    instead of staying RUNNING. A database server's outage is waited through, at most `patience_s`, saying so in
    `log` (outages.PatientStorage)."""
    import optuna

    check_sqlite(url, "Optuna storage", "a sweep")

    def create(temp: str) -> None:
        with quiet_experimental():
            optuna.storages.RDBStorage(temp).engine.dispose()  # journal mode DELETE: all of it in the one file

    create_atomically(url, create)
    if url.startswith("sqlite"):
        # SQLite serialises writers; with several local workers a write may wait, so wait long instead of failing.
        make, kwargs = optuna.storages.RDBStorage, {"connect_args": {"timeout": 60}}
    else:
        from fine_tune.track.outages import PatientStorage

        # a connection the server dropped while it sat in the pool is replaced before use (pool_pre_ping)
        make, kwargs = functools.partial(PatientStorage, patience_s=patience_s, log=log), {"pool_pre_ping": True}
    try:
        with quiet_experimental():
            storage = make(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=grace,
                           heartbeat_stale_trial_callback=on_stale)
    except Exception as e:  # sqlalchemy's OperationalError, ArgumentError, a missing driver...
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise StorageError(masked(f"Optuna storage {url} is unusable ({first}); start the database or fix "
                                  "OPTUNA_STORAGE / sweep.storage")) from None
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
    import logging

    from mlflow.tracking import MlflowClient

    check_sqlite(uri, "MLflow store", "a first run")
    # "Creating initial MLflow database tables..." and "Updating database tables" (INFO, on a new store) would print
    # before the first epoch line or through the progress bar; a level set higher elsewhere stays.
    tables = logging.getLogger("mlflow.store.db.utils")
    tables.setLevel(max(tables.level, logging.WARNING))

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

    from fine_tune.track.outages import patient

    storage = study._storage._backend if hasattr(study._storage, "_backend") else study._storage
    query = (sqlalchemy.select(TrialModel.state, sqlalchemy.func.count())
             .where(TrialModel.study_id == study._study_id).group_by(TrialModel.state))

    def count() -> collections.Counter:
        with storage.engine.connect() as conn:
            return collections.Counter(dict(conn.execute(query).all()))
    return patient(study)(count)  # waits through an outage of the database, as Optuna's own calls do
