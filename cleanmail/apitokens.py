"""API tokens: created once and shown once, stored as a hash, scoped to operator or domains."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cleanmail import audit
from cleanmail.models import ApiToken, Domain, utcnow

PREFIX = "cm_"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# last_used_at is written at most this often, so that a busy token does not write per request.
TOUCH_EVERY = timedelta(minutes=1)


class TokenError(ValueError):
    """A token cannot be created, found or used; the message says why."""


@dataclass(frozen=True)
class Created:
    """A new token: its row and the secret, which is shown once and never stored."""

    token: ApiToken
    secret: str


def hash_secret(secret: str) -> str:
    """The stored form of a token (the secrets are random, so one SHA-256 suffices)."""
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


def create(session: Session, actor: audit.Actor, name: str, domains: Iterable[str] = ()) -> Created:
    """Make a token; no domains means operator scope (every domain)."""
    name = name.strip()
    if not NAME.match(name):
        raise TokenError("a token name is 1-100 letters, digits, dots, dashes or underscores")
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise TokenError(f"a token named {name!r} exists already")
    wanted = sorted({d.strip().lower() for d in domains if d.strip()})
    known = set(session.scalars(select(Domain.name).where(Domain.name.in_(wanted))))
    missing = [d for d in wanted if d not in known]
    if missing:
        raise TokenError(f"not a served domain: {missing[0]}")
    secret = PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=name,
        token_hash=hash_secret(secret),
        prefix=secret[:10],
        domains=wanted,
        created_by=actor.name,
    )
    session.add(token)
    session.flush()
    audit.record(session, actor, "token.create", token=name, domains=wanted or ["*"])
    return Created(token, secret)


def list_tokens(session: Session, *, include_revoked: bool = False) -> list[ApiToken]:
    """The tokens, oldest first."""
    query = select(ApiToken).order_by(ApiToken.id)
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke(session: Session, actor: audit.Actor, name: str) -> ApiToken:
    """Revoke a token by name; it stops working at once."""
    token = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if token is None:
        raise TokenError(f"no token named {name!r}")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        audit.record(session, actor, "token.revoke", token=name)
    return token


def authenticate(session: Session, secret: str) -> ApiToken | None:
    """The live token with this secret, or None."""
    if not secret.startswith(PREFIX) or len(secret) > 200:
        return None
    wanted = hash_secret(secret)
    token = session.scalar(select(ApiToken).where(ApiToken.token_hash == wanted))
    if token is None or token.revoked_at is not None:
        return None
    if not hmac.compare_digest(token.token_hash, wanted):
        return None
    return token


def needs_touch(token: ApiToken) -> bool:
    """Whether the token's last use is worth writing down again (at most once a minute)."""
    return token.last_used_at is None or utcnow() - token.last_used_at > TOUCH_EVERY


def touch(session: Session, token_id: int) -> None:
    """Note that a token was used now."""
    session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=utcnow()))
