"""Group commit: the quarantine writes of messages checked at the same time share a commit.

Every commit waits for the disk (SQLite fsyncs its log; PostgreSQL flushes its WAL), and
on SQLite writers also take turns on one lock. So the first thread that has something to
store runs one transaction for every thread waiting by then, each thread's work in its own
savepoint, and hands the next batch to a thread that arrived meanwhile. A message that
lost a deadlock on PostgreSQL runs again alone after its batch. Each thread gets
its own result only once the shared commit succeeded, so the filter still answers 250 only
for mail that is stored. A failed commit fails every message of the batch (each answers
451); a failure in one message's statements rolls back that message alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DBAPIError

from cleanmail.db import Database

T = TypeVar("T")
MOST = 64  # messages in one transaction: bounds how long one commit holds the write lock
RETRIES = 2  # runs alone of a message whose batch lost a deadlock
LOCK_CONFLICTS = {"40P01", "40001"}  # PostgreSQL: deadlock detected, serialization failure


def lock_conflict(error: BaseException | None) -> bool:
    """True for PostgreSQL's deadlock or serialization failure: worth running again."""
    return getattr(getattr(error, "orig", None), "sqlstate", None) in LOCK_CONFLICTS


class _Work(Generic[T]):
    """One thread's part of a batch, and how it ended."""

    __slots__ = ("done", "error", "key", "lead", "result", "run")

    def __init__(self, run: Callable[[Any], T], key: str) -> None:
        self.run = run
        self.key = key
        self.done = threading.Event()
        self.lead = False  # woken to run the next batch rather than with an outcome
        self.result: T | None = None
        self.error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class Committer:
    """Runs write work from many threads in shared transactions, one commit per batch."""

    def __init__(self, database: Database, *, most: int = MOST) -> None:
        self.database = database
        self.most = most
        self._lock = threading.Lock()
        self._waiting: list[_Work[Any]] = []
        self._busy = False
        self.batches = 0  # transactions committed or tried, for tests and statistics

    @property
    def queued(self) -> int:
        """How many threads' work waits for a transaction (not counting one running)."""
        with self._lock:
            return len(self._waiting)

    def run(self, work: Callable[[Any], T], *, key: str = "") -> T:
        """Run ``work(connection)`` in a write transaction; its result once it has committed.

        ``connection``: the driver's connection (from SQLAlchemy's pool), in a transaction.

        Batches run their work in ``key`` order, so that two filter processes lock the
        same rows in the same order (no deadlock on PostgreSQL).
        """
        item: _Work[T] = _Work(work, key)
        with self._lock:
            self._waiting.append(item)
            lead = not self._busy
            self._busy = True
        if not lead:
            item.done.wait()
            if not item.lead:
                return item.outcome()
        with self._lock:
            # This thread's own work is first in line: a leader's list was empty, and a
            # thread handed the lead is the oldest waiting.
            batch = self._waiting[: self.most]
            del self._waiting[: self.most]
        try:
            self._commit(batch)
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting[0].lead = True
                    self._waiting[0].done.set()
                else:
                    self._busy = False
            for other in batch:
                other.done.set()
        return item.outcome()

    def _commit(self, batch: list[_Work[Any]]) -> None:
        self._run_batch(sorted(batch, key=lambda w: w.key))
        # Messages of one batch lock their mailboxes' version rows (and counters) in their
        # own order, so two filter processes can deadlock on PostgreSQL, which then fails
        # one side. That is no fault of the message: once the batch has ended, each such
        # message runs again alone, where it has no other locks to hold against anyone.
        for _try in range(RETRIES):
            again = [item for item in batch if lock_conflict(item.error)]
            for item in again:
                item.error = None
                self._run_batch([item])

    def _run_batch(self, batch: list[_Work[Any]]) -> None:
        self.batches += 1
        engine = self.database.engine
        dbapi_error = engine.dialect.loaded_dbapi.Error
        connection = engine.raw_connection()
        statement = "BEGIN"
        try:
            cursor = connection.cursor()
            try:
                _begin(connection, cursor, engine.dialect.name)
                if len(batch) == 1:
                    batch[0].result = batch[0].run(connection)
                else:
                    for item in batch:
                        statement = "SAVEPOINT message"
                        cursor.execute(statement)
                        try:
                            item.result = item.run(connection)
                        except Exception as exc:  # handed to that message's thread
                            item.error = _wrapped(exc, dbapi_error, "")
                            # A savepoint that fails to roll back fails the whole batch.
                            statement = "ROLLBACK TO SAVEPOINT message"
                            cursor.execute(statement)
                        statement = "RELEASE SAVEPOINT message"
                        cursor.execute(statement)
                statement = "COMMIT"
                connection.commit()
            finally:
                cursor.close()
        except BaseException as exc:
            failure = _wrapped(exc, dbapi_error, statement)
            if isinstance(exc, dbapi_error) and (
                getattr(failure, "connection_invalidated", False) or _gone(connection)
            ):
                connection.invalidate(exc)  # never handed out again
            else:
                with contextlib.suppress(dbapi_error):
                    connection.rollback()
            for item in batch:
                if item.error is None:
                    item.error, item.result = failure, None
        finally:
            connection.close()  # back to the pool


def _begin(connection: Any, cursor: Any, dialect: str) -> None:
    """Open the write transaction as ``Database.session_scope(write=True)`` does.

    SQLite: take the write lock at once, with every commit synced (``PRAGMA
    synchronous`` may have been relaxed on this connection by other bookkeeping).
    PostgreSQL: psycopg opens the transaction with the first statement.
    """
    if dialect != "sqlite":
        return
    info = connection.info
    if info.get("synchronous", "FULL") != "FULL":
        cursor.execute("PRAGMA synchronous=FULL")
        info["synchronous"] = "FULL"
    cursor.execute("BEGIN IMMEDIATE")


def _wrapped(exc: BaseException, dbapi_error: type[Exception], statement: str) -> BaseException:
    """A driver error as SQLAlchemy's (the filter answers 451 for those); others as they are."""
    if isinstance(exc, dbapi_error):
        return DBAPIError.instance(statement, None, exc, dbapi_error)
    return exc


def _gone(connection: Any) -> bool:
    """Whether the driver connection is closed or broken (PostgreSQL ended it)."""
    driver = getattr(connection, "dbapi_connection", connection)
    return bool(getattr(driver, "closed", False)) or getattr(driver, "broken", False)
