"""Quarantine reports: who is due, claiming what is new, building the mail, sending it once.

A report is prepared in one transaction (a pending ``reports`` row, its messages
marked with its id, the mailbox's ``last_report_at`` moved on) and sent later, so a
crash between the two steps leaves a pending report that the next run sends: no
owner gets a second report for the same messages, and none is skipped.
"""

from __future__ import annotations

import email.parser
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from typing import Any

from babel.dates import format_datetime
from flask import Flask
from flask_babel import Babel, force_locale
from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from cleanmail import logs, mailboxes, mailer, reasons, stats, tokens
from cleanmail.config import Config
from cleanmail.db import Database
from cleanmail.models import Domain, Mailbox, Message, Report, ReportRun, ReportStatus, Status
from cleanmail.models import ReportFrequency as Frequency
from cleanmail.relay import Relay, RelayError

log = logging.getLogger(__name__)

REPORT_ROWS = 50  # messages listed in one report; the rest are "and N more"
BATCH = 1000  # mailboxes or reports read per query, so a run never holds them all
BACKOFF = (timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=15), timedelta(hours=1))
GIVE_UP = timedelta(hours=48)  # then a report is marked failed, for an operator to see
CLAIM = timedelta(minutes=10)  # a report being sent is not taken by another sender meanwhile
LANGUAGES = ("nb", "da", "en")


@dataclass
class RunResult:
    """What one run did: its id, reports prepared, sent and failed."""

    run_id: int | None
    prepared: int = 0
    sent: int = 0
    failed: int = 0


def is_due(mailbox: Mailbox, now: datetime) -> bool:
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


