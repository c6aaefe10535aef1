"""The owner's whitelist and blacklist: see, add, remove, and move entries between them."""

from __future__ import annotations

import re

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required
from werkzeug.wrappers import Response

from cleanmail import lists, web
from cleanmail.models import ListAction, Mailbox

bp = Blueprint("lists", __name__, url_prefix="/lists")

KIND = "<any(allow, block):kind>"
MAX_PER_ADD = 100  # one form post; a longer paste is refused rather than half applied
_SEPARATORS = re.compile(r"[\s,;]+")


# Whole sentences per list, so that translators can inflect each list's name.
_TEXT = {
    "added": (
        _l("Added to the whitelist: %(patterns)s."),
        _l("Added to the blacklist: %(patterns)s."),
    ),
    "moved": (
        _l(
            "Moved from the blacklist to the whitelist: %(patterns)s. "
            "A sender can be on only one of the lists."
        ),
        _l(
            "Moved from the whitelist to the blacklist: %(patterns)s. "
            "A sender can be on only one of the lists."
        ),
    ),
    "already": (
        _l("Already on the whitelist: %(patterns)s."),
        _l("Already on the blacklist: %(patterns)s."),
    ),
    "removed": (
        _l("Removed from the whitelist: %(patterns)s."),
        _l("Removed from the blacklist: %(patterns)s."),
    ),
}


def _say(what: str, kind: str, **values: str) -> str:
    """One of the sentences above, for the list ``kind``, in the owner's language."""
    return str(_TEXT[what][0 if kind == ListAction.ALLOW else 1]) % values


def _other(kind: str) -> str:
    return ListAction.BLOCK if kind == ListAction.ALLOW else ListAction.ALLOW


def _list_name(kind: str) -> str:
    """The list's name as owners know it."""
    return _("Whitelist") if kind == ListAction.ALLOW else _("Blacklist")


def _mailbox() -> Mailbox:
    mailbox = web.session().get(Mailbox, current_user.mailbox_id)
    if mailbox is None:
        abort(404)
    return mailbox


def _problem(value: str) -> str | None:
    """Why a pattern is not acceptable, in the owner's language; None when it is."""
    if len(value) > 320:
        return _("“%(value)s” is longer than 320 characters.", value=value[:40] + "…")
    try:
        lists.normalize(value)
    except lists.ListError:
        return _("“%(value)s” is not an e-mail address or a domain.", value=value)
    return None


def _render(kind: str, mailbox: Mailbox, *, text: str = "", errors: list[str] | None = None):
    entries = [e for e in lists.owned_by(web.session(), mailbox=mailbox) if e.action == kind]
    status = 400 if errors else 200
    page = render_template(
        "lists/index.html",
        kind=kind,
        other=_other(kind),
        title=_list_name(kind),
        entries=entries,
        text=text,
        errors=errors or [],
        max_per_add=MAX_PER_ADD,
    )
    return page, status


@bp.get(f"/{KIND}")
@login_required
def index(kind: str):
    """One of the owner's lists, with the form to add to it."""
    return _render(kind, _mailbox())


@bp.post(f"/{KIND}/add")
@login_required
def add(kind: str):
    """Add one or more patterns; all are checked first, and nothing changes if one is wrong."""
    mailbox = _mailbox()
    text = request.form.get("patterns", "")
    values = [v for v in _SEPARATORS.split(text) if v]
    if not values:
        return _render(kind, mailbox, text=text, errors=[_("Write an address or a domain.")])
    if len(values) > MAX_PER_ADD:
        errors = [_("Add at most %(count)d entries at a time.", count=MAX_PER_ADD)]
        return _render(kind, mailbox, text=text, errors=errors)
    errors = [problem for v in values if (problem := _problem(v))]
    if errors:
        return _render(kind, mailbox, text=text, errors=errors)
    session = web.session()
    before = {e.pattern: e.action for e in lists.owned_by(session, mailbox=mailbox)}
    added: list[str] = []
    moved: list[str] = []
    already: list[str] = []
    for value in values:
        pattern = lists.normalize(value)
        if pattern in added or pattern in moved or pattern in already:
            continue
        was = before.get(pattern)
        if was != kind:
            lists.add(session, web.actor(), kind, pattern, mailbox=mailbox)
        (added if was is None else moved if was != kind else already).append(pattern)
    session.commit()
    _flash_added(kind, added, moved, already)
    return redirect(url_for(".index", kind=kind))


def _flash_added(kind: str, added: list[str], moved: list[str], already: list[str]) -> None:
    if added:
        flash(_say("added", kind, patterns=", ".join(added)), "success")
    if moved:
        flash(_say("moved", kind, patterns=", ".join(moved)), "success")
    if already:
        flash(_say("already", kind, patterns=", ".join(already)))


def _entry_on(kind: str, mailbox: Mailbox) -> str:
    """The canonical pattern posted in the form, which must be on this owner's list."""
    try:
        pattern = lists.normalize(request.form.get("pattern", ""))
    except lists.ListError:
        abort(404)
    owned = {e.pattern: e.action for e in lists.owned_by(web.session(), mailbox=mailbox)}
    if owned.get(pattern) != kind:
        abort(404)
    return pattern


@bp.post(f"/{KIND}/remove")
@login_required
def remove(kind: str) -> Response:
    """Take an entry off the list."""
    mailbox = _mailbox()
    pattern = _entry_on(kind, mailbox)
    session = web.session()
    lists.remove(session, web.actor(), pattern, action=kind, mailbox=mailbox)
    session.commit()
    flash(_say("removed", kind, patterns=pattern), "success")
    return redirect(url_for(".index", kind=kind))


@bp.post(f"/{KIND}/move")
@login_required
def move(kind: str) -> Response:
    """Move an entry to the other list."""
    mailbox = _mailbox()
    pattern = _entry_on(kind, mailbox)
    session = web.session()
    lists.add(session, web.actor(), _other(kind), pattern, mailbox=mailbox)
    session.commit()
    flash(_say("moved", _other(kind), patterns=pattern), "success")
    return redirect(url_for(".index", kind=kind))
