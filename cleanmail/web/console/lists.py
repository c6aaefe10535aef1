"""Allow and block lists in the console: global (operators), a domain's, and a mailbox's."""

from __future__ import annotations

import re
from typing import Any

from flask import abort, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _
from werkzeug.wrappers import Response

from cleanmail import lists, web
from cleanmail.models import Domain, ListAction, Mailbox
from cleanmail.web.console import (
    bp,
    require_operator,
    visible_domain,
    visible_domains,
    visible_mailbox,
)

OWNER = "<any(global, domain, mailbox):kind>/<int:owner_id>"
MAX_PER_ADD = 100
_SEPARATORS = re.compile(r"[\s,;]+")


def _owner(kind: str, owner_id: int) -> tuple[Mailbox | None, Domain | None, str]:
    """The list's owner (a mailbox, a domain, or neither for the global list) and its name."""
    if kind == "global":
        require_operator()  # global lists touch every domain
        if owner_id != 0:
            abort(404)
        return None, None, _("Global lists")
    if kind == "domain":
        domain = visible_domain(owner_id)
        return None, domain, domain.name
    mailbox = visible_mailbox(owner_id)
    return mailbox, None, mailbox.address


@bp.get("/lists")
def lists_index() -> str:
    """Which lists there are: global (operators only) and each visible domain's."""
    return render_template("console/lists_index.html", domains=visible_domains())


def _render(kind: str, owner_id: int, *, text: str = "", errors: list[str] | None = None) -> Any:
    mailbox, domain, name = _owner(kind, owner_id)
    entries = lists.owned_by(web.session(), mailbox=mailbox, domain=domain)
    page = render_template(
        "console/lists.html",
        kind=kind,
        owner_id=owner_id,
        name=name,
        allow=[e for e in entries if e.action == ListAction.ALLOW],
        block=[e for e in entries if e.action == ListAction.BLOCK],
        text=text,
        errors=errors or [],
        mailbox=mailbox,
    )
    return page, 400 if errors else 200


@bp.get(f"/lists/{OWNER}")
def owner_lists(kind: str, owner_id: int) -> Any:
    """One owner's allow and block lists, with a form to add to them."""
    return _render(kind, owner_id)


@bp.post(f"/lists/{OWNER}/add")
def list_add(kind: str, owner_id: int) -> Any:
    """Add patterns to the allow or block list; all are checked first."""
    mailbox, domain, _name = _owner(kind, owner_id)
    action = request.form.get("action", "")
    if action not in (ListAction.ALLOW, ListAction.BLOCK):
        abort(400)
    text = request.form.get("patterns", "")[:10_000]
    values = [v for v in _SEPARATORS.split(text) if v]
    if not values:
        return _render(kind, owner_id, text=text, errors=[_("Write an address or a domain.")])
    if len(values) > MAX_PER_ADD:
        errors = [_("Add at most %(count)d entries at a time.", count=MAX_PER_ADD)]
        return _render(kind, owner_id, text=text, errors=errors)
    errors = []
    for value in values:
        try:
            lists.normalize(value)
        except lists.ListError:
            errors.append(_("%(value)s is not an address, a domain or a pattern.", value=value))
    if errors:
        return _render(kind, owner_id, text=text, errors=errors)
    session = web.session()
    comment = request.form.get("comment", "")[:255]
    for value in values:
        lists.add(
            session, web.actor(), action, value, mailbox=mailbox, domain=domain, comment=comment
        )
    session.commit()
    flash(
        _("Saved: %(patterns)s", patterns=", ".join(lists.normalize(v) for v in values)), "success"
    )
    return redirect(url_for(".owner_lists", kind=kind, owner_id=owner_id), 303)


@bp.post(f"/lists/{OWNER}/remove")
def list_remove(kind: str, owner_id: int) -> Response:
    """Take one pattern off the lists."""
    mailbox, domain, _name = _owner(kind, owner_id)
    pattern = request.form.get("pattern", "")[:400]
    session = web.session()
    try:
        lists.remove(session, web.actor(), pattern, mailbox=mailbox, domain=domain)
    except lists.ListError:
        flash(_("That entry is not on the list."), "error")
    else:
        session.commit()
        flash(_("Removed: %(pattern)s", pattern=pattern), "success")
    return redirect(url_for(".owner_lists", kind=kind, owner_id=owner_id), 303)