def _candidates(mailbox: str | None) -> Any:
    """Mailboxes that want reports and have new messages no report has covered."""
    uncovered = exists().where(
        Message.mailbox_id == Mailbox.id,
        Message.status == Status.NEW,
        Message.report_id.is_(None),
    )
    query = (
        select(Mailbox)
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


def due_mailboxes(
    session: Session, now: datetime, *, mailbox: str | None = None, ignore_schedule: bool = False
) -> Iterator[int]:
    """The ids of mailboxes whose report is due, read a batch at a time."""
    last_id = 0
    while True:
        query = _candidates(mailbox).where(Mailbox.id > last_id).order_by(Mailbox.id).limit(BATCH)
        batch = session.scalars(query).all()
        if not batch:
            return
        for row in batch:
            if ignore_schedule or is_due(row, now):
                yield row.id
        last_id = batch[-1].id
        session.expunge_all()  # keep memory flat over 100,000 mailboxes


def _uncovered(mailbox_id: int) -> Any:
    return (
        Message.mailbox_id == mailbox_id,
        Message.status == Status.NEW,
        Message.report_id.is_(None),
    )


def count_new(session: Session, mailbox_id: int) -> int:
    """How many new messages of a mailbox no report has covered yet."""
    query = select(func.count()).select_from(Message).where(*_uncovered(mailbox_id))
    return session.scalar(query) or 0


def prepare(
    session: Session,
    mailbox_id: int,
    run: ReportRun | None,
    now: datetime,
    *,
    check_due: bool = False,
) -> Report | None:
    """Claim a mailbox's uncovered new messages for a pending report; None if nothing is new."""
    # The mailbox row is the lock: two runs preparing the same mailbox take turns.
    mailbox = session.scalars(
        select(Mailbox).where(Mailbox.id == mailbox_id).with_for_update()
    ).one_or_none()
    if mailbox is None or (check_due and not is_due(mailbox, now)):
        return None
    if count_new(session, mailbox_id) == 0:
        return None
    report = Report(
        mailbox_id=mailbox_id,
        run_id=run.id if run is not None else None,
        created_at=now,
        status=ReportStatus.PENDING,
    )
    session.add(report)
    session.flush()
    claimed = session.execute(
        update(Message).where(*_uncovered(mailbox_id)).values(report_id=report.id),
        execution_options={"synchronize_session": False},
    )
    report.message_count = claimed.rowcount
    mailbox.last_report_at = now
    session.flush()
    return report


@lru_cache(maxsize=1)
def _babel_app() -> Flask:
    """A bare Flask app, only so that the reason texts (lazy_gettext) can be translated."""
    app = Flask(__name__)
    app.config["BABEL_TRANSLATION_DIRECTORIES"] = str(mailer.TRANSLATIONS)
    Babel(app)
    return app


def _clean(value: str, limit: int = 200) -> str:
    return " ".join((value or "").split())[:limit]


def render_report(session: Session, report: Report, config: Config) -> bytes:
    """The report mail in the owner's language, ready for the relay."""
    mailbox = session.get(Mailbox, report.mailbox_id)
    assert mailbox is not None
    language = mailbox.language if mailbox.language in LANGUAGES else "nb"
    zone = mailboxes.time_zone(mailbox.timezone)
    signer = tokens.Tokens(config.secret_keys)
    messages = session.scalars(
        select(Message)
        .where(Message.report_id == report.id)
        .order_by(Message.received_at.desc(), Message.id.desc())
        .limit(REPORT_ROWS)
    ).all()
    rows = []
    with _babel_app().app_context(), force_locale(language):
        for message in messages:
            token = signer.dump(
                "release", {"m": mailbox.id, "v": mailbox.key_version, "id": message.id}
            )
            top = reasons.top(message.reasons or [], 1)
            rows.append(
                {
                    "date": format_datetime(
                        message.received_at, "short", tzinfo=zone, locale=language
                    ),
                    "sender": _clean(message.from_address or message.envelope_sender, 320),
                    "subject": _clean(message.subject),
                    "reason": _clean(reasons.describe(top[0])) if top else "",
                    "release_url": f"{config.base_url}/r/{token}",
                    "allow_url": f"{config.base_url}/r/{token}?allow=1",
                }
            )
    rendered = mailer.render(
        "report",
        language,
        lang=language,
        address=mailbox.address,
        count=report.message_count,
        rows=rows,
        more=max(report.message_count - len(rows), 0),
        overview_url=tokens.login_url(
            config.base_url, config.secret_keys, mailbox.id, mailbox.key_version
        ),
        settings_url=f"{config.base_url}/settings/",
        retention_days=config.retention_days,
        link_days=tokens.LOGIN_LINK_DAYS,
    )
    return mailer.build(
        rendered, sender=config.mail_from, to=mailbox.address, domain=config.hostname
    )


def _claim(session: Session, report_id: int, now: datetime) -> bool:
    """Take a due pending report for this sender; False when another took it first."""
    claimed = session.execute(
        update(Report)
        .where(
            Report.id == report_id,
            Report.status == ReportStatus.PENDING,
            or_(Report.next_attempt_at.is_(None), Report.next_attempt_at <= now),
        )
        .values(next_attempt_at=now + CLAIM),
        execution_options={"synchronize_session": False},
    )
    return claimed.rowcount == 1


def _record_failure(report: Report, error: RelayError, now: datetime) -> None:
    report.attempts += 1
    report.last_error = str(error)[:1000]
    report.next_attempt_at = now + BACKOFF[min(report.attempts, len(BACKOFF)) - 1]
    if now - report.created_at >= GIVE_UP:
        report.status = ReportStatus.FAILED


def send_one(
    sessions: sessionmaker[Session], relay: Relay, config: Config, report_id: int, now: datetime
) -> bool | None:
    """Send one pending report: True sent, False failed this time, None taken by another."""
    with sessions.begin() as session:
        if not _claim(session, report_id, now):
            return None
        report = session.get(Report, report_id)
        assert report is not None
        raw = render_report(session, report, config)
        to = session.get(Mailbox, report.mailbox_id).address  # type: ignore[union-attr]
    try:
        mailer.send(relay, raw, to)
    except RelayError as exc:
        with sessions.begin() as session:
            report = session.get(Report, report_id)
            assert report is not None
            _record_failure(report, exc, now)
            stats.bump(session, "reports_failed", stats.address_domain(to))
        logs.event(
            log,
            "report.failed",
            level=logging.WARNING,
            report_id=report_id,
            mailbox=to,
            error=str(exc),
        )
        return False
    headers = email.parser.BytesHeaderParser().parsebytes(raw)
    with sessions.begin() as session:
        report = session.get(Report, report_id)
        assert report is not None
        report.status = ReportStatus.SENT
        report.sent_at = now
        report.next_attempt_at = None
        report.message_id_header = str(headers["Message-ID"] or "")[:255]
        stats.bump(session, "reports_sent", stats.address_domain(to))
    logs.event(log, "report.sent", report_id=report_id, mailbox=to)
    return True


def _ready(now: datetime) -> Any:
    return select(Report.id).where(
        Report.status == ReportStatus.PENDING,
        or_(Report.next_attempt_at.is_(None), Report.next_attempt_at <= now),
    )


def send_pending(
    sessions: sessionmaker[Session],
    relay: Relay,
    config: Config,
    now: datetime,
    *,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Send every pending report that is due for an attempt; (sent, failed)."""
    sent = failed = total = 0
    if progress is not None:
        with sessions() as session:
            total = session.scalar(select(func.count()).select_from(_ready(now).subquery())) or 0
        progress(0, total)
    last_id = 0
    while limit is None or sent + failed < limit:
        with sessions() as session:
            query = _ready(now).where(Report.id > last_id).order_by(Report.id).limit(BATCH)
            ids = session.scalars(query).all()
        if not ids:
            break
        for report_id in ids[: None if limit is None else limit - sent - failed]:
            outcome = send_one(sessions, relay, config, report_id, now)
            sent += outcome is True
            failed += outcome is False
            if progress is not None:
                progress(sent + failed, total)
        last_id = ids[-1]
    return sent, failed


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
    """One pass: a report for each due mailbox, then send what is pending (dry run: count only)."""
    if dry_run:
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
    assert relay is not None, "a run that sends needs a relay"
    with database.session_scope(write=True) as session:
        report_run = ReportRun(started_at=now, trigger=trigger, node=socket.gethostname())
        session.add(report_run)
    result = RunResult(run_id=report_run.id)
    with database.sessions() as reader:
        for mailbox_id in due_mailboxes(
            reader, now, mailbox=mailbox, ignore_schedule=ignore_schedule
        ):
            with database.session_scope(write=True) as session:
                report = prepare(
                    session, mailbox_id, report_run, now, check_due=not ignore_schedule
                )
                if report is not None and on_mailbox is not None:
                    address = session.get(Mailbox, mailbox_id).address  # type: ignore[union-attr]
                    on_mailbox(address, report.message_count)
            result.prepared += report is not None
    result.sent, result.failed = send_pending(
        database.write_sessions, relay, config, now, progress=progress
    )
    with database.session_scope(write=True) as session:
        stored = session.get(ReportRun, report_run.id)
        assert stored is not None
        stored.sent, stored.failed = result.sent, result.failed
        stored.finished_at = datetime.now(UTC)
    return result


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
