"""The report as mail: a batch of reports' rows read in one query, rendered in the owner's language.

A run renders 100,000 reports of up to 50 rows, so what is the same for many rows is
done once: the signing key of the links, dates formatted per minute and language, the
reason texts per code and language, and templates compiled once per language.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from babel.dates import format_datetime
from flask import Flask
from flask_babel import Babel, force_locale
from sqlalchemy import func, select
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
    ranked = (
        select(
            Message.report_id,
            Message.id,
            Message.received_at,
            Message.from_address,
            Message.envelope_sender,
            Message.subject,
            Message.reasons,
            rank,
        )
        .where(Message.report_id.in_(report_ids))
        .subquery()
    )
    query = select(ranked).where(ranked.c.rank <= limit).order_by(ranked.c.report_id, ranked.c.rank)
    rows: dict[int, list[Any]] = {}
    for row in session.execute(query):
        rows.setdefault(row.report_id, []).append(row)
    return rows


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

    def render(self, to: Addressee, messages: Iterable[Any]) -> bytes:
        """The report mail for one addressee and its listed messages (as ``listed`` gives)."""
        language = to.language if to.language in LANGUAGES else "nb"
        base = self.config.base_url
        rows = []
        for message in messages:
            token = self._release({"m": to.mailbox_id, "v": to.key_version, "id": message.id})
            top = reasons.top(message.reasons or [], 1)
            reason = top[0] if top else None
            minute = message.received_at.replace(second=0, microsecond=0)
            rows.append(
                Row(
                    date=_date(minute, to.timezone, language),
                    sender=_clean(message.from_address or message.envelope_sender, 320),
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
