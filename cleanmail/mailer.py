"""Mail that Cleanmail writes itself: rendered from ``templates/email/<name>/`` and sent.

Each message is ``multipart/alternative`` (plain text and HTML) in the recipient's
language, sent with an empty envelope sender to the relay so it is not filtered again.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from babel.support import Translations

from cleanmail.relay import Relay

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates" / "email"
TRANSLATIONS = Path(__file__).resolve().parent / "translations"


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


def build(rendered: Rendered, *, sender: str, to: str, domain: str = "cleanmail.invalid") -> bytes:
    """The raw bytes of a multipart/alternative message with automatic-mail headers."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = rendered.subject
    message["Date"] = email.utils.formatdate(localtime=False)
    message["Message-ID"] = email.utils.make_msgid(domain=domain)
    message["Auto-Submitted"] = "auto-generated"
    message["X-Auto-Response-Suppress"] = "All"
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    return message.as_bytes(policy=SMTP)


def send(relay: Relay, raw: bytes, to: str) -> None:
    """Send with the null envelope sender (no bounces of bounces); raises RelayError."""
    relay.send("", [to], raw)
