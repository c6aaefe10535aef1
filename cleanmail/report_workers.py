"""Sending a large run of reports from several processes, so that it is not held to one core.

Rendering and the SMTP client cost about as much CPU as the relay's side, and one
Python process runs them on one core (the GIL). Past ``PROCESSES_FROM`` pending
reports, the calling process reads the pending ids a batch at a time and hands the
batches out through a bounded queue (memory stays flat); each worker process reads
its batch's rows, renders them and sends them with its own sender threads, which
claim and mark each report exactly as in one process (``report_senders``).

A worker dies with the process that started it (``PR_SET_PDEATHSIG``), so a killed
run leaves what a killed single process leaves: at most one claimed, unsent report
per sender thread, sent again once its claim runs out.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from cleanmail import db, logs, report_mail, report_senders
from cleanmail.config import Config, Endpoint
from cleanmail.relay import Relay

PROCESSES_FROM = 1000  # fewer pending reports go out from the calling process alone
STOP_WAIT = 60.0  # seconds a worker gets to finish its batch when the run stops early
_PR_SET_PDEATHSIG = 1


def send_batch(
    sessions: sessionmaker[Session],
    renderer: report_mail.Renderer,
    pool: report_senders.Senders,
    ids: Sequence[int],
    rows: int,
) -> None:
    """Read one batch of reports (two queries), render them and queue them for the senders."""
    # A read that does not take SQLite's write lock (the sessions given are for writing):
    # rendered here, claimed one by one when sent.
    reading = sessions.kw["bind"].execution_options(cleanmail_immediate=False)
    with Session(reading) as session:
        addressees = report_mail.addressees(session, ids)
        listed = report_mail.listed(session, ids, rows)
    hostname = renderer.config.hostname
    for to in addressees:
        raw = renderer.render(to, listed.get(to.report_id, []))
        pool.put(to.report_id, to.address, report_mail.message_id(to, hostname), raw)


def usable(sessions: sessionmaker[Session]) -> bool:
    """True when other processes can open the same database (not an in-memory SQLite)."""
    url = sessions.kw["bind"].url
    return not (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"))


def send(
    sessions: sessionmaker[Session],
    relay: Relay,
    config: Config,
    now: datetime,
    batches: Iterable[Sequence[int]],
    *,
    processes: int,
    senders: int,
    rows: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Send the reports of ``batches`` from ``processes`` worker processes; (sent, failed)."""
    context = multiprocessing.get_context("spawn")  # not fork: the caller may run threads
    work: Any = context.Queue(processes * 2)
    results: Any = context.Queue()
    url = sessions.kw["bind"].url.render_as_string(hide_password=False)
    relay_args = (relay.endpoint, relay.timeout, relay.hostname)
    args = (os.getpid(), url, relay_args, config, now, senders, rows, work, results)
    workers = [
        context.Process(target=_worker, args=args, name=f"report-worker-{n}", daemon=True)
        for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    tally = _Tally(workers, results, progress)
    try:
        for ids in batches:
            tally.hand_out(work, list(ids))
        for _worker_process in workers:
            tally.hand_out(work, None)
        tally.wait()
    finally:
        if tally.done < len(workers):  # trouble: let the others finish what they hold
            for _worker_process in workers:
                with contextlib.suppress(queue.Full):
                    work.put_nowait(None)
        for worker in workers:
            worker.join(timeout=STOP_WAIT)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    if tally.error is not None:
        raise RuntimeError(f"a report worker failed: {tally.error}")
    return tally.sent, tally.failed


class _Tally:
    """What the workers said: progress while they send, their counts when they are done."""

    def __init__(
        self, workers: list[Any], results: Any, progress: Callable[[int], None] | None
    ) -> None:
        self.workers = workers
        self.results = results
        self.progress = progress
        self.sent = self.failed = self.done = self.seen = 0
        self.error: str | None = None

    def hand_out(self, work: Any, ids: list[int] | None) -> None:
        """Queue a batch (None: no more) while reading what the workers say."""
        while True:
            self.check()
            try:
                work.put(ids, timeout=0.2)
                return
            except queue.Full:
                continue

    def wait(self) -> None:
        """Until every worker has said it is done."""
        while self.done < len(self.workers):
            self.check(block=True)

    def check(self, *, block: bool = False) -> None:
        """Read what the workers said; raise when one failed or died."""
        while True:
            try:
                kind, *values = self.results.get(timeout=0.2 if block else 0)
            except queue.Empty:
                break
            if kind == "progress":
                self.seen += values[0]
                if self.progress is not None:
                    self.progress(self.seen)
            elif kind == "done":
                self.sent += values[0]
                self.failed += values[1]
                self.done += 1
            else:
                self.error = values[0]
            block = False
        if self.error is None and self.done < len(self.workers):
            dead = [w for w in self.workers if w.exitcode not in (None, 0)]
            if dead:
                self.error = f"{dead[0].name} exited with {dead[0].exitcode}"
        if self.error is not None:
            raise RuntimeError(f"a report worker failed: {self.error}")


def _worker(
    parent: int,
    url: str,
    relay_args: tuple[Endpoint, float, str],
    config: Config,
    now: datetime,
    senders: int,
    rows: int,
    work: Any,
    results: Any,
) -> None:
    """One worker process: batches of ids in, reports out, counts back to the parent."""
    _die_with(parent)
    logs.configure(config.log_level, config.log_format)
    database = db.Database(url, pool_size=senders + 1)
    endpoint, timeout, hostname = relay_args
    relay = Relay(endpoint, timeout=timeout, hostname=hostname)
    renderer = report_mail.Renderer(config)
    try:
        pool = report_senders.Senders(database.write_sessions, relay, now, senders)
        try:
            while (ids := work.get()) is not None:
                send_batch(database.write_sessions, renderer, pool, ids, rows)
                results.put(("progress", len(ids)))
        finally:
            pool.close()  # the threads mark what the relay took before the process ends
        results.put(("done", pool.tally.sent, pool.tally.failed))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        relay.close()
        database.dispose()


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux), as a thread would be."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the daemon flag still ends it on a clean exit
        return
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)
