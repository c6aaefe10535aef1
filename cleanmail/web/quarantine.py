"""The owner's quarantine: the list, one message with its safe preview, and the actions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_login import current_user, login_required
from flask_wtf.csrf import generate_csrf
from sqlalchemy.orm import Session
from werkzeug.datastructures import MultiDict

from cleanmail import mailboxes, mime, quarantine, quarantine_list, reasons, web
from cleanmail.models import Mailbox, Message, Status
from cleanmail.web import listing, preview
from cleanmail.web import quarantine_actions as actions

MAX_ID = 2**63 - 1  # the largest id either database stores; larger ones are not ours
MESSAGE = f"/messages/<int(max={MAX_ID}):message_id>"
bp = Blueprint("quarantine", __name__)

PAGE_SIZE = 50
MAX_QUERY = 200
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def owner_mailbox(session: Session) -> Mailbox:
    """The logged-in owner's mailbox row."""
    mailbox = session.get(Mailbox, current_user.mailbox_id)
    if mailbox is None:
        abort(404)
    return mailbox


def owned_message(session: Session, mailbox: Mailbox, message_id: int) -> Message:
    """One of the owner's messages; any other id is simply not found."""
    try:
        return quarantine.get(session, message_id, mailbox=mailbox)
    except quarantine.QuarantineError:
        abort(404)


@dataclass(frozen=True)
class ListForm:
    """The list's search and filter fields, as given in the query string."""

    q: str = ""
    reason: str = ""
    since: str = ""
    until: str = ""
    released: bool = False

    @classmethod
    def parse(cls, args: MultiDict[str, str]) -> ListForm:
        """Read the fields, dropping values that cannot be meant."""
        reason = args.get("reason", "")
        return cls(
            q=" ".join(mime.clean_text(args.get("q", ""), MAX_QUERY).split()).replace("\ufffd", ""),
            reason=reason if reason in reasons.LABELS else "",
            since=args.get("since", "")[:10],
            until=args.get("until", "")[:10],
            released=args.get("released") == "1",
        )

    def args(self) -> dict[str, str]:
        """The non-empty fields, to carry along in the pager's links."""
        values = {"q": self.q, "reason": self.reason, "since": self.since, "until": self.until}
        values["released"] = "1" if self.released else ""
        return {key: value for key, value in values.items() if value}

    def criteria(self, tz: ZoneInfo) -> quarantine_list.Criteria:
        """What to look for; the dates are whole days in the owner's time zone."""
        since, until = _day(self.since), _day(self.until)
        return quarantine_list.Criteria(
            statuses=(Status.NEW, Status.RELEASED) if self.released else (Status.NEW,),
            text=self.q,
            reason=self.reason,
            since=datetime.combine(since, time(), tz).astimezone(UTC) if since else None,
            until=(
                datetime.combine(until + timedelta(days=1), time(), tz).astimezone(UTC)
                if until
                else None
            ),
        )

    def bad_dates(self) -> bool:
        """True when a date was given that is not a date."""
        return any(value and _day(value) is None for value in (self.since, self.until))


def _day(value: str) -> date | None:
    try:
        day = date.fromisoformat(value) if value else None
    except ValueError:
        return None
    # A day at either end of the calendar cannot be turned into a time range in a zone.
    return day if day is None or date(1900, 1, 1) <= day <= date(9000, 1, 1) else None


def format_cursor(cursor: quarantine_list.Cursor) -> str:
    """A cursor as a query-string value: microseconds since 1970, a dash, the id."""
    micros = (cursor.received_at - EPOCH) // timedelta(microseconds=1)
    return f"{micros}-{cursor.id}"


def parse_cursor(value: str | None) -> quarantine_list.Cursor | None:
    """The cursor in a query-string value, or None for anything malformed."""
    micros, _dash, ident = (value or "").partition("-")
    if not (micros.isdigit() and ident.isdigit() and len(micros) < 20 and len(ident) < 20):
        return None
    if int(ident) > MAX_ID:
        return None
    try:
        return quarantine_list.Cursor(EPOCH + timedelta(microseconds=int(micros)), int(ident))
    except OverflowError:
        return None


@bp.get("/")
@login_required
def index() -> str:
    """The list of held messages, newest first, a page at a time (kept while unchanged)."""
    return listing.kept_page(listing.page_key(current_user), generate_csrf, _render_index)


def _render_index() -> str:
    """The list page rendered from the database."""
    session = web.session()
    tz = mailboxes.time_zone(current_user.timezone)
    form = ListForm.parse(request.args)
    page = quarantine_list.search(
        session,
        current_user.mailbox_id,
        form.criteria(tz),
        before=parse_cursor(request.args.get("before")),
        after=parse_cursor(request.args.get("after")),
        limit=PAGE_SIZE,
    )
    message_path = url_for("quarantine.message", message_id=0).removesuffix("0")
    return render_template(
        "quarantine/index.html",
        form=form,
        page=page,
        rows=listing.render_rows(page.messages, str(get_locale()), tz, message_path),
        new_count=quarantine_list.count_new(session, current_user.mailbox_id),
        reason_codes=reasons.codes(),
        format_cursor=format_cursor,
        back=request.full_path,
    )


