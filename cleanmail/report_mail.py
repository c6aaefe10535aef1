"""The report as mail: a batch of reports' rows read in one query, rendered in the owner's language.

A run renders 100,000 reports of up to 50 rows, so what is the same for many rows is
done once: the signing key of the links, dates formatted per minute and language, the
reason texts per code and language, and templates compiled once per language.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from babel.dates import format_datetime
from flask import Flask
from flask_babel import Babel, force_locale
from sqlalchemy import String, func, select, type_coerce
from sqlalchemy.orm import Session

from cleanmail import mailboxes, mailer, reasons, tokens
from cleanmail.config import Config
from cleanmail.models import Mailbox, Message, Report

LANGUAGES = ("nb", "da", "en")


@dataclass(frozen=True)
class Addressee:
    """What a report's mail needs to know about its report and mailbox."""

    report_id: int
    created_at: datetime
    message_count: int
    mailbox_id: int
    address: str
    language: str
    timezone: str | None
    key_version: int


@dataclass(frozen=True, slots=True)
class Row:
    """One listed message, ready for the templates."""

    date: str
    sender: str
    subject: str
    reason: str
    release_url: str
    allow_url: str


def addressees(session: Session, report_ids: Sequence[int]) -> list[Addressee]:
    """The reports of a batch with their mailboxes, in report order (one query)."""
    query = (
        select(
            Report.id,
            Report.created_at,
            Report.message_count,
            Mailbox.id,
            Mailbox.address,
            Mailbox.language,
            Mailbox.timezone,
            Mailbox.key_version,
        )
        .join(Mailbox, Mailbox.id == Report.mailbox_id)
        .where(Report.id.in_(report_ids))
        .order_by(Report.id)
    )
    return [Addressee(*row) for row in session.execute(query)]


def listed(session: Session, report_ids: Sequence[int], limit: int) -> dict[int, list[Any]]:
    """The newest ``limit`` messages of each report, newest first (one query for the batch)."""
    rank = (
        func.row_number()
        .over(
            partition_by=Message.report_id,
            order_by=(Message.received_at.desc(), Message.id.desc()),
        )
        .label("rank")
    )
    # Dates and reasons come as the driver gives them (text on SQLite), and are decoded
    # in _row() in C: SQLAlchemy's type processing cost more than the rest of a row.
    ranked = (
        select(
            Message.report_id,
            Message.id,
            type_coerce(Message.received_at, String).label("received_at"),
            Message.from_address,
            Message.envelope_sender,
            Message.subject,
            type_coerce(Message.reasons, String).label("reasons"),
            rank,
        )
        .where(Message.report_id.in_(report_ids))
        .subquery()
    )
    query = select(ranked).where(ranked.c.rank <= limit).order_by(ranked.c.report_id, ranked.c.rank)
    rows: dict[int, list[Listed]] = {}
    for report_id, *fields in session.execute(query):
        rows.setdefault(report_id, []).append(_row(*fields[:6]))
    return rows


@dataclass(frozen=True, slots=True)
class Listed:
    """What a report shows of one message."""

    id: int
    received_at: datetime
    sender: str
    subject: str
    reason: dict[str, Any] | None


def _row(
    message_id: int, received: Any, from_address: str, envelope: str, subject: str, why: Any
) -> Listed:
    if isinstance(received, str):  # SQLite: naive UTC text
        received = datetime.fromisoformat(received).replace(tzinfo=UTC)
    if isinstance(why, str | bytes):
        why = json.loads(why)
    top = why if isinstance(why, list) and len(why) == 1 else reasons.top(why or [], 1)
    reason = top[0] if top and isinstance(top[0], dict) else None
    return Listed(message_id, received, from_address or envelope, subject, reason)


@lru_cache(maxsize=1)
def _babel_app() -> Flask:
    """A bare Flask app, only so that the reason texts (lazy_gettext) can be translated."""
    app = Flask(__name__)
    app.config["BABEL_TRANSLATION_DIRECTORIES"] = str(mailer.TRANSLATIONS)
    Babel(app)
    return app


@lru_cache(maxsize=4096)
def _reason(code: str, text: str, language: str) -> str:
    with _babel_app().app_context(), force_locale(language):
        return _clean(reasons.describe({"code": code, "text": text}))


@lru_cache(maxsize=16384)
def _date(minute: datetime, zone: str | None, language: str) -> str:
    return format_datetime(minute, "short", tzinfo=mailboxes.time_zone(zone), locale=language)


def _clean(value: str | None, limit: int = 200) -> str:
    return " ".join((value or "").split())[:limit]


class Renderer:
    """Renders report mails for one run: the signing set up once, the templates compiled."""

    def __init__(self, config: Config) -> None:
        self.config = config
        signer = tokens.Tokens(config.secret_keys)
        self._release = signer.dumper("release")
        self._login = signer.dumper("login")

    def render(self, to: Addressee, messages: Iterable[Listed]) -> bytes:
        """The report mail for one addressee and its listed messages (as ``listed`` gives)."""
        language = to.language if to.language in LANGUAGES else "nb"
        base = self.config.base_url
        zone = to.timezone
        rows = []
        for message in messages:
            token = self._release({"m": to.mailbox_id, "v": to.key_version, "id": message.id})
            reason = message.reason
            rows.append(
                Row(
                    date=_date(
                        message.received_at.replace(second=0, microsecond=0), zone, language
                    ),
                    sender=_clean(message.sender, 320),
                    subject=_clean(message.subject),
                    reason=""
                    if reason is None
                    else _reason(
                        str(reason.get("code") or ""), str(reason.get("text") or ""), language
                    ),
                    release_url=f"{base}/r/{token}",
                    allow_url=f"{base}/r/{token}?allow=1",
                )
            )
        login = self._login({"m": to.mailbox_id, "v": to.key_version})
        rendered = mailer.render(
            "report",
            language,
            lang=language,
            address=to.address,
            count=to.message_count,
            rows=rows,
            more=max(to.message_count - len(rows), 0),
            overview_url=f"{base}/l/{login}",
            settings_url=f"{base}/settings/",
            retention_days=self.config.retention_days,
            link_days=tokens.LOGIN_LINK_DAYS,
        )
        return mailer.build(
            rendered,
            sender=self.config.mail_from,
            to=to.address,
            message_id=message_id(to, self.config.hostname),
        )


def message_id(to: Addressee, hostname: str) -> str:
    """The report's Message-ID: the same on every attempt, unique to the report."""
    return f"<report.{to.report_id}.{int(to.created_at.timestamp())}@{hostname}>"
