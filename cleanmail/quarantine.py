"""The domain operations on quarantined mail: hold, find, list, delete, expire."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import String, Text, bindparam, cast, exists, func, or_, select, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from cleanmail import audit, learning, logs, mime, sql, stats
from cleanmail.models import Label, Mailbox, Message, RawMessage, Status, utcnow
from cleanmail.relay import Relay, RelayError
from cleanmail.store import Store, digest

log = logging.getLogger(__name__)


class QuarantineError(LookupError):
    """A quarantined message cannot be found or acted on; the message says why."""


@dataclass(frozen=True)
class Hold:
    """One recipient's copy of a message to keep in the quarantine."""

    mailbox_id: int
    score: float
    reasons: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Origin:
    """Where a message came from: envelope sender and the client that sent it."""

    sender: str = ""
    client_address: str | None = None
    client_helo: str | None = None


def hold(
    session: Session,
    store: Store,
    raw: bytes,
    parsed: mime.ParsedMessage,
    origin: Origin,
    holds: Sequence[Hold],
    *,
    retention_days: int,
    now: datetime | None = None,
    sha256: str | None = None,
) -> list[int]:
    """Store a message once and add a row per recipient; a retried message is not doubled.

    The raw file is written (or found) under the lock of its ``raw_messages`` row, so
    that a concurrent delete of the last reference cannot remove it after we checked.
    ``sha256``: the message's digest, when the caller has it already.
    """
    now = now or utcnow()
    sha = sha256 or digest(raw)
    lock_raw, insert_rows = _hold_statements(session.get_bind().dialect.name)
    connection = session.connection()
    connection.execute(lock_raw, {"sha256": sha, "size": len(raw), "created_at": now})
    store.ensure(sha, raw)
    sender_domain = mime.address_domain(parsed.from_address or origin.sender)
    rows = [
        {
            "mailbox_id": item.mailbox_id,
            "raw_sha256": sha,
            "envelope_sender": mime.clean_text(origin.sender, 998),
            "from_header": parsed.from_header,
            "from_address": parsed.from_address,
            "sender_domain": sender_domain[:253],
            "subject": parsed.subject,
            "message_id_header": parsed.message_id,
            "date_header": parsed.date,
            "size": len(raw),
            "score": item.score,
            "reasons": item.reasons,
            "status": Status.NEW,
            "received_at": now,
            "expires_at": now + timedelta(days=retention_days),
            "release_attempts": 0,
            "client_address": origin.client_address,
            "client_helo": mime.clean_text(origin.client_helo or "", 255) or None,
        }
        # In mailbox order: on PostgreSQL each row locks its mailbox's version (migration
        # 0009) until the commit, and one order for every message means no deadlock.
        for item in sorted(holds, key=lambda hold: hold.mailbox_id)
    ]
    if not rows:
        return []
    return list(connection.scalars(insert_rows, rows))


@functools.cache
def _hold_statements(dialect: str) -> tuple[Any, Any]:
    """The raw-message upsert and the message insert, built once per backend.

    The filter holds many messages a second: building these anew each time cost more
    than running them. Parameters rather than inline values, so they compile once.
    """
    upsert = sql.insert_for(dialect, RawMessage.__table__)
    lock_raw = upsert.on_conflict_do_update(
        index_elements=["sha256"], set_={"size": upsert.excluded.size}
    )
    insert_rows = (
        sql.insert_for(dialect, Message.__table__)
        .on_conflict_do_nothing(index_elements=["mailbox_id", "raw_sha256"])
        .returning(Message.__table__.c.id)
    )
    return lock_raw, insert_rows


def get(session: Session, message_id: int, *, mailbox: Mailbox | None = None) -> Message:
    """One quarantined message; limited to a mailbox when one is given."""
    query = select(Message).where(Message.id == message_id)
    if mailbox is not None:
        query = query.where(Message.mailbox_id == mailbox.id)
    message = session.scalar(query)
    if message is None:
        raise QuarantineError(f"no quarantined message {message_id}")
    return message


