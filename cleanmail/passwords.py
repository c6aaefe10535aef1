"""Password rules and argon2id hashing."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 8
MAX_LENGTH = 1024
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters

# A hash to verify against when the mailbox is unknown, so both cases take the same time.
_DUMMY = _hasher.hash("not a password of anyone")


def unmet_rules(password: str) -> list[str]:
    """The rules a password breaks: "length", "lower", "upper", "digit", "too_long"."""
    unmet = []
    if len(password) < MIN_LENGTH:
        unmet.append("length")
    if len(password) > MAX_LENGTH:
        unmet.append("too_long")
    if not any(c.islower() for c in password):
        unmet.append("lower")
    if not any(c.isupper() for c in password):
        unmet.append("upper")
    if not any(c.isdigit() for c in password):
        unmet.append("digit")
    return unmet


def hash_password(password: str) -> str:
    """An argon2id hash of a password."""
    return _hasher.hash(password)


def verify(password_hash: str | None, password: str) -> bool:
    """Whether a password matches; takes as long for a missing hash as for a wrong one."""
    try:
        return _hasher.verify(password_hash or _DUMMY, password[:MAX_LENGTH]) and bool(
            password_hash
        )
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """Whether a stored hash uses older parameters than today's."""
    return _hasher.check_needs_rehash(password_hash)
