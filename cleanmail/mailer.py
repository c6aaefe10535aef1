"""Mail that Cleanmail writes itself: rendered from ``templates/email/<name>/`` and sent.

Each message is ``multipart/alternative`` (plain text and HTML) in the recipient's
language, sent with an empty envelope sender to the relay so it is not filtered again.
"""

from __future__ import annotations

import binascii
import email.utils
import random
import re
from dataclasses import dataclass
from email.header import Header
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from babel.support import Translations

from cleanmail.relay import Relay

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates" / "email"
TRANSLATIONS = Path(__file__).resolve().parent / "translations"


# Boundaries need to be unique, not secret; os.urandom per mail costs more than a report.
_random = random.Random()
_PLAIN = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")


@dataclass(frozen=True)
class Rendered:
    """A rendered mail: subject, plain text and HTML."""

    subject: str
    text: str
    html: str


@lru_cache(maxsize=8)
def _environment(language: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(["html"]),
        extensions=["jinja2.ext.i18n"],
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,  # not three stat() calls per mail: templates change with a deploy
    )
    translations = Translations.load(str(TRANSLATIONS), [language], domain="messages")
    env.install_gettext_translations(translations, newstyle=True)  # type: ignore[attr-defined]
    return env


def render(name: str, language: str, **context: Any) -> Rendered:
    """Render one mail template in a language."""
    env = _environment(language)
    subject = env.get_template(f"{name}/subject.txt").render(**context)
    return Rendered(
        subject=" ".join(subject.split()),
        text=env.get_template(f"{name}/body.txt").render(**context),
        html=env.get_template(f"{name}/body.html").render(**context),
    )


def build(
    rendered: Rendered,
    *,
    sender: str,
    to: str,
    domain: str = "cleanmail.invalid",
    message_id: str | None = None,
) -> bytes:
    """The raw bytes (CRLF) of a multipart/alternative message with automatic-mail headers.

    Written by hand rather than with ``email.message``: a report run builds 100,000 of
    these, and the email package's header parsing and Python quoted-printable encoder
    cost more than everything else in a report. ``message_id`` lets a retried report
    keep its Message-ID, so a mail client can tell a rare second copy for what it is.
    """
    boundary = f"=_cleanmail_{_random.getrandbits(96):024x}"
    head = [
        f"From: {header(sender, address=True)}",
        f"To: {to if _PLAIN.fullmatch(to) else header(to, address=True)}",
        f"Subject: {header(rendered.subject)}",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: {message_id or email.utils.make_msgid(domain=domain)}",
        "Auto-Submitted: auto-generated",
        "X-Auto-Response-Suppress: All",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/alternative; boundary="{boundary}"',
        "",
    ]
    parts = [
        "\r\n".join(head).encode("ascii"),
        _part(boundary, "plain", rendered.text),
        _part(boundary, "html", rendered.html),
        f"--{boundary}--\r\n".encode("ascii"),
    ]
    return b"\r\n".join(parts)


def _part(boundary: str, subtype: str, content: str) -> bytes:
    # base64: quoted-printable costs several times as much, and a report is mostly rows
    # that no person reads in the raw.
    # One b2a_base64 for the whole part, cut into 76-character lines (as encodebytes does).
    # The lines are cut by map() over slices, without a Python frame per line.
    encoded = binascii.b2a_base64(content.encode("utf-8"), newline=False)
    size = len(encoded)
    cuts = map(slice, range(0, size, 76), range(76, size + 76, 76))
    lines = b"\r\n".join(map(encoded.__getitem__, cuts)) + b"\r\n"
    return (
        f"--{boundary}\r\n"
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode("ascii") + lines


@lru_cache(maxsize=256)
def header(value: str, *, address: bool = False) -> str:
    """A header value in 7-bit: encoded words where it is not ASCII, folded lines in CRLF."""
    value = " ".join(value.split())
    if address:
        name, addr = email.utils.parseaddr(value)
        return email.utils.formataddr((name, addr), charset="utf-8") if addr else value
    if value.isascii() and len(value) < 900:
        return value
    return Header(value, "utf-8", header_name="Subject").encode(linesep="\r\n")


def send(relay: Relay, raw: bytes, to: str) -> None:
    """Send with the null envelope sender (no bounces of bounces); raises RelayError."""
    relay.send("", [to], raw)
