"""The audit log: who changed a message's fate or a setting, what, when, from where."""

from __future__ import annotations

import getpass
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from cleanmail.models import AuditEvent, utcnow


@dataclass(frozen=True)
class Actor:
    """Who does something: an owner, an operator, an API token, or the system."""

    type: str
    name: str = ""
    remote_addr: str | None = None


SYSTEM = Actor("system", "cleanmail")


def cli_actor() -> Actor:
    """The person at the command line, named by their login."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Actor("system", f"cli:{user}")


def record(
    session: Session,
    actor: Actor,
    action: str,
    /,
    *,
    mailbox_id: int | None = None,
    message_id: int | None = None,
    **detail: Any,
) -> AuditEvent:
    """Add one event to the audit log (committed with the change it describes)."""
    event = AuditEvent(
        actor_type=actor.type,
        actor=actor.name,
        action=action,
        mailbox_id=mailbox_id,
        message_id=message_id,
        detail=detail,
        remote_addr=actor.remote_addr,
    )
    session.add(event)
    return event


def record_many(
    session: Session,
    actor: Actor,
    action: str,
    events: Iterable[tuple[int | None, int | None, dict[str, Any]]],
) -> None:
    """Add one event per (mailbox_id, message_id, detail) with one multi-row insert."""
    at = utcnow()
    rows = [
        {
            "at": at,
            "actor_type": actor.type,
            "actor": actor.name,
            "action": action,
            "mailbox_id": mailbox_id,
            "message_id": message_id,
            "detail": detail,
            "remote_addr": actor.remote_addr,
        }
        for mailbox_id, message_id, detail in events
    ]
    if rows:
        table = AuditEvent.__table__  # RETURNING: one INSERT of many rows ("insertmanyvalues")
        session.execute(insert(table).returning(table.c.id), rows)
