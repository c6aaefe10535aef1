"""Reading the audit log: filter by mailbox, actor, action and time; export as CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from cleanmail.models import AuditEvent, Domain, Mailbox

COLUMNS = (
    "id",
    "at",
    "actor_type",
    "actor",
    "action",
    "mailbox",
    "message_id",
    "remote_addr",
    "detail",
)


@dataclass(frozen=True)
class Filter:
    """What to look for; empty fields match everything."""

    mailbox: str = ""  # an address, or part of one
    actor: str = ""  # an actor's name or type, or part of it
    action: str = ""  # an action, or its start ("message." for every message action)
    since: datetime | None = None
    until: datetime | None = None


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _query(criteria: Filter, domains: Iterable[str] | None) -> Any:
    query = select(AuditEvent, Mailbox.address).outerjoin(
        Mailbox, Mailbox.id == AuditEvent.mailbox_id
    )
    if domains is not None:
        ids = select(Domain.id).where(Domain.name.in_(list(domains)))
        query = query.where(Mailbox.domain_id.in_(ids))
    if criteria.mailbox:
        query = query.where(
            Mailbox.address.ilike(f"%{_escaped(criteria.mailbox.strip())}%", escape="\\")
        )
    if criteria.actor:
        pattern = f"%{_escaped(criteria.actor.strip())}%"
        query = query.where(
            or_(
                AuditEvent.actor.ilike(pattern, escape="\\"),
                AuditEvent.actor_type.ilike(pattern, escape="\\"),
            )
        )
    if criteria.action:
        query = query.where(
            AuditEvent.action.like(f"{_escaped(criteria.action.strip())}%", escape="\\")
        )
    if criteria.since is not None:
        query = query.where(AuditEvent.at >= criteria.since)
    if criteria.until is not None:
        query = query.where(AuditEvent.at < criteria.until)
    return query


def search(
    session: Session,
    criteria: Filter,
    *,
    domains: Iterable[str] | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[dict[str, Any]]:
    """Events newest first (``domains``: only events about mailboxes in those domains)."""
    query = _query(criteria, domains)
    if before_id is not None:
        query = query.where(AuditEvent.id < before_id)
    query = query.order_by(AuditEvent.id.desc()).limit(limit)
    return [_row(event, address) for event, address in session.execute(query)]


def iterate(
    session: Session, criteria: Filter, *, domains: Iterable[str] | None = None, batch: int = 1000
) -> Iterator[dict[str, Any]]:
    """Every matching event, newest first, read in batches (for exports)."""
    before: int | None = None
    while True:
        rows = search(session, criteria, domains=domains, limit=batch, before_id=before)
        yield from rows
        if len(rows) < batch:
            return
        before = rows[-1]["id"]


def _row(event: AuditEvent, address: str | None) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": event.at.isoformat(),
        "actor_type": event.actor_type,
        "actor": event.actor,
        "action": event.action,
        "mailbox": address or "",
        "message_id": event.message_id,
        "remote_addr": event.remote_addr or "",
        "detail": event.detail or {},
    }


def _cell(value: Any) -> Any:
    if isinstance(value, dict):
        value = json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        # A spreadsheet would run a cell that starts like a formula (CSV injection).
        return "'" + value
    return "" if value is None else value


def to_csv(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """CSV text, a header line then one line per event, in pieces for streaming."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_cell(row[column]) for column in COLUMNS])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
