"""Builders of raw test messages (CRLF line ends, as they arrive over SMTP)."""

from __future__ import annotations

import io
import zipfile
from email.message import EmailMessage
from email.policy import SMTP

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
# The smallest header that libmagic calls an ELF executable.
ELF = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + b"\x02\x00\x3e\x00\x01\x00\x00\x00" + b"\x00" * 40


def message(
    *,
    subject: str = "Lunch on Friday?",
    sender: str = "kari@example.com",
    to: str = "ola@example.no",
    body: str = "Hi Ola,\n\nshall we meet for lunch on Friday at noon?\n\nKari\n",
    attachments: list[tuple[str, bytes, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """A well-formed message with optional attachments (name, content, MIME type)."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Sun, 22 Nov 2026 10:00:00 +0100"
    msg["Message-ID"] = f"<{abs(hash((subject, body, sender)))}@example.com>"
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    for filename, content, ctype in attachments or []:
        maintype, _slash, subtype = ctype.partition("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=SMTP)


def zip_of(files: dict[str, bytes]) -> bytes:
    """A zip archive holding the given files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()
