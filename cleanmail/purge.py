"""Purging: messages past their retention, and stored files that no row refers to any more.

A message's ``expires_at`` is set from ``retention_days`` when it is held, so expiry
only compares it with the clock. The domain functions never commit; ``run()`` is the
job-level loop that commits a batch at a time, for the scheduler and ``cleanmail purge``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cleanmail import db, quarantine, sql
from cleanmail.models import Message, RawMessage, Status
from cleanmail.store import Store

BATCH = 1000
# A file is written under its row's lock, but a row may still be uncommitted (or a crash may
# have lost it) just after the file lands; files younger than this are never swept.
ORPHAN_GRACE = timedelta(hours=1)
EXPIRABLE = (Status.NEW, Status.RELEASED)


@dataclass(frozen=True)
class Result:
    """What a purge did, or would do on a dry run."""

    expired: int
    orphans: int
    dry_run: bool = False


def _due(now: datetime) -> list[object]:
    return [Message.status.in_(EXPIRABLE), Message.expires_at <= now]


def count_expired(session: Session, now: datetime) -> int:
    """How many messages are past their retention and not yet expired."""
    return session.scalar(select(func.count()).select_from(Message).where(*_due(now))) or 0


def expire_batch(session: Session, store: Store, now: datetime, limit: int = BATCH) -> int:
    """Expire up to ``limit`` messages past their retention; the caller commits."""
    # SKIP LOCKED: a message being released or deleted right now is left for the next batch,
    # and a manual `cleanmail purge` beside the scheduler does not wait on it.
    query = (
        select(Message)
        .where(*_due(now))
        .order_by(Message.expires_at, Message.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    messages = list(session.scalars(query))
    # In mailbox order: each expiry locks its mailbox's version row (migration 0009), and
    # the filter takes them in this order too, so neither waits on the other in a circle.
    for message in sorted(messages, key=lambda message: message.mailbox_id):
        quarantine.expire(session, store, message)
    return len(messages)


def expired(database: db.Database, store: Store, now: datetime, *, batch: int = BATCH) -> int:
    """Expire every message past its retention, committing after each batch."""
    total = 0
    while True:
        with database.session_scope(write=True) as session:
            done = expire_batch(session, store, now, batch)
        total += done
        if done < batch:
            return total


def find_orphans(
    session: Session, store: Store, older_than: datetime, *, keys: Iterable[str] | None = None
) -> Iterator[str]:
    """Stored files older than ``older_than`` that no ``raw_messages`` row names (no locks)."""
    cutoff = older_than.timestamp()
    for chunk in _chunks(store.iter_keys() if keys is None else keys, 500):
        known = set(session.scalars(select(RawMessage.sha256).where(RawMessage.sha256.in_(chunk))))
        for key in chunk:
            if key not in known and _modified(store, key) < cutoff:
                yield key


def orphan_files(
    session: Session, store: Store, older_than: datetime, *, keys: Iterable[str] | None = None
) -> int:
    """Delete stored files no row refers to and older than ``older_than``; the caller commits.

    Each file is claimed by inserting its ``raw_messages`` row, the lock ``quarantine.hold``
    takes before it writes a file: a message arriving with the same bytes waits for us and
    then writes the file again, and a row committed since we looked makes the claim fail.
    """
    removed = 0
    claim = sql.insert(session, RawMessage.__table__).on_conflict_do_nothing(
        index_elements=["sha256"]
    )
    for key in list(find_orphans(session, store, older_than, keys=keys)):
        claimed = session.scalar(
            claim.returning(RawMessage.__table__.c.sha256),
            {"sha256": key, "size": 0, "created_at": older_than},
        )
        if claimed is None:
            continue
        session.execute(RawMessage.__table__.delete().where(RawMessage.sha256 == key))
        store.discard(session, key)
        removed += 1
    return removed


def run(
    database: db.Database,
    store: Store,
    now: datetime,
    *,
    dry_run: bool = False,
    batch: int = BATCH,
    grace: timedelta = ORPHAN_GRACE,
) -> Result:
    """Expire due messages, then sweep unreferenced files, a committed batch at a time."""
    older_than = now - grace
    if dry_run:
        with database.session_scope() as session:
            expiring = count_expired(session, now)
            # Files that only lose their last row in this run are not counted.
            orphans = sum(1 for _ in find_orphans(session, store, older_than))
        return Result(expiring, orphans, dry_run=True)
    expiring = expired(database, store, now, batch=batch)
    orphans = 0
    for chunk in _chunks(store.iter_keys(), batch):
        with database.session_scope(write=True) as session:
            orphans += orphan_files(session, store, older_than, keys=chunk)
    return Result(expiring, orphans)


def _chunks(keys: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(keys)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _modified(store: Store, key: str) -> float:
    try:
        return store.located(key).stat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone already: nothing to sweep
