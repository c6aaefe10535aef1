"""The claims and marks of a process's sender threads, committed together (group commit).

Each sender thread used to claim and mark its reports in transactions of its own:
on SQLite every one of them takes the single write lock, and with eight sender
threads and the process that prepares the reports waiting on each other, the threads
spent most of a run waiting for it (SQLite's busy handler sleeps up to 100 ms a try).

Here one thread, with one connection, writes for all of them: a sender hands in what
it has to write (the mark of the report the relay has just taken, the claim of the
next one) and waits; the ledger takes everything handed in meanwhile and writes it
in one transaction, then answers each sender. Nothing waits to be grouped: a request
goes into the very next commit, so a report is marked no later than before, and a
sender still claims each report just before sending it.

PostgreSQL has no single writer: there each sender writes on a connection of its own,
in its own thread, as the commits of several connections go in parallel.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

_STOP = None


class LedgerError(Exception):
    """A commit of the ledger failed; ``marked`` tells whether the marks were written anyway."""

    def __init__(self, error: BaseException, *, marked: bool) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.marked = marked


@dataclass
class _Request:
    """What one sender hands in: reports to mark sent, a report to claim."""

    marks: list[dict[str, Any]]
    claim: int | None
    done: threading.Event = field(default_factory=threading.Event)
    claimed: bool = False
    marked: bool = False
    error: BaseException | None = None


class Ledger:
    """One thread that writes the claims and marks of many sender threads, a commit for all."""

    def __init__(
        self, engine: Engine, claim: Any, mark: Any, now: datetime, until: datetime
    ) -> None:
        self.engine = engine
        self._claim = claim  # the statements of report_senders, built once there
        self._mark = mark
        self.claim_params = {"now": now, "until": until}
        self.requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.failed: BaseException | None = None
        self._local = threading.local()
        self._connections: list[Connection] = []
        if engine.dialect.name == "sqlite":  # the single writer: one connection writes for all
            self.thread = threading.Thread(target=self._run, name="report-ledger", daemon=True)
            self.thread.start()

    def write(self, marks: list[dict[str, Any]], claim: int | None) -> bool:
        """Mark ``marks`` sent and claim ``claim`` in the next commit; True if it was claimed.

        Raises ``LedgerError`` when the commit failed; the marks are then tried again on
        their own, so that a failed claim does not lose them.
        """
        request = _Request(marks, claim)
        if self.thread is None:
            self._commit(self._connection(), [request])
        else:
            self.requests.put(request)
            while not request.done.wait(1.0):
                if self.failed is not None:  # the ledger's thread died: nobody will answer
                    raise LedgerError(self.failed, marked=False) from self.failed
        if request.error is not None:
            raise LedgerError(request.error, marked=request.marked) from request.error
        return request.claimed

    def close(self) -> None:
        """Write what was handed in, then stop the thread (after the senders have stopped)."""
        if self.thread is not None:
            self.requests.put(_STOP)
            self.thread.join()
        for connection in self._connections:
            connection.close()

    def _connection(self) -> Connection:
        """This sender thread's own connection (PostgreSQL)."""
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self.engine.connect()
            self._connections.append(connection)
        return connection

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # e.g. no connection: the senders raise it, not hang
            self.failed = exc

    def _serve(self) -> None:
        with self.engine.connect() as connection:
            while True:
                first = self.requests.get()
                if first is _STOP:
                    return
                batch = [first]
                stop = False
                while True:  # whatever else was handed in meanwhile goes in the same commit
                    try:
                        more = self.requests.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        stop = True
                        break
                    batch.append(more)
                self._commit(connection, batch)
                if stop:
                    return

    def _commit(self, connection: Connection, batch: list[_Request]) -> None:
        marks = [mark for request in batch for mark in request.marks]
        claims = [request for request in batch if request.claim is not None]
        try:
            with connection.begin():
                self._write_marks(connection, marks)
                for request in claims:
                    params = {"report": request.claim, **self.claim_params}
                    request.claimed = connection.execute(self._claim, params).first() is not None
        except Exception as exc:
            for request in batch:
                request.claimed = False
            self._retry_marks(connection, batch, marks, exc)
        else:
            for request in batch:
                request.marked = True
        for request in batch:
            request.done.set()

    def _retry_marks(
        self,
        connection: Connection,
        batch: list[_Request],
        marks: list[dict[str, Any]],
        exc: Exception,
    ) -> None:
        """After a failed commit: the marks alone; every request that claimed gets the error."""
        try:
            if marks:
                with connection.begin():
                    self._write_marks(connection, marks)
        except Exception as again:
            for request in batch:
                request.error = again
            return
        for request in batch:
            request.marked = True
            if request.claim is not None:
                request.error = exc

    def _write_marks(self, connection: Connection, marks: list[dict[str, Any]]) -> None:
        if not marks:
            return
        if connection.dialect.name == "postgresql":
            # Durable against our own crash once the server has it; a crash of the server
            # itself may lose the last marks, and with them send those reports again.
            connection.execute(text("SET LOCAL synchronous_commit = off"))
        connection.execute(self._mark, marks)
