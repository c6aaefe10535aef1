"""Quarantine reports: who is due, claiming what is new, sending each report once.

A report is prepared in one transaction (a pending ``reports`` row, its messages
marked with its id, the mailbox's ``last_report_at`` moved on) and sent later, so a
crash between the two steps leaves a pending report that the next run sends: no
owner gets a second report for the same messages, and none is skipped.

Sending streams the pending reports a batch at a time: the batch's rows are read in
one query and rendered, and a few threads (``report_senders``), each with its own
relay connection, claim each report just before sending it (another sender leaves it
alone for ``CLAIM``) and mark it sent the moment the relay has said 250. A crash
between that 250 and the mark (one small commit) is the one case that sends a report
twice, after ``CLAIM``, with the same Message-ID.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from cleanmail import mailboxes, report_mail, report_senders, report_workers
from cleanmail.config import Config
from cleanmail.db import Database
from cleanmail.models import Domain, Mailbox, Message, Report, ReportRun, ReportStatus, Status
from cleanmail.models import ReportFrequency as Frequency
from cleanmail.relay import Relay
from cleanmail.report_senders import BACKOFF, CLAIM, GIVE_UP  # noqa: F401 - part of this API

REPORT_ROWS = 50  # messages listed in one report; the rest are "and N more"
BATCH = 500  # mailboxes prepared, or reports read, per transaction: a run never holds them all


@dataclass
class RunResult:
    """What one run did: its id, reports prepared, sent and failed."""

    run_id: int | None
    prepared: int = 0
    sent: int = 0
    failed: int = 0


def is_due(mailbox: Any, now: datetime) -> bool:
    """True when the mailbox's report time has come since its last report."""
    last = mailbox.last_report_at
    if mailbox.report_frequency == Frequency.HOURLY:
        return last is None or last <= now - timedelta(hours=1)
    local = now.astimezone(mailboxes.time_zone(mailbox.timezone))
    day = local.date()
    if mailbox.report_frequency == Frequency.WEEKLY:
        day -= timedelta(days=day.weekday())  # this week's Monday
    slot = datetime.combine(day, time(mailbox.report_hour % 24), tzinfo=local.tzinfo)
    return now >= slot and (last is None or last < slot)


# What is_due() reads of a mailbox.
SCHEDULE = (
    Mailbox.id,
    Mailbox.report_frequency,
    Mailbox.timezone,
    Mailbox.report_hour,
    Mailbox.last_report_at,
)


def _candidates(mailbox: str | None) -> Any:
    """Mailboxes that want reports and have new messages no report has covered."""
    uncovered = exists().where(
        Message.mailbox_id == Mailbox.id,
        Message.status == Status.NEW,
        Message.report_id.is_(None),
    )
    query = (
        select(*SCHEDULE)
        .outerjoin(Domain, Domain.id == Mailbox.domain_id)
        .where(
            Mailbox.disabled.is_(False),
            Mailbox.report_frequency != Frequency.NEVER,
            or_(
                Mailbox.report_frequency != Frequency.HOURLY,
                Domain.allow_hourly_reports.is_(True),
            ),
            uncovered,
        )
    )
    if mailbox is not None:
        query = query.where(Mailbox.address == mailbox.strip().lower())
    return query


def due_batches(
    session: Session, now: datetime, *, mailbox: str | None = None, ignore_schedule: bool = False
) -> Iterator[list[int]]:
    """The ids of mailboxes whose report is due, a batch at a time (keyset, not offset)."""
    last_id = 0
    while True:
        query = _candidates(mailbox).where(Mailbox.id > last_id).order_by(Mailbox.id).limit(BATCH)
        batch = session.execute(query).all()
        if not batch:
            return
        due = [row.id for row in batch if ignore_schedule or is_due(row, now)]
        if due:
            yield due
        last_id = batch[-1].id


def due_mailboxes(
    session: Session, now: datetime, *, mailbox: str | None = None, ignore_schedule: bool = False
) -> Iterator[int]:
    """The ids of mailboxes whose report is due, read a batch at a time."""
    for batch in due_batches(session, now, mailbox=mailbox, ignore_schedule=ignore_schedule):
        yield from batch


