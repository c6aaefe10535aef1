"""An owner's quarantine list: what to look for, and newest-first pages of it.

Pages use keyset pagination on (received_at, id), so page 100 costs what page 1 does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import String, Text, bindparam, cast, exists, func, or_, select, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from cleanmail.models import Message, Status


@dataclass(frozen=True)
class Cursor:
    """A place in a newest-first list: the time and id of a message at a page's edge."""

    received_at: datetime
    id: int


@dataclass(frozen=True)
class Criteria:
    """What an owner looks for: statuses, text in sender or subject, a reason, a time range."""

    statuses: tuple[str, ...] = (Status.NEW,)
    text: str = ""
    reason: str = ""
    since: datetime | None = None
    until: datetime | None = None


# What the owner's list shows of a message, plus its cursor. The time and the reasons come
# as the driver gives them (text on SQLite): the web app decodes only the rows it has not
# rendered before, and SQLAlchemy's type processing cost more than the rest of a row.
LISTED = (
    Message.id,
    type_coerce(Message.received_at, String).label("received_at"),
    Message.from_header,
    Message.envelope_sender,
    Message.subject,
    cast(Message.reasons, Text).label("reasons"),
    Message.size,
    Message.status,
    Message.release_error.is_not(None).label("release_failed"),
)


@dataclass(frozen=True)
class Page:
    """One page of a list, newest first (rows of ``LISTED``), with the cursors around it."""

    messages: list[Any]
    newer: Cursor | None
    older: Cursor | None


def search(
    session: Session,
    mailbox_id: int,
    criteria: Criteria,
    *,
    before: Cursor | None = None,
    after: Cursor | None = None,
    limit: int = 50,
) -> Page:
    """One page of a mailbox's messages, newest first, before or after a cursor.

    Keyset pagination: each page is an index range scan from the cursor, so the
    thousandth page costs what the first does. Core rows through the session's
    connection: the ORM's statement handling cost as much as the query.
    """
    cursor = after or before
    newer = after is not None
    params: dict[str, Any] = {"mailbox": mailbox_id, "limit": limit + 1}
    if cursor is not None:
        params.update(at=cursor.received_at, id=cursor.id)
    if criteria.since is not None:
        params["since"] = criteria.since
    if criteria.until is not None:
        params["until"] = criteria.until
    query = _page_query(
        tuple(Status(status).value for status in criteria.statuses),
        criteria.since is not None,
        criteria.until is not None,
        None if cursor is None else newer,
    )
    extra = _filters(session, criteria)
    rows = session.connection().execute(query.where(*extra) if extra else query, params).all()
    if newer:
        if not rows:
            return search(session, mailbox_id, criteria, limit=limit)
        more, rows = len(rows) > limit, rows[:limit][::-1]
        return Page(rows, _cursor(rows[0]) if more else None, _cursor(rows[-1]))
    more, rows = len(rows) > limit, rows[:limit]
    newer_cursor = _cursor(rows[0]) if before is not None and rows else None
    return Page(rows, newer_cursor, _cursor(rows[-1]) if more else None)


@lru_cache(maxsize=64)
def _page_query(statuses: tuple[str, ...], since: bool, until: bool, newer: bool | None) -> Any:
    """A page's statement without its search text and reason, built once per shape.

    Its values are parameters (``mailbox``, ``limit``, ``since``, ``until``, and the
    cursor's ``at`` and ``id``): building and keying the statement anew for each
    page cost more than running it.
    """
    conditions: list[Any] = [Message.mailbox_id == bindparam("mailbox")]
    conditions.append(
        Message.status == statuses[0] if len(statuses) == 1 else Message.status.in_(statuses)
    )
    if since:
        conditions.append(Message.received_at >= bindparam("since"))
    if until:
        conditions.append(Message.received_at < bindparam("until"))
    at, ident = bindparam("at"), bindparam("id")
    if newer is True:
        conditions += [
            Message.received_at >= at,
            (Message.received_at > at) | (Message.id > ident),
        ]
        order = (Message.received_at.asc(), Message.id.asc())
    else:
        if newer is False:  # written so that the index range on received_at is used
            conditions += [
                Message.received_at <= at,
                (Message.received_at < at) | (Message.id < ident),
            ]
        order = (Message.received_at.desc(), Message.id.desc())
    return select(*LISTED).where(*conditions).order_by(*order).limit(bindparam("limit"))


def _filters(session: Session, criteria: Criteria) -> list[Any]:
    """The conditions for a search text and a reason, when given."""
    conditions: list[Any] = []
    if criteria.text:
        escaped = criteria.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        conditions.append(
            or_(
                *(
                    column.ilike(pattern, escape="\\")
                    for column in (Message.subject, Message.from_header, Message.envelope_sender)
                )
            )
        )
    if criteria.reason:
        conditions.append(has_reason(session, criteria.reason))
    return conditions


def _cursor(row: Any) -> Cursor:
    return Cursor(received_time(row.received_at), row.id)


def received_time(value: datetime | str) -> datetime:
    """A listed row's arrival time, UTC-aware (SQLite gives naive UTC text)."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    return value.astimezone(UTC)


def has_reason(session: Session, code: str) -> Any:
    """A message whose reasons include one with this code, in each backend's JSON."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(Message.reasons, JSONB).contains([{"code": code}])
    each = func.json_each(Message.reasons).table_valued("value")
    return exists().select_from(each).where(func.json_extract(each.c.value, "$.code") == code)


def count_new(session: Session, mailbox_id: int) -> int:
    """How many messages of a mailbox wait in the quarantine (an index-only count)."""
    return session.connection().scalar(_COUNT_NEW, {"mailbox": mailbox_id}) or 0


_COUNT_NEW = (
    select(func.count())
    .select_from(Message)
    .where(Message.mailbox_id == bindparam("mailbox"), Message.status == Status.NEW.value)
)


def owned(session: Session, mailbox_id: int, ids: Sequence[int]) -> list[Message]:
    """The messages with these ids that belong to a mailbox, newest first."""
    query = select(Message).where(Message.mailbox_id == mailbox_id, Message.id.in_(list(ids)))
    return list(session.scalars(query.order_by(Message.received_at.desc(), Message.id.desc())))
