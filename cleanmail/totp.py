"""Two-step login: TOTP secrets and codes (RFC 6238, via pyotp) and one-time recovery codes.

A code is accepted once: the time step it belongs to is marked used in the shared
rate-limit table, so a code seen over someone's shoulder cannot be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import timedelta

import pyotp
import segno
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from cleanmail import audit, ratelimit
from cleanmail.models import Mailbox, RateLimit, RecoveryCode, utcnow

ISSUER = "Cleanmail"
DIGITS = 6
VALID_WINDOW = 1  # one 30-second step either side: phone clocks drift
RECOVERY_CODES = 10
# Without 0/o and 1/l/i, so that a code written on paper reads back unambiguously.
_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
# A used step stays marked for longer than any code of that step is accepted.
_USED_FOR = timedelta(minutes=5)


class TotpError(ValueError):
    """Two-step login cannot be changed as asked; the message says why."""


def new_secret() -> str:
    """A fresh random base32 secret for an authenticator app."""
    return pyotp.random_base32()


def provisioning_uri(secret: str, address: str) -> str:
    """The otpauth:// URI that an authenticator app reads from the QR code."""
    return pyotp.TOTP(secret).provisioning_uri(name=address, issuer_name=ISSUER)


def qr_svg(uri: str) -> str:
    """The URI as an inline SVG QR code (no external image, no inline style)."""
    return segno.make(uri, error="m").svg_inline(scale=5, dark="#000", light="#fff")


def _normalize_code(code: str) -> str:
    return "".join(code.split())


def matching_step(secret: str, code: str, at: float | None = None) -> int | None:
    """The time step whose code this is, within the allowed clock drift, or None."""
    code = _normalize_code(code)
    if len(code) != DIGITS or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS)
    now_step = int((time.time() if at is None else at) // totp.interval)
    for step in range(now_step - VALID_WINDOW, now_step + VALID_WINDOW + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


def _used_key(mailbox_id: int, step: int) -> str:
    return f"totp-used:{mailbox_id}:{step}"


def verify_code(
    session: Session,
    mailbox: Mailbox,
    code: str,
    *,
    secret: str | None = None,
    at: float | None = None,
) -> bool:
    """Whether a code is right and unused; marks its time step used so it cannot be replayed."""
    secret = secret or mailbox.totp_secret
    if not secret:
        return False
    step = matching_step(secret, code, at)
    if step is None:
        return False
    # A code of a step older than one already used is stale too (RFC 6238, section 5.2).
    later = [_used_key(mailbox.id, s) for s in range(step + 1, step + 2 * VALID_WINDOW + 1)]
    used_later = session.scalar(
        select(func.count()).select_from(RateLimit).where(RateLimit.key.in_(later))
    )
    if used_later:
        return False
    # hit() is an atomic upsert: of two requests racing with one code, only one wins.
    return ratelimit.hit(session, _used_key(mailbox.id, step), limit=1, window=_USED_FOR)


def _hash_recovery(code: str) -> str:
    normalized = "".join(c for c in code.lower() if c.isalnum())
    return hashlib.sha256(normalized.encode()).hexdigest()


def _new_recovery_code() -> str:
    groups = ("".join(secrets.choice(_ALPHABET) for _ in range(5)) for _ in range(2))
    return "-".join(groups)


def new_recovery_codes(session: Session, mailbox: Mailbox) -> list[str]:
    """Replace a mailbox's recovery codes with ten new ones: shown once, stored hashed."""
    session.execute(delete(RecoveryCode).where(RecoveryCode.mailbox_id == mailbox.id))
    codes = [_new_recovery_code() for _ in range(RECOVERY_CODES)]
    session.add_all(RecoveryCode(mailbox_id=mailbox.id, code_hash=_hash_recovery(c)) for c in codes)
    session.flush()
    return codes


def use_recovery_code(session: Session, mailbox: Mailbox, code: str) -> bool:
    """Whether a recovery code is one of the mailbox's unused ones; it is then used up."""
    if not any(c.isalnum() for c in code):
        return False
    # One conditional UPDATE, so that two requests racing with one code cannot both win.
    result = session.execute(
        update(RecoveryCode)
        .where(
            RecoveryCode.mailbox_id == mailbox.id,
            RecoveryCode.code_hash == _hash_recovery(code),
            RecoveryCode.used_at.is_(None),
        )
        .values(used_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def recovery_codes_left(session: Session, mailbox: Mailbox) -> int:
    """How many unused recovery codes a mailbox has."""
    return (
        session.scalar(
            select(func.count())
            .select_from(RecoveryCode)
            .where(RecoveryCode.mailbox_id == mailbox.id, RecoveryCode.used_at.is_(None))
        )
        or 0
    )


def enable(
    session: Session, actor: audit.Actor, mailbox: Mailbox, secret: str, code: str
) -> list[str]:
    """Turn two-step login on once the app shows a right code; returns the recovery codes."""
    if not verify_code(session, mailbox, code, secret=secret):
        raise TotpError("the code from the app is not right")
    mailbox.totp_secret = secret
    codes = new_recovery_codes(session, mailbox)
    audit.record(session, actor, "totp.enable", mailbox_id=mailbox.id)
    return codes


def disable(session: Session, actor: audit.Actor, mailbox: Mailbox) -> None:
    """Turn two-step login off and forget the recovery codes."""
    mailbox.totp_secret = None
    session.execute(delete(RecoveryCode).where(RecoveryCode.mailbox_id == mailbox.id))
    audit.record(session, actor, "totp.disable", mailbox_id=mailbox.id)
    session.flush()
