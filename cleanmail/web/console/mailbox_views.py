"""Mailboxes in the console: find one, see its settings and reports, and help its owner."""

from __future__ import annotations

from flask import abort, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_login import current_user
from sqlalchemy import func, or_, select
from werkzeug.wrappers import Response

from cleanmail import audit, mailer, mime, quarantine_list, staff, tokens, web
from cleanmail.models import Domain, Mailbox, Message, Report, Status
from cleanmail.relay import RelayError
from cleanmail.web import auth
from cleanmail.web.console import access, bp, time_zone, visible_mailbox
from cleanmail.web.preview import local_time

MAILBOX = "/mailboxes/<int:mailbox_id>"
PAGE_SIZE = 50
REPORTS_SHOWN = 20


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{escaped}%"


@bp.get("/mailboxes")
def mailboxes() -> str:
    """Find mailboxes by the start of their address or by domain."""
    q = " ".join(mime.clean_text(request.args.get("q", ""), 320).split()).lower()
    session = web.session()
    rows: list[tuple[Mailbox, str]] = []
    if q:
        query = (
            select(Mailbox, Domain.name)
            .outerjoin(Domain, Domain.id == Mailbox.domain_id)
            .where(*access().mailbox_conditions())
            .where(or_(Mailbox.address.like(_like(q), escape="\\"), Domain.name == q))
            .order_by(Mailbox.address)
            .limit(PAGE_SIZE)
        )
        rows = [(mailbox, name or "") for mailbox, name in session.execute(query)]
    return render_template("console/mailboxes.html", q=q, rows=rows, limit=PAGE_SIZE)


@bp.get(MAILBOX)
def mailbox(mailbox_id: int) -> str:
    """A mailbox's settings, its held mail and its last reports."""
    found = visible_mailbox(mailbox_id)
    session = web.session()
    tz = time_zone()
    counts = dict(
        session.execute(
            select(Message.status, func.count())
            .where(Message.mailbox_id == found.id)
            .group_by(Message.status)
        ).all()
    )
    reports = session.scalars(
        select(Report)
        .where(Report.mailbox_id == found.id)
        .order_by(Report.created_at.desc(), Report.id.desc())
        .limit(REPORTS_SHOWN)
    ).all()
    return render_template(
        "console/mailbox.html",
        mailbox=found,
        waiting=quarantine_list.count_new(session, found.id),
        counts={s.value: counts.get(s.value, 0) for s in Status},
        reports=[
            {
                "id": r.id,
                "created": local_time(r.created_at, tz),
                "sent": local_time(r.sent_at, tz) if r.sent_at else "",
                "status": r.status,
                "count": r.message_count,
                "attempts": r.attempts,
                "error": r.last_error,
            }
            for r in reports
        ],
        last_login=local_time(found.last_login_at, tz) if found.last_login_at else "",
        last_report=local_time(found.last_report_at, tz) if found.last_report_at else "",
        created=local_time(found.created_at, tz),
    )


def _target(mailbox_id: int) -> Mailbox:
    """A mailbox to act on: only operators act on staff mailboxes (a login link, a reset)."""
    found = visible_mailbox(mailbox_id)
    if found.role in staff.STAFF_ROLES and not access().operator:
        abort(403)
    return found


def _done(mailbox: Mailbox, text: str) -> Response:
    web.session().commit()
    flash(text, "success")
    return redirect(url_for(".mailbox", mailbox_id=mailbox.id), 303)


@bp.post(f"{MAILBOX}/disable")
def disable(mailbox_id: int) -> Response:
    """Disable a mailbox: no logins, no links; its mail keeps being held."""
    found = _target(mailbox_id)
    if found.id == current_user.mailbox_id:
        abort(400)  # staff do not lock themselves out
    found.disabled = True
    found.key_version += 1
    audit.record(web.session(), web.actor(), "mailbox.disable", mailbox_id=found.id)
    return _done(found, _("The mailbox is disabled. Its sessions and links no longer work."))


@bp.post(f"{MAILBOX}/enable")
def enable(mailbox_id: int) -> Response:
    """Let a disabled mailbox log in again."""
    found = _target(mailbox_id)
    found.disabled = False
    audit.record(web.session(), web.actor(), "mailbox.enable", mailbox_id=found.id)
    return _done(found, _("The mailbox is enabled again."))


@bp.post(f"{MAILBOX}/password")
def reset_password(mailbox_id: int) -> Response:
    """Remove the owner's password: they set a new one after logging in with a link."""
    found = _target(mailbox_id)
    found.password_hash = None
    audit.record(web.session(), web.actor(), "mailbox.password_reset", mailbox_id=found.id)
    return _done(
        found, _("The password is removed. The owner logs in with a link and sets a new one.")
    )


@bp.post(f"{MAILBOX}/revoke")
def revoke(mailbox_id: int) -> Response:
    """End every session of the mailbox and make every login link sent so far useless."""
    found = _target(mailbox_id)
    found.key_version += 1
    audit.record(web.session(), web.actor(), "logout.everywhere", mailbox_id=found.id)
    return _done(found, _("Every session and every link of this mailbox has ended."))


@bp.post(f"{MAILBOX}/login-link")
def login_link(mailbox_id: int) -> Response | str:
    """Issue a fresh login link: shown here to hand over, or mailed to the owner."""
    found = _target(mailbox_id)
    if found.disabled:
        flash(_("The mailbox is disabled: enable it first."), "error")
        return redirect(url_for(".mailbox", mailbox_id=found.id), 303)
    mailed = request.form.get("how") == "mail"
    session = web.session()
    audit.record(
        session,
        web.actor(),
        "login_link.issue",
        mailbox_id=found.id,
        address=found.address,
        mailed=mailed,
    )
    session.commit()
    url = auth.login_url(found)
    if not mailed:
        return render_template("console/login_link.html", mailbox=found, url=url)
    config = web.config()
    rendered = mailer.render(
        "login_link",
        found.language,
        url=url,
        address=found.address,
        days=tokens.LOGIN_LINK_DAYS,
        lang=found.language,
    )
    raw = mailer.build(rendered, sender=config.mail_from, to=found.address, domain=config.hostname)
    try:
        mailer.send(web.relay(), raw, found.address)
    except RelayError as exc:
        flash(_("The mail server did not take the link: %(error)s", error=str(exc)), "error")
        return redirect(url_for(".mailbox", mailbox_id=found.id), 303)
    return _done(found, _("A login link was mailed to %(address)s.", address=found.address))