def parsed_content(message: Message) -> mime.ParsedMessage | None:
    """The parsed stored message, or None once its content is gone."""
    if message.raw_sha256 is None or message.status in (Status.DELETED, Status.EXPIRED):
        return None
    try:
        return mime.parse(quarantine.raw(web.store(), message))
    except (quarantine.QuarantineError, OSError):
        return None


@bp.get(MESSAGE)
@login_required
def message(message_id: int) -> str:
    """One message: its headers, why it was held, a safe preview and its attachments."""
    session = web.session()
    mailbox = owner_mailbox(session)
    held = owned_message(session, mailbox, message_id)
    tz = mailboxes.time_zone(mailbox.timezone)
    parsed = parsed_content(held)
    html = parsed.html_body if parsed else ""
    text = parsed.text_body if parsed else ""
    show_html = bool(html.strip()) and not (request.args.get("view") == "text" and text.strip())
    name, address = preview.sender(held.from_header, held.envelope_sender)
    ordered = reasons.top(held.reasons or [], None)
    return render_template(
        "quarantine/message.html",
        message=held,
        name=name,
        address=address,
        to=parsed.header("To") if parsed else "",
        date=preview.local_time(held.date_header, tz, "medium"),
        received=preview.local_time(held.received_at, tz, "medium"),
        expires=preview.local_time(held.expires_at, tz, "medium"),
        released=preview.local_time(held.released_at, tz, "medium"),
        size=preview.human_size(held.size),
        reasons=[(reasons.describe(r), r.get("score") or 0) for r in ordered],
        attachments=preview.attachment_list(parsed) if parsed else [],
        human_size=preview.human_size,
        has_content=parsed is not None,
        show_html=show_html,
        text=text,
        can_switch=bool(html.strip()) and bool(text.strip()),
        images=request.args.get("images") == "1",
        remote_images=show_html and preview.has_remote_images(html),
        sandbox=preview.SANDBOX,
        dangerous=any(r.get("code") == "BLOCKED_ATTACHMENT" for r in held.reasons or []),
        allow_sender=actions.sender_pattern(held, domain=False),
        allow_domain=actions.sender_pattern(held, domain=True),
    )


@bp.get(f"{MESSAGE}/preview")
@login_required
def preview_document(message_id: int) -> Response:
    """The cleaned HTML of a message as its own document, for the sandboxed iframe."""
    session = web.session()
    held = owned_message(session, owner_mailbox(session), message_id)
    parsed = parsed_content(held)
    if parsed is None or not parsed.html_body.strip():
        abort(404)
    images = request.args.get("images") == "1"
    response = make_response(preview.document(parsed.html_body, images=images))
    response.headers["Content-Type"] = "text/html; charset=utf-8"
    response.headers["Content-Security-Policy"] = preview.CSP_IMAGES if images else preview.CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    response.headers["Referrer-Policy"] = "no-referrer"  # links in spam learn nothing of us
    return response


def _next(default: str) -> str:
    """Where to go after an action: a local path from the form, never another site."""
    return web.safe_next(request.form.get("next")) or default


@bp.post(f"{MESSAGE}/release")
@login_required
def release(message_id: int) -> Response:
    """Release one message; with ``allow`` also whitelist its sender or the sender's domain."""
    session = web.session()
    mailbox = owner_mailbox(session)
    held = owned_message(session, mailbox, message_id)
    action = actions.RELEASES.get(request.form.get("allow", ""))
    if action is None:
        abort(400)
    if actions.apply(session, mailbox, [held], action):
        return redirect(_next(url_for(".index")))
    return redirect(url_for(".message", message_id=held.id))


@bp.post(f"{MESSAGE}/delete")
@login_required
def delete(message_id: int) -> Response:
    """Delete one message for good."""
    session = web.session()
    mailbox = owner_mailbox(session)
    held = owned_message(session, mailbox, message_id)
    actions.apply(session, mailbox, [held], "delete")
    return redirect(_next(url_for(".index")))


@bp.post(f"{MESSAGE}/block")
@login_required
def block(message_id: int) -> Response:
    """Put the sender on the owner's blacklist; the message stays where it is."""
    session = web.session()
    mailbox = owner_mailbox(session)
    held = owned_message(session, mailbox, message_id)
    actions.apply(session, mailbox, [held], "block")
    return redirect(_next(url_for(".message", message_id=held.id)))


@bp.post("/messages/bulk")
@login_required
def bulk() -> Response:
    """One action on the messages selected in the list."""
    session = web.session()
    mailbox = owner_mailbox(session)
    action = request.form.get("action", "")
    values = request.form.getlist("ids")
    if action not in actions.ACTIONS or len(values) > actions.MAX_SELECTED:
        abort(400)
    if not all(v.isdigit() and len(v) < 20 and int(v) <= MAX_ID for v in values):
        abort(400)
    ids = sorted({int(value) for value in values})
    if not ids:
        flash(_("Select at least one message first."), "error")
        return redirect(_next(url_for(".index")))
    selected = quarantine_list.owned(session, mailbox.id, ids)
    if len(selected) != len(ids):
        abort(404)
    actions.apply(session, mailbox, selected, action)
    return redirect(_next(url_for(".index")))
