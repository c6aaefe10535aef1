"""A bounded, never-failing view of a raw message for the checks and the store.

Every message is hostile input: parsing never raises, nesting and part counts are
capped, and every string that leaves this module is safe to store in any database
(no NUL, no lone surrogates, bounded length).
"""

from __future__ import annotations

import email
import email.header
import email.utils
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.policy import compat32
from functools import cached_property

MAX_DEPTH = 40
MAX_PARTS = 1000
MAX_TEXT = 200_000
HEADER_LIMIT = 2000

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_SPACE = re.compile(r"\s+")


def clean_text(value: str, limit: int = HEADER_LIMIT) -> str:
    """Make a string storable and displayable: no control characters, bounded length."""
    value = _CONTROL.sub("\ufffd", value)
    return value[:limit]


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode text in its declared charset, falling back for unknown or lying charsets."""
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeError, ValueError):
            continue
    return data.decode("cp1252", errors="replace")


def decode_header(value: object) -> str:
    """Decode an RFC 2047 header value to one line of text; never raises."""
    if value is None:
        return ""
    text = str(value) if not isinstance(value, email.header.Header) else value
    try:
        chunks = email.header.decode_header(text)
    except Exception:
        chunks = [(str(text), None)]
    out = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            raw = chunk.encode("utf-8", "surrogateescape")
            out.append(decode_bytes(raw, "utf-8"))
        else:
            out.append(decode_bytes(chunk, None if charset == "unknown-8bit" else charset))
    return clean_text(_SPACE.sub(" ", "".join(out)).strip())


def parse_address(value: str) -> str:
    """The first mailbox address in a header value, lower-cased, or ``""``."""
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:
        return ""
    for _name, address in pairs:
        address = address.strip().lower()
        if "@" in address and " " not in address:
            return address[:320]
    return ""


def address_domain(address: str) -> str:
    """The domain of an address, lower-cased (``""`` for the null sender)."""
    return address.rpartition("@")[2].strip().lower().rstrip(".")


@dataclass
class Part:
    """One leaf of the MIME tree: declared type, file name and decoded payload."""

    content_type: str
    filename: str | None
    disposition: str | None
    depth: int
    message: Message = field(repr=False)

    @cached_property
    def payload(self) -> bytes:
        """The payload with its transfer encoding undone (raw bytes where that fails)."""
        try:
            data = self.message.get_payload(decode=True)
        except Exception:
            data = None
        if isinstance(data, bytes):
            return data
        raw = self.message.get_payload()
        return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""

    @property
    def is_body_text(self) -> bool:
        """True for inline text that makes up the body rather than an attachment."""
        return (
            self.content_type in ("text/plain", "text/html")
            and not self.filename
            and self.disposition != "attachment"
        )

    def text(self) -> str:
        """The payload decoded as text in its declared charset."""
        return decode_bytes(self.payload[: MAX_TEXT * 4], self.message.get_content_charset())


@dataclass
class ParsedMessage:
    """What the checks need from one raw message."""

    raw: bytes = field(repr=False)
    headers: Message = field(repr=False)
    parts: list[Part]
    defects: list[str]

    def header(self, name: str) -> str:
        """One header, decoded (the first of several), or ``""``."""
        try:
            return decode_header(self.headers.get(name))
        except Exception:
            return ""

    def header_all(self, name: str) -> list[str]:
        """Every instance of a header, decoded."""
        return [decode_header(value) for value in self.headers.get_all(name) or []]

    @cached_property
    def from_header(self) -> str:
        """The decoded From header."""
        return self.header("From")

    @cached_property
    def from_address(self) -> str:
        """The address in the From header, lower-cased."""
        return parse_address(self.from_header)

    @cached_property
    def subject(self) -> str:
        """The decoded subject."""
        return self.header("Subject")

    @cached_property
    def message_id(self) -> str:
        """The Message-ID header as given."""
        return self.header("Message-ID")[:998]

    @cached_property
    def date(self) -> datetime | None:
        """The Date header as an aware time, or None when absent or unreadable."""
        value = self.header("Date")
        if not value:
            return None
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        try:
            return when.astimezone(UTC)
        except (OverflowError, ValueError):
            return None

    @cached_property
    def text_body(self) -> str:
        """Plain text of the body parts, bounded."""
        return self._body("text/plain")

    @cached_property
    def html_body(self) -> str:
        """HTML of the body parts, bounded."""
        return self._body("text/html")

    def _body(self, kind: str) -> str:
        chunks: list[str] = []
        size = 0
        for part in self.parts:
            if part.content_type == kind and part.is_body_text:
                text = part.text()[: MAX_TEXT - size]
                chunks.append(text)
                size += len(text)
                if size >= MAX_TEXT:
                    break
        return "\n".join(chunks)


def parse(raw: bytes) -> ParsedMessage:
    """Parse a raw message; on structure too broken to walk, keep the headers only."""
    defects: list[str] = []
    try:
        message = email.message_from_bytes(raw, policy=compat32)
    except RecursionError:
        defects.append("mime-too-deep")
        message = _headers_only(raw)
    except Exception:
        defects.append("mime-unparseable")
        message = _headers_only(raw)
    parts = _leaves(message, defects)
    if message.defects:
        defects.append("mime-defects")
    return ParsedMessage(raw=raw, headers=message, parts=parts, defects=defects)


def _headers_only(raw: bytes) -> Message:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw if end < 0 else raw[:end]
    try:
        return email.message_from_bytes(head + b"\r\n\r\n", policy=compat32)
    except Exception:
        return Message()


def _leaves(root: Message, defects: list[str]) -> list[Part]:
    """Walk the tree without recursion, with caps on depth and part count."""
    leaves: list[Part] = []
    stack: list[tuple[Message, int]] = [(root, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_PARTS:
            defects.append("mime-too-many-parts")
            break
        payload = node.get_payload()
        if node.is_multipart() and isinstance(payload, list):
            if depth >= MAX_DEPTH:
                defects.append("mime-too-deep")
                continue
            stack.extend((child, depth + 1) for child in reversed(payload))
            continue
        leaves.append(_part(node, depth))
    return leaves


def _part(node: Message, depth: int) -> Part:
    try:
        content_type = node.get_content_type()
    except Exception:
        content_type = "application/octet-stream"
    try:
        filename = node.get_filename() or node.get_param("name")
    except Exception:
        filename = None
    if isinstance(filename, tuple):  # an RFC 2231 value that the package left undecoded
        filename = email.utils.collapse_rfc2231_value(filename)
    try:
        disposition = node.get_content_disposition()
    except Exception:
        disposition = None
    name = decode_header(filename) if filename else None
    return Part(clean_text(content_type, 255), name or None, disposition, depth, node)
