"""An Optuna database that goes away, waited through. A connection the server dropped (a restart, a failover, an
idle timeout) or a database that is away for a while makes a storage call wait until the database answers again,
then run again; after `patience_s` the sweep stops with one line (StorageError). SQLite is local: its errors are the
run's own, never waited on. (The MLflow tracking server's outage is `stores.tracking_lost` / `wait_for_tracking`.)
"""
from __future__ import annotations

import functools
import inspect
import threading
import time
from typing import Any, Callable

from optuna.storages import RDBStorage

from fine_tune.errors import StorageError, causes
from fine_tune.track.stores import masked


def storage_lost(exc: BaseException | None) -> bool:
    """Whether `exc` (or what it was raised from) says a database server could not be reached: a connection it
    dropped (SQLAlchemy marks it invalidated) or one it would not open. A StorageError in the chain is our own
    verdict that the database stayed away: that is not waited on again; nor is SQLite, a file."""
    import sqlalchemy

    for e in causes(exc):
        if isinstance(e, StorageError):
            return False
        if (isinstance(e, sqlalchemy.exc.DBAPIError) and not type(e.orig).__module__.startswith("sqlite3")
                and (e.connection_invalidated or (isinstance(e, sqlalchemy.exc.OperationalError)
                                                  and e.statement is None))):
            return True
    return False


class PatientStorage(RDBStorage):
    """Optuna's RDB storage, every call of which waits through an outage of its database and then runs again.

    A call the database never ran (its connection was gone) is safe to run again; one whose commit the server took
    just as the connection dropped is not, a window of a few milliseconds that this accepts.
    """

    EVERY_S = 2.0  # how often the database is asked whether it is back
    TRIES = 20  # a call failing this often while the database answers fails for another reason: raised

    def __init__(self, url: str, patience_s: float, log: Callable[[str], None], **kwargs: Any):
        self.patience_s, self.log = patience_s, log
        self._lock = threading.Lock()  # one thread waits (and says so); the others wait for its verdict
        self._back_at = float("-inf")  # when the database last came back
        self._gone: str | None = None  # why we stopped waiting for it: every call fails at once from then on
        super().__init__(url, **kwargs)

    def patiently(self, call: Callable, *args: Any, **kwargs: Any) -> Any:
        """`call(*args, **kwargs)`, run again once the database is back whenever it could not be reached."""
        for tries in range(1, self.TRIES + 1):
            started = time.monotonic()
            try:
                return call(*args, **kwargs)
            except Exception as e:
                if not storage_lost(e) or tries == self.TRIES:
                    raise
                self._wait(started)

    def _wait(self, started: float) -> None:
        with self._lock:
            if self._back_at > started:  # another thread saw it come back after this call started: try again
                return
            if self._gone:
                raise StorageError(self._gone)
            if self._answers():  # a dropped connection, and the database is there: no outage to speak of
                self._back_at = time.monotonic()
                return
            where = masked(self.url)
            self.log(f"Optuna storage {where} is unreachable: waiting for it (at most {self.patience_s:.0f}s)")
            deadline = time.monotonic() + self.patience_s
            try:
                while time.monotonic() < deadline:
                    time.sleep(self.EVERY_S)
                    if self._answers():
                        self._back_at = time.monotonic()
                        self.log(f"Optuna storage {where} is back")
                        return
            except KeyboardInterrupt:  # stopped while waiting: closing the trial must not wait all over again
                self._gone = self._given_up("is unreachable")
                raise
            self._gone = self._given_up(f"stayed unreachable for {self.patience_s:.0f}s")
            raise StorageError(self._gone)

    def _answers(self) -> bool:
        import sqlalchemy

        try:
            with self.engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT 1"))
            return True
        except sqlalchemy.exc.SQLAlchemyError:
            return False

    def _given_up(self, what: str) -> str:
        return (f"the Optuna storage {masked(self.url)} {what}; a trial in progress is re-queued by the next sweep "
                "and resumes from its last saved epoch: run the same command again once the database is back")

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.patiently(super().record_heartbeat, trial_id)
        except StorageError:  # in the heartbeat thread: the trial's own thread says it, in one line
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # No worker could beat while the database was away: each gets a grace period to beat again before its
        # trial counts as dead (and is failed and re-queued while it still runs).
        if time.monotonic() - self._back_at < (self.grace_period or 2 * self.heartbeat_interval):
            return []
        return self.patiently(super()._get_stale_trial_ids, study_id)


def _patient(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self: PatientStorage, *args: Any, **kwargs: Any) -> Any:
        return self.patiently(method, self, *args, **kwargs)
    return call


# Every other method that runs a transaction goes through `patiently`: the public ones and the private ones Optuna's
# trial cache calls (_get_trials, _create_new_trial...); a helper working inside a caller's transaction is left alone.
for _name, _method in list(vars(RDBStorage).items()):
    if (inspect.isfunction(_method) and "_create_scoped_session" in _method.__code__.co_names
            and _name not in vars(PatientStorage)):
        setattr(PatientStorage, _name, _patient(_method))


def patient(study) -> Callable:
    """How to run a call on `study`'s database: through its storage's `patiently`, or as it is (SQLite)."""
    storage = getattr(study._storage, "_backend", study._storage)
    if isinstance(storage, PatientStorage):
        return storage.patiently
    return lambda call, *args, **kwargs: call(*args, **kwargs)
