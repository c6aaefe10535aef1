"""API views for lists, mailboxes, login links, report status and statistics."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request
from sqlalchemy import select

from cleanmail import audit, lists, reports, stats, tokens, web
from cleanmail.models import Domain, ListAction, ListEntry, Mailbox, Report, Scope
from cleanmail.web import api

SCOPES = tuple(s.value for s in Scope)
ACTIONS = tuple(a.value for a in ListAction)


def _owner(scope: str, owner: str) -> tuple[Mailbox | None, Domain | None]:
    """The mailbox or domain that owns a list, checked against the token's scope."""
    if scope == Scope.GLOBAL:
        api.require_operator()
        return None, None
    if not owner:
        api.fail(400, f"owner is required for {scope} lists")
    if scope == Scope.DOMAIN:
        return None, api.visible_domain(owner)
    return api.visible_mailbox(owner), None


def _scope_arg(value: Any) -> str:
    if value not in SCOPES:
        api.fail(400, f"scope must be one of {', '.join(SCOPES)}")
    return value


def entry_json(entry: ListEntry, owner: str) -> dict[str, Any]:
    """A list entry as the API shows it."""
    return {
        "id": entry.id,
        "scope": entry.scope,
        "owner": owner,
        "action": entry.action,
        "pattern": entry.pattern,
        "comment": entry.comment,
        "created_at": entry.created_at.isoformat(),
    }


@api.route("/lists", methods=["GET"])
def list_entries() -> Response:
    """The allow and block entries of one owner (global, a domain or a mailbox)."""
    scope = _scope_arg(request.args.get("scope", "global"))
    owner = request.args.get("owner", "")
    mailbox, domain = _owner(scope, owner)
    entries = lists.owned_by(web.session(), mailbox=mailbox, domain=domain)
    name = mailbox.address if mailbox else domain.name if domain else ""
    return jsonify(entries=[entry_json(e, name) for e in entries])


@api.route("/lists", methods=["POST"])
def add_entry() -> tuple[Response, int]:
    """Put a pattern on an allow or block list (moving it off the other one)."""
    data = api.body()
    scope = _scope_arg(api.field(data, "scope", str))
    action = api.field(data, "action", str)
    if action not in ACTIONS:
        api.fail(400, f"action must be one of {', '.join(ACTIONS)}")
    pattern = api.field(data, "pattern", str)
    comment = api.field(data, "comment", str, "")
    mailbox, domain = _owner(scope, api.field(data, "owner", str, ""))
    session = web.session()
    entry = lists.add(
        session, api.actor(), action, pattern, mailbox=mailbox, domain=domain, comment=comment
    )
    session.commit()
    name = mailbox.address if mailbox else domain.name if domain else ""
    return jsonify(entry_json(entry, name)), 201


@api.route("/lists/<int:entry_id>", methods=["DELETE"])
def remove_entry(entry_id: int) -> Response:
    """Take an entry off its list."""
    session = web.session()
    entry = session.get(ListEntry, entry_id) if entry_id <= api.MAX_SMALL_ID else None
    if entry is None:
        api.fail(404, f"no list entry {entry_id}")
    mailbox = session.get(Mailbox, entry.mailbox_id) if entry.mailbox_id else None
    domain = session.get(Domain, entry.domain_id) if entry.domain_id else None
    if entry.scope == Scope.GLOBAL:
        api.require_operator()
    elif not api.may_see_domain(domain.name if domain else api.domain_of(mailbox)):  # type: ignore[arg-type]
        api.fail(404, f"no list entry {entry_id}")
    lists.remove(session, api.actor(), entry.pattern, mailbox=mailbox, domain=domain)
    session.commit()
    return jsonify(deleted=True, id=entry_id)


