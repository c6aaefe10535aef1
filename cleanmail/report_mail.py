"""The report as mail: a batch of reports' rows read in one query, rendered in the owner's language.

A run renders 100,000 reports of up to 50 rows, so what is the same for many rows is
done once: the signing key of the links, dates formatted per minute and language, the
reason texts per code and language, and templates compiled once per language.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any, NamedTuple

from babel.dates import format_datetime
from flask import Flask
from flask_babel import Babel, force_locale
from markupsafe import escape
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
    # Core rows, not the ORM's: these are plain columns, and a run reads millions.
    return [Addressee(*row) for row in session.connection().execute(query)]


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
    for report_id, *fields in session.connection().execute(query).all():
        rows.setdefault(report_id, []).append(_row(*fields[:6]))
    return rows


class Listed(NamedTuple):
    """What a report shows of one message (a tuple: a run makes millions of them)."""

    id: int
    minute: datetime  # when it was received, to the minute (what the report shows)
    sender: str
    subject: str
    reason: dict[str, Any] | None


def _row(
    message_id: int, received: Any, from_address: str, envelope: str, subject: str, why: Any
) -> Listed:
    if isinstance(received, str):  # SQLite: naive UTC text, "YYYY-MM-DD HH:MM:SS.ffffff"
        minute = _minute(received[:16])
    else:
        minute = received.replace(second=0, microsecond=0)
    reason = _top_reason(why) if isinstance(why, str) else _top(why)
    return Listed(message_id, minute, from_address or envelope, subject, reason)


@lru_cache(maxsize=16384)
def _minute(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@lru_cache(maxsize=4096)  # bounded: a reason list is a few hundred bytes
def _top_reason(why: str) -> dict[str, Any] | None:
    """The top reason of a stored list, decoded once per distinct list (read only)."""
    return _top(json.loads(why))


def _top(why: Any) -> dict[str, Any] | None:
    if isinstance(why, bytes):
        why = json.loads(why)
    top = why if isinstance(why, list) and len(why) == 1 else reasons.top(why or [], 1)
    return top[0] if top and isinstance(top[0], dict) else None


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


_MARK = "\ue000"  # a private-use character: no escaping changes it, no translation has it
_ROW = ("date", "subject", "sender", "reason", "release_url", "allow_url")
_FRAME = ("address", "overview_url", "rows")


@lru_cache(maxsize=4096)
def compiled(name: str, language: str, fields: tuple[str, ...], **fixed: Any) -> str:
    """``report/<name>`` rendered once with stand-ins for ``fields``, as a ``str.format`` string.

    What is left to fill in is escaped by the caller as the template would have (HTML)
    or not (text); the rest, translations included, is Jinja's own output.
    """
    stand_ins = {field: f"{_MARK}{field}{_MARK}" for field in fields}
    template = mailer._environment(language).get_template(f"report/{name}")
    rendered = template.render(**stand_ins, **fixed).replace("{", "{{").replace("}", "}}")
    for field in fields:
        rendered = rendered.replace(stand_ins[field], "{" + field + "}")
    return rendered


class RowTemplate(NamedTuple):
    """A row template as a ``%`` string and what picks its values out of a ``_ROW`` tuple."""

    text: str
    pick: Callable[[tuple[str, ...]], tuple[str, ...]]

    def fill(self, values: tuple[str, ...]) -> str:
        """The row with the values (in ``_ROW`` order) put in."""
        return self.text % self.pick(values)


def row_template(name: str, language: str, fields: tuple[str, ...], **fixed: Any) -> RowTemplate:
    """``compiled`` as a positional ``%`` template: a row is filled 2.5 million times a run."""
    stand_ins = {field: f"{_MARK}{field}{_MARK}" for field in fields}
    template = mailer._environment(language).get_template(f"report/{name}")
    # Jinja drops a template's last newline; each row ends with one.
    pieces = (template.render(**stand_ins, **fixed) + "\n").replace("%", "%%").split(_MARK)
    order = [_ROW.index(field) for field in pieces[1::2]]
    pieces[1::2] = ["%s"] * len(order)
    picks = itemgetter(*order) if len(order) > 1 else lambda values: (values[order[0]],)
    return RowTemplate("".join(pieces), picks)


@dataclass(frozen=True)
class RowFormat:
    """``report/row.*`` of one language, with and without a reason."""

    html: RowTemplate
    html_no_reason: RowTemplate
    text: RowTemplate
    text_no_reason: RowTemplate
    no_subject: str


@lru_cache(maxsize=8)
def row_format(language: str) -> RowFormat:
    """The row templates of a language, compiled; each row ends with a newline."""
    without = tuple(field for field in _ROW if field != "reason")
    no_subject = mailer._environment(language).from_string('{{ _("(no subject)") }}').render()
    return RowFormat(
        html=row_template("row.html", language, _ROW),
        html_no_reason=row_template("row.html", language, without, reason=""),
        text=row_template("row.txt", language, _ROW),
        text_no_reason=row_template("row.txt", language, without, reason=""),
        no_subject=str(no_subject),
    )


@lru_cache(maxsize=16384)
def _escaped(value: str) -> str:
    return str(escape(value))


class Renderer:
    """Renders report mails for one run: the signing set up once, the templates compiled.

    The templates are rendered by Jinja once per language (and count, for the frame)
    with stand-ins, and filled in per report and row with ``str.format``: a run
    renders 100,000 reports of up to 50 rows, and Jinja per row cost more than the rest.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        signer = tokens.Tokens(config.secret_keys)
        self._release = signer.json_signer("release")
        self._login = signer.dumper("login")
        self._fixed = {
            "settings_url": f"{config.base_url}/settings/",
            "retention_days": config.retention_days,
            "link_days": tokens.LOGIN_LINK_DAYS,
        }

    def render(self, to: Addressee, messages: Iterable[Listed]) -> bytes:
        """The report mail for one addressee and its listed messages (as ``listed`` gives)."""
        language = to.language if to.language in LANGUAGES else "nb"
        form = row_format(language)
        base = self.config.base_url
        base_html = _escaped(base)
        zone = to.timezone
        # The release payload as json.dumps(..., separators=(",", ":")) writes it.
        payload = f'{{"m":{int(to.mailbox_id)},"v":{int(to.key_version)},"id":'
        html: list[str] = []
        text: list[str] = []
        for message in messages:
            token = self._release(f"{payload}{int(message.id)}}}".encode())
            date = _date(message.minute, zone, language)
            sender = _clean(message.sender, 320)
            subject = _clean(message.subject)
            reason = message.reason
            why = (
                ""
                if reason is None
                else _reason(str(reason.get("code") or ""), str(reason.get("text") or ""), language)
            )
            # In _ROW order: date, subject, sender, reason, release_url, allow_url.
            html.append(
                (form.html if why else form.html_no_reason).fill(
                    (
                        _escaped(date),
                        escape(subject) if subject else form.no_subject,
                        escape(sender),
                        _escaped(why),
                        f"{base_html}/r/{token}",
                        f"{base_html}/r/{token}?allow=1",
                    )
                )
            )
            text.append(
                (form.text if why else form.text_no_reason).fill(
                    (
                        date,
                        subject or form.no_subject,
                        sender,
                        why,
                        f"{base}/r/{token}",
                        f"{base}/r/{token}?allow=1",
                    )
                )
            )
        overview = f"{base}/l/{self._login({'m': to.mailbox_id, 'v': to.key_version})}"
        count, more = to.message_count, max(to.message_count - len(html), 0)
        rendered = mailer.Rendered(
            subject=_subject(language, count),
            text=self._frame("body.txt", language, count, more).format(
                address=to.address, overview_url=overview, rows="".join(text)
            ),
            html=self._frame("body.html", language, count, more).format(
                address=escape(to.address), overview_url=escape(overview), rows="".join(html)
            ),
        )
        return mailer.build(
            rendered,
            sender=self.config.mail_from,
            to=to.address,
            message_id=message_id(to, self.config.hostname),
        )

    def _frame(self, name: str, language: str, count: int, more: int) -> str:
        return compiled(
            name, language, _FRAME, lang=language, count=count, more=more, **self._fixed
        )


@lru_cache(maxsize=4096)
def _subject(language: str, count: int) -> str:
    subject = mailer._environment(language).get_template("report/subject.txt")
    return " ".join(subject.render(count=count).split())


def message_id(to: Addressee, hostname: str) -> str:
    """The report's Message-ID: the same on every attempt, unique to the report."""
    return f"<report.{to.report_id}.{int(to.created_at.timestamp())}@{hostname}>"