def _uncovered(mailbox_id: Any) -> Any:
    return (
        Message.mailbox_id == mailbox_id,
        Message.status == Status.NEW,
        Message.report_id.is_(None),
    )


def count_new(session: Session, mailbox_id: int) -> int:
    """How many new messages of a mailbox no report has covered yet."""
    query = select(func.count()).select_from(Message).where(*_uncovered(mailbox_id))
    return session.scalar(query) or 0


def prepare_batch(
    session: Session,
    mailbox_ids: Sequence[int],
    run: ReportRun | None,
    now: datetime,
    *,
    check_due: bool = False,
) -> dict[int, tuple[int, int]]:
    """Claim the uncovered new messages of several mailboxes for pending reports.

    Returns ``{mailbox_id: (report_id, message_count)}`` for the mailboxes that had
    something new. A few statements for the whole batch, whatever its size.
    """
    # The mailbox rows are the lock: two runs preparing the same mailbox take turns.
    locked = session.execute(
        select(*SCHEDULE).where(Mailbox.id.in_(mailbox_ids)).order_by(Mailbox.id).with_for_update()
    ).all()
    due = [row.id for row in locked if not check_due or is_due(row, now)]
    if not due:
        return {}
    connection = session.connection()
    created = connection.execute(
        insert(Report.__table__).returning(
            Report.__table__.c.id, Report.__table__.c.mailbox_id, sort_by_parameter_order=True
        ),
        [
            {
                "mailbox_id": mailbox_id,
                "run_id": run.id if run is not None else None,
                "created_at": now,
                "status": ReportStatus.PENDING,
                "message_count": 0,
                "attempts": 0,
                "message_id_header": "",
            }
            for mailbox_id in due
        ],
    ).all()
    report_of = {mailbox_id: report_id for report_id, mailbox_id in created}
    messages = Message.__table__.c
    connection.execute(
        update(Message.__table__)
        .where(*_uncovered_columns(messages))
        .values(report_id=bindparam("report")),
        [{"mailbox": mailbox, "report": report} for mailbox, report in report_of.items()],
    )
    counts = dict(
        connection.execute(
            select(messages.report_id, func.count())
            .where(messages.report_id.in_(report_of.values()))
            .group_by(messages.report_id)
        ).all()
    )
    prepared = {
        mailbox_id: (report_id, counts[report_id])
        for mailbox_id, report_id in report_of.items()
        if counts.get(report_id)
    }
    empty = [report_id for report_id in report_of.values() if not counts.get(report_id)]
    if empty:  # nothing new after all (a purge or a release got there first)
        connection.execute(delete(Report.__table__).where(Report.__table__.c.id.in_(empty)))
    if prepared:
        connection.execute(
            update(Report.__table__)
            .where(Report.__table__.c.id == bindparam("report"))
            .values(message_count=bindparam("count")),
            [{"report": report, "count": count} for report, count in prepared.values()],
        )
        connection.execute(
            update(Mailbox.__table__)
            .where(Mailbox.__table__.c.id.in_(prepared))
            .values(last_report_at=now)
        )
    session.expire_all()  # the ORM objects of this session must see the new state
    return prepared


def _uncovered_columns(messages: Any) -> Any:
    return (
        messages.mailbox_id == bindparam("mailbox"),
        messages.status == Status.NEW,
        messages.report_id.is_(None),
    )


def prepare(
    session: Session,
    mailbox_id: int,
    run: ReportRun | None,
    now: datetime,
    *,
    check_due: bool = False,
) -> Report | None:
    """Claim one mailbox's uncovered new messages for a pending report; None if nothing is new."""
    prepared = prepare_batch(session, [mailbox_id], run, now, check_due=check_due)
    if mailbox_id not in prepared:
        return None
    return session.get(Report, prepared[mailbox_id][0])


def render_report(session: Session, report: Report, config: Config) -> bytes:
    """The report mail in the owner's language, ready for the relay."""
    (to,) = report_mail.addressees(session, [report.id])
    rows = report_mail.listed(session, [report.id], REPORT_ROWS).get(report.id, [])
    return report_mail.Renderer(config).render(to, rows)


