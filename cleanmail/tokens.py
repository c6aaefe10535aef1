"""Signed links, a salt per purpose, with key rotation; itsdangerous errors become ours.

The secret keys are given oldest first: the last one signs and all of them verify,
so a key can be rotated without breaking links already sent.
"""

from __future__ import annotations

import binascii
import hmac
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from itsdangerous.encoding import int_to_bytes

LOGIN_LINK_DAYS = 15
PURPOSES = {
    "login": LOGIN_LINK_DAYS * 86400,  # "Se oversikt" in reports and fresh links
    "release": LOGIN_LINK_DAYS * 86400,  # per-message links in reports: confirm, then POST
}


class TokenError(Exception):
    """A link that cannot be used."""


class TokenExpired(TokenError):
    """A link whose lifetime is over; ``payload`` is what it said, unverified for age only."""

    def __init__(self, payload: Any) -> None:
        super().__init__("the link has expired")
        self.payload = payload


class TokenInvalid(TokenError):
    """A link that was tampered with, cut short, or signed for another purpose."""


class Tokens:
    """Makes and checks the signed links of one installation."""

    def __init__(self, secret_keys: Sequence[str]) -> None:
        if not secret_keys:
            raise ValueError("at least one secret key is needed")
        self.secret_keys = list(secret_keys)

    def _serializer(self, purpose: str) -> URLSafeTimedSerializer:
        if purpose not in PURPOSES:
            raise ValueError(f"unknown token purpose {purpose!r}")
        return URLSafeTimedSerializer(self.secret_keys, salt=f"cleanmail.{purpose}")

    def dump(self, purpose: str, payload: Any) -> str:
        """A signed token for one purpose."""
        return self._serializer(purpose).dumps(payload)

    def dumper(self, purpose: str) -> Callable[[Any], str]:
        """A fast ``dump`` for many tokens at once (a report signs one per message).

        The same format as ``dump`` (uncompressed payload, timestamp, HMAC of the
        newest key with the purpose's salt), so ``load`` reads it; the derived key is
        computed once instead of per token, and the timestamp once per second.
        """
        sign = self.json_signer(purpose)
        return lambda payload: sign(json.dumps(payload, separators=(",", ":")).encode())

    def json_signer(self, purpose: str) -> Callable[[bytes], str]:
        """Like ``dumper``, for a payload already serialised as compact JSON (as ``dump`` would)."""
        signer = self._serializer(purpose).make_signer()
        mac = hmac.new(signer.derive_key(), digestmod=signer.digest_method)
        stamp: list[Any] = [0, b""]

        def sign(body: bytes) -> str:
            now = int(time.time())
            if now != stamp[0]:
                stamp[:] = [now, b"." + _base64(int_to_bytes(now))]
            value = _base64(body) + stamp[1]
            signature = mac.copy()
            signature.update(value)
            return (value + b"." + _base64(signature.digest())).decode("ascii")

        return sign

    def load(self, purpose: str, token: str, *, max_age: int | None = None) -> Any:
        """The payload of a valid token, or TokenExpired / TokenInvalid."""
        serializer = self._serializer(purpose)
        try:
            return serializer.loads(token, max_age=max_age or PURPOSES[purpose])
        except SignatureExpired as exc:
            return_payload = exc.payload
            raise TokenExpired(_decode(serializer, return_payload)) from None
        except BadSignature:
            raise TokenInvalid("the link is not valid") from None


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _base64(value: bytes) -> bytes:
    """itsdangerous' ``base64_encode`` (URL-safe, no padding) without its type checks."""
    return binascii.b2a_base64(value, newline=False).translate(_URLSAFE).rstrip(b"=")


def _decode(serializer: URLSafeTimedSerializer, payload: Any) -> Any:
    try:
        return serializer.load_payload(payload)
    except BadSignature:
        return None


def login_url(base_url: str, secret_keys: Sequence[str], mailbox_id: int, key_version: int) -> str:
    """An absolute "Se oversikt" link that logs a mailbox in (15 days, revocable)."""
    token = Tokens(secret_keys).dump("login", {"m": mailbox_id, "v": key_version})
    return f"{base_url}/l/{token}"
