"""The threads that send rendered reports, each report once, each thread on its own connection.

A sender claims a report just before sending it (another sender leaves it alone for
``CLAIM``), and marks it sent the moment the relay has said 250. A crash leaves at
most one claimed, unsent report per thread, sent again once its claim runs out; a
crash between the 250 and the mark (one small commit) sends that one twice.

When the next report is already queued, the mark of the last one and the claim of
the next go in the same commit: the mark is no later for it, and a crash before that
commit leaves the same state as before, the last report claimed and unmarked, the
next not claimed. The commits of all the threads are the ``report_ledger``'s, one
thread that writes what every sender handed in meanwhile in one transaction; the
relay connections pipeline each report's envelope (``report_relay``)."""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import bindparam, or_, update
from sqlalchemy.orm import Session, sessionmaker

from cleanmail import logs, mailer, report_ledger, report_relay, stats
from cleanmail.models import Report, ReportStatus
from cleanmail.relay import Relay, RelayError

BACKOFF = (timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=15), timedelta(hours=1))
GIVE_UP = timedelta(hours=48)  # then a report is marked failed, for an operator to see
CLAIM = timedelta(minutes=10)  # a report being sent is not taken by another sender meanwhile

log = logging.getLogger(__name__)


_reports = Report.__table__.c
# Built once: constructing a statement cost more than running it, twice per report.
_CLAIM = (
    update(Report.__table__)
    .where(
        _reports.id == bindparam("report"),
        _reports.status == ReportStatus.PENDING,
        or_(_reports.next_attempt_at.is_(None), _reports.next_attempt_at <= bindparam("now")),
    )
    .values(next_attempt_at=bindparam("until"))
    .returning(_reports.id)
)
_MARK_SENT = (
    update(Report.__table__)
    .where(_reports.id == bindparam("report"))
    .values(
        status=ReportStatus.SENT,
        sent_at=bindparam("now"),
        next_attempt_at=None,
        message_id_header=bindparam("message_id"),
    )
)


def record_failure(session: Session, report_id: int, error: RelayError, now: datetime) -> None:
    """Count a failed attempt and set the next one; give up after ``GIVE_UP``."""
    report = session.get(Report, report_id)
    assert report is not None
    report.attempts += 1
    report.last_error = str(error)[:1000]
    report.next_attempt_at = now + BACKOFF[min(report.attempts, len(BACKOFF)) - 1]
    if now - report.created_at >= GIVE_UP:
        report.status = ReportStatus.FAILED


class Taken(NamedTuple):
    """A report the relay has taken (said 250 to), to be marked sent."""

    report_id: int
    to: str
    message_id: str


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
        # Claims and marks through one ledger thread and connection for all the senders,
        # with SQLite's synchronous=NORMAL: a commit that survives our own crash (the one
        # that matters here) without an fsync per report.
        engine = sessions.kw["bind"].execution_options(
            cleanmail_immediate=True, cleanmail_relaxed=True
        )
        self.ledger = report_ledger.Ledger(engine, _CLAIM, _MARK_SENT, now, now + CLAIM)
        self.sessions = sessions
        self.relay = report_relay.pipelined(relay)
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
        self.ledger.close()
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
            taken: Taken | None = None  # the relay said 250; not marked yet
            while True:
                try:  # with a report to mark, only take the next one if it is there
                    item = self.work.get(block=taken is None)
                except queue.Empty:
                    self._mark(taken)  # at once: nothing else to do first
                    taken = None
                    continue
                if item is None or self.tally.error is not None:
                    self._mark(taken)
                    taken = None
                    if item is None:
                        break
                    continue
                taken = self._send(taken, *item)
        except BaseException as exc:  # handed to the feeding thread by put() and close()
            self.tally.error = exc
            while self.work.get() is not None:  # drain, so that put() never blocks for good
                pass
        finally:
            self.relay.close()  # this thread's connection

    def _send(
        self,
        taken: Taken | None,
        report_id: int,
        to: str,
        message_id: str,
        raw: bytes,
    ) -> Taken | None:
        """Mark the last report sent and claim this one (one commit), send it; what to mark."""
        try:
            claimed = self.ledger.write(self._marks(taken), report_id)
        except report_ledger.LedgerError as exc:
            if exc.marked:  # the ledger wrote the mark alone when the claim failed
                self._sent(taken)
            raise
        self._sent(taken)
        if not claimed:
            return None  # another sender has it, or it went out meanwhile
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
            return None
        return Taken(report_id, to, message_id)

    def _marks(self, taken: Taken | None) -> list[dict[str, object]]:
        if taken is None:
            return []
        return [{"report": taken.report_id, "now": self.now, "message_id": taken.message_id[:255]}]

    def _mark(self, taken: Taken | None) -> None:
        if taken is not None:
            self.ledger.write(self._marks(taken), None)
            self._sent(taken)

    def _sent(self, taken: Taken | None) -> None:
        if taken is None:
            return
        with self.tally.lock:
            self.tally.sent += 1
            self.tally.sent_by_domain[stats.address_domain(taken.to)] += 1
        logs.event(log, "report.sent", report_id=taken.report_id, mailbox=taken.to)
