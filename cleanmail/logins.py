"""Login sessions: how long one lasts, and the ones ended by logging out.

The session lives in a signed cookie, so logging out in one browser cannot take a copy
of that cookie back. Each login gets a random session id in its cookie instead; logging
out records the id, and a cookie with a recorded id logs nobody in. A record is needed
only while the cookie could still be valid, so the purge job forgets older ones.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from cleanmail.models import EndedSession, utcnow

LIFETIME = timedelta(hours=12)  # a session cookie's life (Flask's PERMANENT_SESSION_LIFETIME)
KEPT = LIFETIME + timedelta(hours=1)  # an ended id is remembered this long


def new_id() -> str:
    """A fresh session id for a login."""
    return secrets.token_urlsafe(24)


def end(session: Session, sid: str) -> None:
    """Record that the login session ``sid`` ended; its cookie no longer counts."""
    session.merge(EndedSession(sid=sid[:64], ended_at=utcnow()))


def purge(session: Session, now: datetime) -> int:
    """Forget ended sessions whose cookies have expired anyway."""
    result = session.execute(delete(EndedSession).where(EndedSession.ended_at < now - KEPT))
    return result.rowcount or 0  # type: ignore[attr-defined]
