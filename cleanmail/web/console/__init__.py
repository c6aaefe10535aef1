"""The operators' console under /console: staff only, after password and two-step login.

Every view asks this module for what the member of staff may see (``access()``) and
for rows through ``visible_*``, which apply ``staff.Access``: a domain admin gets
404 for anything outside their domains, exactly as if it did not exist.
"""

from __future__ import annotations

from typing import Any

import flask
from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_login import current_user
from sqlalchemy import select
from werkzeug.wrappers import Response

from cleanmail import mailboxes, staff, tokens, web
from cleanmail.models import Domain, Mailbox, Message

bp = Blueprint("console", __name__, url_prefix="/console")
MAX_ID = 2**63 - 1


@bp.before_request
def _gate() -> Response | tuple[str, int] | None:
    """Staff only, logged in with password and code; owners get 403."""
    if not current_user.is_authenticated:
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    session = web.session()
    member = session.get(Mailbox, current_user.mailbox_id)
    access = staff.access_for(session, member) if member is not None else None
    if member is None or access is None:
        abort(403)
    method = flask.session.get("login_method")
    if method != "totp":
        if method == "password" and not member.totp_secret:
            flash(_("Set up two-step login first: the console needs it."), "error")
            return redirect(url_for("settings.two_step"))
        # A report link (or a login from before two-step login was set up) is one step.
        error = _("The console needs your password and a code from your authenticator app.")
        page = render_template(
            "auth/login.html",
            next=request.path,
            address=member.address,
            error=error,
            link_days=tokens.LOGIN_LINK_DAYS,
        )
        return page, 401
    g.console_access = access
    g.console_member = member
    return None


@bp.context_processor
def _values() -> dict[str, Any]:
    access = g.get("console_access")
    return {
        "console_access": access,
        "is_operator": bool(access and access.operator),
        "role_names": {
            "owner": _("Owner"),
            "domain_admin": _("Domain admin"),
            "operator": _("Operator"),
        },
        "report_names": {
            "pending": _("Waiting"),
            "sent": _("Sent"),
            "failed": _("Failed"),
            "never": _("Never"),
            "hourly": _("Every hour"),
            "daily": _("Daily"),
            "weekly": _("Weekly"),
        },
    }


def access() -> staff.Access:
    """What the member of staff of this request may see."""
    return g.console_access


def member() -> Mailbox:
    """The member of staff of this request."""
    return g.console_member


def time_zone() -> Any:
    """The staff member's time zone, for showing and reading dates."""
    return mailboxes.time_zone(member().timezone)


def require_operator() -> None:
    """Stop a domain admin at things only operators do (403)."""
    if not access().operator:
        abort(403)


def visible_message(message_id: int) -> Message:
    """A message the member may see, or 404."""
    query = select(Message).where(Message.id == message_id, *access().message_conditions())
    message = web.session().scalar(query)
    if message is None:
        abort(404)
    return message


def visible_mailbox(mailbox_id: int) -> Mailbox:
    """A mailbox the member may see, or 404."""
    query = select(Mailbox).where(Mailbox.id == mailbox_id, *access().mailbox_conditions())
    mailbox = web.session().scalar(query)
    if mailbox is None:
        abort(404)
    return mailbox


def visible_domain(domain_id: int) -> Domain:
    """A domain the member may see, or 404."""
    query = select(Domain).where(Domain.id == domain_id, *access().domain_conditions())
    domain = web.session().scalar(query)
    if domain is None:
        abort(404)
    return domain


def visible_domains() -> list[Domain]:
    """The domains the member may see, by name."""
    query = select(Domain).where(*access().domain_conditions()).order_by(Domain.name)
    return list(web.session().scalars(query))


def next_path(default: str) -> str:
    """Where to go after an action: a local path from the form, never another site."""
    return web.safe_next(request.form.get("next")) or default


def parse_ids(values: list[str], limit: int) -> list[int] | None:
    """Message ids from a form, or None when any is not one."""
    if len(values) > limit:
        return None
    if not all(v.isdigit() and len(v) < 20 and int(v) <= MAX_ID for v in values):
        return None
    return sorted({int(v) for v in values})


from cleanmail.web.console import (  # noqa: E402 - the routes register on bp
    jobs,
    lists,
    mailbox_views,
    messages,
    oversight,
    report_views,
)

__all__ = ["bp", "jobs", "lists", "mailbox_views", "messages", "oversight", "report_views"]