def list_messages(
    session: Session,
    *,
    mailbox: Mailbox | None = None,
    status: str | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[Message]:
    """Messages newest first, optionally for one mailbox and one status."""
    query = select(Message)
    if mailbox is not None:
        query = query.where(Message.mailbox_id == mailbox.id)
    if status is not None:
        query = query.where(Message.status == Status(status))
    if before_id is not None:
        query = query.where(Message.id < before_id)
    query = query.order_by(Message.received_at.desc(), Message.id.desc()).limit(limit)
    return list(session.scalars(query))


def raw(store: Store, message: Message) -> bytes:
    """The stored raw bytes of a message."""
    if message.raw_sha256 is None:
        raise QuarantineError(f"message {message.id} is {message.status}; its content is gone")
    return store.read(message.raw_sha256)


class ReleaseFailed(QuarantineError):
    """The mail server did not take a released message; it stays in the quarantine."""


@dataclass
class Prepared:
    """Read once for many releases: the content and its tokens by hash.

    Keeps the last content only: a bulk job's messages are in id order, and copies of
    one message (one campaign to many mailboxes) are usually close together.
    """

    _sha: str | None = None
    _raw: bytes = b""
    _tokens: list[str] | None = None

    def raw(self, store: Store, sha: str) -> bytes:
        """The content with this hash, from the store unless it was the last one read."""
        if sha != self._sha:
            self._raw, self._sha, self._tokens = store.read(sha), sha, None
        return self._raw

    def tokens(self, sha: str, raw: bytes) -> list[str]:
        """The classifier's tokens of the content last read (taken once per content)."""
        if sha != self._sha or self._tokens is None:
            self._tokens = learning.tokens_of(raw)
        return self._tokens


def release_header(message_id: int, sha: str, actor: audit.Actor, now: datetime) -> bytes:
    """The header lines a released message gets in front of its unchanged content.

    ``X-Cleanmail-Release-ID`` is the same every time one quarantined copy is sent, so
    that a copy delivered again (a bulk job resumed after a crash) can be recognised.
    """
    return (
        f"X-Cleanmail-Released: by {actor.type} at {now:%Y-%m-%d %H:%M:%S} UTC\r\n"
        f"X-Cleanmail-Release-ID: <{message_id}.{sha[:16]}@release.cleanmail>\r\n"
    ).encode()


def release(
    session: Session,
    store: Store,
    relay: Relay,
    message: Message,
    actor: audit.Actor,
) -> bool:
    """Deliver a held message to its mailbox once; False when it was already released.

    The row is locked while the relay takes the message, so two releases at the same
    time deliver it once. A refusal is recorded on the message (and raised) so that the
    owner sees the error and can try again. A bulk job releases many in one
    transaction instead (``releases.release_chunk``).
    """
    session.refresh(message, with_for_update=True)
    if message.status == Status.RELEASED:
        return False
    if message.status != Status.NEW or message.raw_sha256 is None:
        raise QuarantineError(f"message {message.id} is {message.status} and cannot be released")
    raw = store.read(message.raw_sha256)
    mailbox = session.get(Mailbox, message.mailbox_id)
    assert mailbox is not None
    address = mailbox.address
    now = utcnow()
    header = release_header(message.id, message.raw_sha256, actor, now)
    message.release_attempts += 1
    try:
        relay.send(message.envelope_sender, [address], raw, prefix=header)
    except RelayError as exc:
        message.release_error = str(exc)[:1000]
        audit.record(
            session,
            actor,
            "message.release_failed",
            mailbox_id=message.mailbox_id,
            message_id=message.id,
            error=message.release_error,
        )
        logs.event(
            log,
            "message.release_failed",
            level=logging.WARNING,
            message_id=message.id,
            mailbox_id=message.mailbox_id,
            actor=f"{actor.type}:{actor.name}",
            error=message.release_error,
        )
        raise ReleaseFailed(message.release_error) from exc
    message.status, message.released_at, message.release_error = Status.RELEASED, now, None
    stats.bump(session, "released", stats.address_domain(address))
    logs.event(
        log,
        "message.release",
        message_id=message.id,
        mailbox_id=message.mailbox_id,
        actor=f"{actor.type}:{actor.name}",
    )
    audit.record(
        session,
        actor,
        "message.release",
        mailbox_id=message.mailbox_id,
        message_id=message.id,
        subject=message.subject[:200],
    )
    # A release says the message was wanted: the classifier learns it as ham.
    learning.record(session, message, Label.HAM, actor, source="release", raw=raw)
    return True


def delete(session: Session, store: Store, message: Message, actor: audit.Actor) -> None:
    """Delete a message from the quarantine for good."""
    if message.status == Status.DELETED:
        return
    _drop_reference(session, store, message, Status.DELETED)
    audit.record(
        session,
        actor,
        "message.delete",
        mailbox_id=message.mailbox_id,
        message_id=message.id,
        subject=message.subject[:200],
    )


def expire(session: Session, store: Store, message: Message) -> None:
    """Mark a message expired at the end of its retention and free its content."""
    _drop_reference(session, store, message, Status.EXPIRED)
    audit.record(
        session,
        audit.SYSTEM,
        "message.expire",
        mailbox_id=message.mailbox_id,
        message_id=message.id,
    )


def _drop_reference(session: Session, store: Store, message: Message, status: Status) -> None:
    """Detach a row from its raw file, removing the file with its last reference.

    The ``raw_messages`` row is locked first (the same order as ``hold``), so that a
    message arriving with the same bytes waits and then writes the file again.
    """
    sha = message.raw_sha256
    if sha is not None:
        session.execute(select(RawMessage.sha256).where(RawMessage.sha256 == sha).with_for_update())
    message.status = status
    message.raw_sha256 = None
    session.flush()
    if sha is None:
        return
    if not session.scalar(select(exists().where(Message.raw_sha256 == sha))):
        session.execute(RawMessage.__table__.delete().where(RawMessage.sha256 == sha))
        store.discard(session, sha)


# The owner's list: search with keyset pagination on (received_at, id).


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