def send_one(
    sessions: sessionmaker[Session], relay: Relay, config: Config, report_id: int, now: datetime
) -> bool | None:
    """Send one pending report now: True sent, False failed this time, None taken by another."""
    with sessions() as session:
        found = report_mail.addressees(session, [report_id])
        if not found:
            return None
        (to,) = found
        rows = report_mail.listed(session, [report_id], REPORT_ROWS).get(report_id, [])
    raw = report_mail.Renderer(config).render(to, rows)
    pool = report_senders.Senders(sessions, relay, now, 1)
    try:
        pool.put(report_id, to.address, report_mail.message_id(to, config.hostname), raw)
    finally:
        pool.close()
    if pool.tally.sent:
        return True
    return False if pool.tally.failed else None


def _ready(now: datetime, run_id: int | None = None) -> Any:
    query = select(Report.id).where(
        Report.status == ReportStatus.PENDING,
        or_(Report.next_attempt_at.is_(None), Report.next_attempt_at <= now),
    )
    if run_id is not None:  # not the run's own: they are sent as they are prepared
        query = query.where(or_(Report.run_id.is_(None), Report.run_id != run_id))
    return query


def send_pending(
    sessions: sessionmaker[Session],
    relay: Relay,
    config: Config,
    now: datetime,
    *,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    senders: int | None = None,
    processes: int | None = None,
    first: Iterator[list[int]] | None = None,
    run_id: int | None = None,
    expected: int = 0,
) -> tuple[int, int]:
    """Send every pending report that is due for an attempt; (sent, failed).

    ``first``: batches of report ids to send before the others (a run's, as it prepares
    them, ``expected`` of them), which are then left out of the rest by their ``run_id``.
    """
    processes = processes or config.report_processes
    ahead: list[list[int]] = []
    for batch in first or ():  # enough to tell whether worker processes are worth starting
        ahead.append(batch)
        if sum(map(len, ahead)) >= report_workers.PROCESSES_FROM:
            break
    total = 0
    if progress is not None or processes > 1:
        with sessions() as session:
            query = _ready(now, run_id).subquery()
            total = session.scalar(select(func.count()).select_from(query)) or 0
        total = total if limit is None else min(total, limit)
    total += max(expected, sum(map(len, ahead)))
    if progress is not None:
        progress(0, total)
    senders = senders or config.report_senders
    batches = itertools.chain(ahead, first or (), _pending_batches(sessions, now, limit, run_id))
    if processes > 1 and total >= report_workers.PROCESSES_FROM and report_workers.usable(sessions):
        told = None if progress is None else lambda done: progress(done, total)
        return report_workers.send(
            sessions, relay, config, now, batches,
            processes=processes, senders=senders, rows=REPORT_ROWS, progress=told,
        )  # fmt: skip
    renderer = report_mail.Renderer(config)
    pool = report_senders.Senders(sessions, relay, now, senders)
    try:
        for ids in batches:
            report_workers.send_batch(sessions, renderer, pool, ids, REPORT_ROWS)
            if progress is not None:
                progress(pool.tally.sent + pool.tally.failed, total)
    finally:
        pool.close()
    if progress is not None:
        progress(pool.tally.sent + pool.tally.failed, total)
    return pool.tally.sent, pool.tally.failed


def _pending_batches(
    sessions: sessionmaker[Session], now: datetime, limit: int | None, run_id: int | None = None
) -> Iterator[list[int]]:
    """The ids of the reports due for an attempt, a batch at a time (keyset), at most ``limit``."""
    taken = last_id = 0
    while limit is None or taken < limit:
        with sessions() as session:
            query = _ready(now, run_id).where(Report.id > last_id).order_by(Report.id).limit(BATCH)
            ids = list(session.scalars(query).all())
        if not ids:
            return
        last_id = ids[-1]
        ids = ids[: None if limit is None else limit - taken]
        taken += len(ids)
        yield ids


