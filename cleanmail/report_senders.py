"""The threads that send rendered reports, each report once, each thread on its own connection.

A sender claims a report just before sending it (another sender leaves it alone for
``CLAIM``), and marks it sent the moment the relay has said 250. A crash leaves at
most one claimed, unsent report per thread, sent again once its claim runs out; a
crash between the 250 and the mark (one small commit) sends that one twice.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from cleanmail import logs, mailer, stats
from cleanmail.models import Report, ReportStatus
from cleanmail.relay import Relay, RelayError

BACKOFF = (timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=15), timedelta(hours=1))
GIVE_UP = timedelta(hours=48)  # then a report is marked failed, for an operator to see
CLAIM = timedelta(minutes=10)  # a report being sent is not taken by another sender meanwhile

log = logging.getLogger(__name__)


def claim(connection: Connection, report_ids: Sequence[int], now: datetime) -> list[int]:
    """Take the due pending ones of these reports for this sender; others are left out."""
    table = Report.__table__.c
    claimed = connection.execute(
        update(Report.__table__)
        .where(
            table.id.in_(report_ids),
            table.status == ReportStatus.PENDING,
            or_(table.next_attempt_at.is_(None), table.next_attempt_at <= now),
        )
        .values(next_attempt_at=now + CLAIM)
        .returning(table.id)
    )
    return sorted(claimed.scalars())


def record_failure(session: Session, report_id: int, error: RelayError, now: datetime) -> None:
    """Count a failed attempt and set the next one; give up after ``GIVE_UP``."""
    report = session.get(Report, report_id)
    assert report is not None
    report.attempts += 1
    report.last_error = str(error)[:1000]
    report.next_attempt_at = now + BACKOFF[min(report.attempts, len(BACKOFF)) - 1]
    if now - report.created_at >= GIVE_UP:
        report.status = ReportStatus.FAILED


def mark_sent(connection: Connection, report_id: int, message_id: str, now: datetime) -> None:
    """Record a report as sent (called the moment the relay has taken it)."""
    if connection.dialect.name == "postgresql":
        # Durable against our own crash once the server has it; a crash of the server
        # itself may lose the last marks, and with them send those reports again.
        connection.execute(text("SET LOCAL synchronous_commit = off"))
    connection.execute(
        update(Report.__table__)
        .where(Report.__table__.c.id == report_id)
        .values(
            status=ReportStatus.SENT,
            sent_at=now,
            next_attempt_at=None,
            message_id_header=message_id[:255],
        )
    )


@dataclass
class Tally:
    """What the sender threads did, shared with the thread that feeds them."""

    sent: int = 0
    failed: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.sent_by_domain: Counter[str] = Counter()  # for the daily statistics


class Senders:
    """A few threads that send rendered reports, each on its own relay connection.

    Each claims its report just before sending it, so a crash leaves at most one
    claimed and unsent report per thread (sent after ``CLAIM``), and marks it sent
    the moment the relay has taken it.
    """

    def __init__(
        self, sessions: sessionmaker[Session], relay: Relay, now: datetime, count: int
    ) -> None:
        # Claims and marks on a connection per thread, with SQLite's synchronous=NORMAL:
        # a commit that survives our own crash (the one that matters here) without an
        # fsync per report.
        self.engine = sessions.kw["bind"].execution_options(
            cleanmail_immediate=True, cleanmail_relaxed=True
        )
        self.sessions = sessions
        self.relay = relay
        self.now = now
        self.tally = Tally()
        self.work: queue.Queue[tuple[int, str, str, bytes] | None] = queue.Queue(count * 4)
        self.threads = [
            threading.Thread(target=self._run, name=f"report-sender-{n}", daemon=True)
            for n in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def put(self, report_id: int, to: str, message_id: str, raw: bytes) -> None:
        """Queue one report; raises what a sender thread died of."""
        while True:
            if self.tally.error is not None:
                raise self.tally.error
            try:
                self.work.put((report_id, to, message_id, raw), timeout=1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Let the threads finish the queue, and wait for them."""
        for _thread in self.threads:
            self.work.put(None)
        for thread in self.threads:
            thread.join()
        self._count_sent()
        if self.tally.error is not None:
            raise self.tally.error

    def _count_sent(self) -> None:
        """Add the reports sent to the daily statistics, once per run rather than per report."""
        day = stats.today()
        counts = {
            (day, domain, "reports_sent"): n for domain, n in self.tally.sent_by_domain.items()
        }
        with self.sessions.begin() as session:
            stats.add(session, counts)

    def _run(self) -> None:
        try:
            with self.engine.connect() as connection:
                while (item := self.work.get()) is not None:
                    if self.tally.error is None:
                        self._send(connection, *item)
        except BaseException as exc:  # handed to the feeding thread by put() and close()
            self.tally.error = exc
            while self.work.get() is not None:  # drain, so that put() never blocks for good
                pass
        finally:
            self.relay.close()  # this thread's connection

    def _send(
        self, connection: Connection, report_id: int, to: str, message_id: str, raw: bytes
    ) -> None:
        with connection.begin():
            if not claim(connection, [report_id], self.now):
                return  # another sender has it, or it went out meanwhile
        try:
            mailer.send(self.relay, raw, to)
        except RelayError as exc:
            with self.sessions.begin() as session:
                record_failure(session, report_id, exc, self.now)
                stats.bump(session, "reports_failed", stats.address_domain(to))
            with self.tally.lock:
                self.tally.failed += 1
            logs.event(
                log,
                "report.failed",
                level=logging.WARNING,
                report_id=report_id,
                mailbox=to,
                error=str(exc),
            )
            return
        with connection.begin():  # at once: the 250 is in, the mark is not yet
            mark_sent(connection, report_id, message_id, self.now)
        with self.tally.lock:
            self.tally.sent += 1
            self.tally.sent_by_domain[stats.address_domain(to)] += 1
        logs.event(log, "report.sent", report_id=report_id, mailbox=to)
