"""Fixed-window rate limits kept in the database, so every web process shares them."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from cleanmail import sql
from cleanmail.models import RateLimit, utcnow


def hit(session: Session, key: str, *, limit: int, window: timedelta) -> bool:
    """Count one attempt under a key; False when the key is over its limit in this window."""
    now, key = utcnow(), key[:255]
    session.execute(
        sql.insert(session, RateLimit)
        .values(key=key, window_start=now, count=0)
        .on_conflict_do_nothing(index_elements=["key"])
    )
    row = session.scalars(select(RateLimit).where(RateLimit.key == key).with_for_update()).one()
    if now - row.window_start >= window:
        row.window_start, row.count = now, 0
    row.count += 1
    session.flush()
    return row.count <= limit


def exceeded(session: Session, key: str, *, limit: int, window: timedelta) -> bool:
    """Whether a key is over its limit now, without counting an attempt."""
    row = session.scalar(select(RateLimit).where(RateLimit.key == key[:255]))
    return row is not None and utcnow() - row.window_start < window and row.count >= limit


def refund(session: Session, key: str) -> None:
    """Take back one counted attempt (one that turned out to be no attack)."""
    session.execute(
        update(RateLimit)
        .where(RateLimit.key == key[:255], RateLimit.count > 0)
        .values(count=RateLimit.count - 1)
    )


def reset(session: Session, key: str) -> None:
    """Forget a key's attempts (after a successful login)."""
    session.execute(delete(RateLimit).where(RateLimit.key == key[:255]))


def purge(session: Session, older_than: timedelta) -> int:
    """Delete counters whose window ended long ago."""
    result = session.execute(
        delete(RateLimit).where(RateLimit.window_start < utcnow() - older_than)
    )
    return result.rowcount or 0