def mailbox_json(mailbox: Mailbox) -> dict[str, Any]:
    """A mailbox as the API shows it."""
    return {
        "address": mailbox.address,
        "role": mailbox.role,
        "disabled": mailbox.disabled,
        "language": mailbox.language,
        "report_frequency": mailbox.report_frequency,
        "report_hour": mailbox.report_hour,
        "timezone": mailbox.timezone,
        "has_password": mailbox.password_hash is not None,
        "created_at": mailbox.created_at.isoformat(),
        "last_login_at": mailbox.last_login_at and mailbox.last_login_at.isoformat(),
        "last_report_at": mailbox.last_report_at and mailbox.last_report_at.isoformat(),
    }


@api.route("/mailboxes", methods=["GET"])
def find_mailboxes() -> Response:
    """Mailboxes whose address contains ``q``, by address."""
    text = request.args.get("q", "").strip().lower()
    limit = api.int_arg("limit", 50, 1, 500)
    query = select(Mailbox).order_by(Mailbox.address).limit(limit)
    if text:
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Mailbox.address.like(f"%{escaped}%", escape="\\"))
    allowed = api.domains()
    if allowed is not None:
        query = query.where(
            Mailbox.domain_id.in_(select(Domain.id).where(Domain.name.in_(allowed)))
        )
    found = web.session().scalars(query)
    return jsonify(mailboxes=[mailbox_json(m) for m in found])


@api.route("/mailboxes/<path:address>", methods=["GET"])
def mailbox(address: str) -> Response:
    """A mailbox's settings and its last reports."""
    found = api.visible_mailbox(address)
    recent = web.session().scalars(
        select(Report)
        .where(Report.mailbox_id == found.id)
        .order_by(Report.created_at.desc(), Report.id.desc())
        .limit(20)
    )
    return jsonify(
        {
            **mailbox_json(found),
            "reports": [
                {
                    "id": r.id,
                    "created_at": r.created_at.isoformat(),
                    "status": r.status,
                    "message_count": r.message_count,
                    "attempts": r.attempts,
                    "sent_at": r.sent_at and r.sent_at.isoformat(),
                    "last_error": r.last_error,
                }
                for r in recent
            ],
        }
    )


@api.route("/mailboxes/<path:address>/login-link", methods=["POST"])
def login_link(address: str) -> tuple[Response, int]:
    """A fresh login link for a mailbox owner (valid 15 days; audited)."""
    found = api.visible_mailbox(address)
    if found.disabled:
        api.fail(409, f"{found.address} is disabled")
    config = web.config()
    url = tokens.login_url(config.base_url, config.secret_keys, found.id, found.key_version)
    session = web.session()
    audit.record(
        session, api.actor(), "login_link.issue", mailbox_id=found.id, address=found.address
    )
    session.commit()
    return jsonify(address=found.address, url=url), 201


@api.route("/reports/status", methods=["GET"])
def report_status() -> Response:
    """The last report run and the reports waiting or failed (operator tokens)."""
    api.require_operator()
    status = reports.status(web.session())
    last = status["last_run"]
    return jsonify(
        last_run=None
        if last is None
        else {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in last.items()},
        pending=status["pending"],
        retrying=status["retrying"],
        failed=status["failed"],
        sent=status["sent"],
        retries=[
            {
                "id": r["id"],
                "attempts": r["attempts"],
                "next_attempt_at": r["next_attempt_at"] and r["next_attempt_at"].isoformat(),
                "last_error": r["last_error"],
            }
            for r in status["retries"]
        ],
    )


@api.route("/stats", methods=["GET"])
def statistics() -> Response:
    """Counters per day, top reasons, top sending domains held, release rate."""
    days = api.int_arg("days", 14, 1, 366)
    wanted = request.args.getlist("domain")
    allowed = api.domains()
    if wanted:
        for name in wanted:
            if not api.may_see_domain(name):
                api.fail(404, f"no domain {name[:253]}")
        allowed = [name.lower() for name in wanted]
    return jsonify(stats.summary(web.session(), days, allowed).as_dict())