def run(
    database: Database,
    relay: Relay | None,
    config: Config,
    now: datetime,
    *,
    trigger: str,
    mailbox: str | None = None,
    dry_run: bool = False,
    ignore_schedule: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_mailbox: Callable[[str, int], None] | None = None,
) -> RunResult:
    """One pass: a report for each due mailbox, then send what is pending (dry run: count only).

    The reports go out as they are prepared, a batch at a time, then those left from
    earlier runs (retries, or a run that stopped half-way).
    """
    if dry_run:
        return _dry_run(database, now, mailbox, ignore_schedule, on_mailbox)
    assert relay is not None, "a run that sends needs a relay"
    with database.session_scope(write=True) as session:
        report_run = ReportRun(started_at=now, trigger=trigger, node=socket.gethostname())
        session.add(report_run)
    result = RunResult(run_id=report_run.id)
    expected = 0
    if progress is not None:  # for the bar: at most this many (the schedule may leave some out)
        with database.sessions() as session:
            query = _candidates(mailbox).subquery()
            expected = session.scalar(select(func.count()).select_from(query)) or 0
    result.sent, result.failed = send_pending(
        database.write_sessions, relay, config, now, progress=progress,
        first=_prepared(database, report_run, now, mailbox, ignore_schedule, result, on_mailbox),
        run_id=report_run.id, expected=expected,
    )  # fmt: skip
    with database.session_scope(write=True) as session:
        stored = session.get(ReportRun, report_run.id)
        assert stored is not None
        stored.sent, stored.failed = result.sent, result.failed
        stored.finished_at = datetime.now(UTC)
    return result


def _prepared(
    database: Database,
    report_run: ReportRun,
    now: datetime,
    mailbox: str | None,
    ignore_schedule: bool,
    result: RunResult,
    on_mailbox: Callable[[str, int], None] | None,
) -> Iterator[list[int]]:
    """Prepare the reports of the due mailboxes a batch at a time (committed); their ids."""
    with database.sessions() as reader:
        for batch in due_batches(reader, now, mailbox=mailbox, ignore_schedule=ignore_schedule):
            with database.session_scope(write=True) as session:
                prepared = prepare_batch(
                    session, batch, report_run, now, check_due=not ignore_schedule
                )
                if on_mailbox is not None and prepared:
                    _tell(session, prepared, on_mailbox)
            result.prepared += len(prepared)
            # End the read between batches: on SQLite one read held across a whole run
            # keeps the WAL from being checkpointed while millions of rows change.
            reader.rollback()
            if prepared:
                yield sorted(report_id for report_id, _count in prepared.values())


def _dry_run(
    database: Database,
    now: datetime,
    mailbox: str | None,
    ignore_schedule: bool,
    on_mailbox: Callable[[str, int], None] | None,
) -> RunResult:
    result = RunResult(run_id=None)
    with database.sessions() as session:
        for mailbox_id in due_mailboxes(
            session, now, mailbox=mailbox, ignore_schedule=ignore_schedule
        ):
            address = session.get(Mailbox, mailbox_id).address  # type: ignore[union-attr]
            result.prepared += 1
            if on_mailbox is not None:
                on_mailbox(address, count_new(session, mailbox_id))
    return result


def _tell(
    session: Session, prepared: dict[int, tuple[int, int]], on_mailbox: Callable[[str, int], None]
) -> None:
    addresses = session.execute(
        select(Mailbox.id, Mailbox.address).where(Mailbox.id.in_(prepared)).order_by(Mailbox.id)
    ).all()
    for mailbox_id, address in addresses:
        on_mailbox(address, prepared[mailbox_id][1])


def status(session: Session) -> dict[str, Any]:
    """The last run and the reports waiting: what ``cleanmail reports status`` shows."""
    last = session.scalars(select(ReportRun).order_by(ReportRun.id.desc()).limit(1)).first()

    def count(*where: Any) -> int:
        return session.scalar(select(func.count()).select_from(Report).where(*where)) or 0

    errors = session.execute(
        select(Report.id, Report.attempts, Report.next_attempt_at, Report.last_error)
        .where(Report.status == ReportStatus.PENDING, Report.attempts > 0)
        .order_by(Report.id)
        .limit(10)
    ).all()
    fields = ("started_at", "finished_at", "trigger", "sent", "failed")
    return {
        "last_run": None if last is None else {name: getattr(last, name) for name in fields},
        "pending": count(Report.status == ReportStatus.PENDING),
        "retrying": count(Report.status == ReportStatus.PENDING, Report.attempts > 0),
        "failed": count(Report.status == ReportStatus.FAILED),
        "sent": count(Report.status == ReportStatus.SENT),
        "retries": [row._asdict() for row in errors],
    }
