"""The console's search, a message in full, and releases and deletes for customers."""

from __future__ import annotations

from typing import Any

from flask import abort, flash, make_response, redirect, render_template, request, url_for
from flask_babel import gettext as _
from werkzeug.wrappers import Response

from cleanmail import audit, mime, quarantine, reasons, search, web
from cleanmail.models import Message, Status
from cleanmail.web import preview
from cleanmail.web.console import (
    MAX_ID,
    access,
    bp,
    next_path,
    require_operator,
    time_zone,
    visible_message,
)
from cleanmail.web.console.forms import SearchForm
from cleanmail.web.quarantine import parsed_content

MESSAGE = f"/messages/<int(max={MAX_ID}):message_id>"
PAGE_SIZE = 50
MAX_HEADERS = 300
MAX_HEADER_TEXT = 4000


def _row(row: search.Row, tz: Any) -> dict[str, Any]:
    message = row.message
    name, address = preview.sender(message.from_header, message.envelope_sender)
    return {
        "id": message.id,
        "date": preview.local_time(message.received_at, tz),
        "recipient": row.recipient,
        "name": name,
        "address": address,
        "subject": message.subject,
        "score": message.score,
        "reasons": [reasons.describe(r) for r in reasons.top(message.reasons or [])],
        "size": preview.human_size(message.size),
        "status": message.status,
        "release_error": message.release_error,
    }


@bp.get("/")
def index() -> str | tuple[str, int]:
    """Search every mailbox the member may see; results sorted and a page at a time."""
    form = SearchForm.parse(request.args)
    tz = time_zone()
    query = form.query(tz)
    session = web.session()
    order = form.order()
    after = search.Cursor.decode(request.args.get("after"), order)
    try:
        page = search.page(session, access(), query, order, after=after, limit=PAGE_SIZE)
    except search.SearchError:
        form.errors.append(_("The recipient or sender is not a valid address or domain."))
        page = search.Page([], None)
    return render_template(
        "console/search.html",
        form=form,
        rows=[_row(row, tz) for row in page.rows],
        next_cursor=page.next.encode() if page.next else None,
        paged=after is not None,
        reason_codes=reasons.codes(),
        statuses=[s.value for s in Status],
        status_names=status_names(),
        back=request.full_path,
    ), 400 if form.errors else 200


def status_names() -> dict[str, str]:
    """Each status in words."""
    return {
        "new": _("In the quarantine"),
        "released": _("Released"),
        "deleted": _("Deleted"),
        "expired": _("Expired"),
    }


def _headers(parsed: mime.ParsedMessage) -> list[tuple[str, str]]:
    """Every header of the message, decoded and bounded (hostile mail has thousands)."""
    found = []
    for name, value in parsed.headers.items()[:MAX_HEADERS]:
        try:
            text = mime.decode_header(value)
        except Exception:
            text = str(value)
        found.append((mime.clean_text(str(name), 200), mime.clean_text(text, MAX_HEADER_TEXT)))
    return found


@bp.get(MESSAGE)
def message(message_id: int) -> str:
    """One message as its owner sees it, plus every header, the scores and the raw file."""
    held = visible_message(message_id)
    tz = time_zone()
    parsed = parsed_content(held)
    html = parsed.html_body if parsed else ""
    text = parsed.text_body if parsed else ""
    show_html = bool(html.strip()) and not (request.args.get("view") == "text" and text.strip())
    name, address = preview.sender(held.from_header, held.envelope_sender)
    ordered = reasons.top(held.reasons or [], None)
    return render_template(
        "console/message.html",
        message=held,
        recipient=held.mailbox.address,
        name=name,
        address=address,
        date=preview.local_time(held.date_header, tz, "medium"),
        received=preview.local_time(held.received_at, tz, "medium"),
        expires=preview.local_time(held.expires_at, tz, "medium"),
        released=preview.local_time(held.released_at, tz, "medium"),
        size=preview.human_size(held.size),
        reasons=[
            (reasons.describe(r), str(r.get("code") or ""), r.get("score") or 0) for r in ordered
        ],
        headers=_headers(parsed) if parsed else [],
        attachments=preview.attachment_list(parsed) if parsed else [],
        human_size=preview.human_size,
        has_content=parsed is not None,
        show_html=show_html,
        text=text,
        sandbox=preview.SANDBOX,
        status_names=status_names(),
        back=web.safe_next(request.args.get("back")) or url_for(".index"),
    )


@bp.get(f"{MESSAGE}/preview")
def preview_document(message_id: int) -> Response:
    """The cleaned HTML as its own document, for the sandboxed iframe (no remote images)."""
    parsed = parsed_content(visible_message(message_id))
    if parsed is None or not parsed.html_body.strip():
        abort(404)
    response = make_response(preview.document(parsed.html_body, images=False))
    response.headers["Content-Type"] = "text/html; charset=utf-8"
    response.headers["Content-Security-Policy"] = preview.CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.get(f"{MESSAGE}/raw")
def raw(message_id: int) -> Response:
    """The message exactly as received, as a download (operators only)."""
    require_operator()
    held = visible_message(message_id)
    try:
        data = quarantine.raw(web.store(), held)
    except (quarantine.QuarantineError, OSError):
        abort(404)
    session = web.session(write=True)
    quarantine_audit(session, held, "message.download")
    session.commit()
    response = make_response(data)
    # A download, never rendered: the browser must not read hostile mail as a page.
    response.headers["Content-Type"] = "application/octet-stream"
    response.headers["Content-Disposition"] = f'attachment; filename="message-{held.id}.eml"'
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


def quarantine_audit(session: Any, message: Message, action: str) -> None:
    """Record a member of staff looking at or acting on a message."""
    audit.record(session, web.actor(), action, mailbox_id=message.mailbox_id, message_id=message.id)


@bp.post(f"{MESSAGE}/release")
def release(message_id: int) -> Response:
    """Release one message on the customer's behalf; a refusal is shown and can be retried."""
    session = web.session()
    held = visible_message(message_id)
    try:
        released = quarantine.release(session, web.store(), web.relay(), held, web.actor())
    except quarantine.ReleaseFailed:
        session.commit()  # the error stays on the message, for everyone to see
        flash(_("The mail server did not take the message. It is still held; try again."), "error")
        return redirect(url_for(".message", message_id=held.id))
    except quarantine.QuarantineError:
        flash(_("This message can no longer be released."), "error")
        return redirect(url_for(".message", message_id=held.id))
    session.commit()
    if released:
        flash(
            _("The message was released to %(address)s.", address=held.mailbox.address), "success"
        )
    else:
        flash(_("This message has already been released."), "success")
    return redirect(next_path(url_for(".message", message_id=held.id)))


@bp.post(f"{MESSAGE}/delete")
def delete(message_id: int) -> Response:
    """Delete one message for good on the customer's behalf."""
    session = web.session()
    held = visible_message(message_id)
    if held.status in (Status.NEW, Status.RELEASED):
        quarantine.delete(session, web.store(), held, web.actor())
        session.commit()
        flash(_("The message was deleted."), "success")
    return redirect(next_path(url_for(".index")))
