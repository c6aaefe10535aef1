"""The domain operations on quarantined mail: hold, find, release, delete, expire."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, select
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
    connection = session.connection()
    return hold_on_driver(
        connection.connection,
        connection.dialect,
        store,
        raw,
        parsed,
        origin,
        holds,
        retention_days=retention_days,
        now=now,
        sha256=sha256,
    )


def hold_on_driver(
    dbapi_connection: Any,
    dialect: Any,
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
    """``hold`` on the driver's connection, inside the transaction it has open.

    The filter's group commit runs this for many messages a second; the rows are the
    same as through a Session (the same statements and type processing).
    """
    now = now or utcnow()
    sha = sha256 or digest(raw)
    lock_raw, insert_row = _hold_statements(dialect)
    sender_domain = mime.address_domain(parsed.from_address or origin.sender)
    cursor = dbapi_connection.cursor()
    try:
        lock_raw.execute(cursor, {"sha256": sha, "size": len(raw), "created_at": now})
        store.ensure(sha, raw)
        ids = []
        # In mailbox order: on PostgreSQL each row locks its mailbox's version (migration
        # 0009) until the commit, and one order for every message means no deadlock.
        for item in sorted(holds, key=lambda hold: hold.mailbox_id):
            row = {
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
            # Nothing comes back for a copy held already (a retried message).
            ids += [found for (found,) in insert_row.execute(cursor, row).fetchall()]
        return ids
    finally:
        cursor.close()


_HOLD_COLUMNS = (
    "mailbox_id raw_sha256 envelope_sender from_header from_address sender_domain subject "
    "message_id_header date_header size score reasons status received_at expires_at "
    "release_attempts client_address client_helo"
).split()
_hold_compiled: dict[tuple[str, str], tuple[sql.DriverStatement, sql.DriverStatement]] = {}


def _hold_statements(dialect: Any) -> tuple[sql.DriverStatement, sql.DriverStatement]:
    """The raw-message upsert and the message insert, compiled once per backend."""
    key = (dialect.name, dialect.driver)
    found = _hold_compiled.get(key)
    if found is None:
        upsert = sql.insert_for(dialect.name, RawMessage.__table__)
        lock_raw = upsert.on_conflict_do_update(
            index_elements=["sha256"], set_={"size": upsert.excluded.size}
        )
        insert_row = (
            sql.insert_for(dialect.name, Message.__table__)
            .on_conflict_do_nothing(index_elements=["mailbox_id", "raw_sha256"])
            .returning(Message.__table__.c.id)
        )
        found = _hold_compiled[key] = (
            sql.DriverStatement(lock_raw, dialect, ["sha256", "size", "created_at"]),
            sql.DriverStatement(insert_row, dialect, _HOLD_COLUMNS),
        )
    return found


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
