"""A bounded, never-failing view of a raw message for the checks and the store.

Every message is hostile input: parsing never raises, nesting and part counts are
capped, and every string that leaves this module is safe to store in any database
(no NUL, no lone surrogates, bounded length).
"""

from __future__ import annotations

import email.header
import email.utils
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from typing import Any, Generic, TypeVar, overload

from cleanmail import mimewalk

MAX_DEPTH = mimewalk.MAX_DEPTH
MAX_PARTS = mimewalk.MAX_PARTS
MAX_TEXT = 200_000
HEADER_LIMIT = 2000
MAX_ENCODED_HEADER = 16 * 1024
# Decoded payloads up to this size are kept for the next reader; bigger ones (the
# attachments that make up most of a big message) are decoded again when asked for.
PAYLOAD_CACHE = 1024 * 1024

T = TypeVar("T")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_SPACE = re.compile(r"\s+")
# The shapes of nearly every From header: "addr", "Name <addr>" and "\"Name\" <addr>",
# where the address is a dot-atom at a dot-atom of letters, digits and dashes and the
# name holds no character the email package's address parser treats specially.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDRESS = rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_NAME = r"(?:[A-Za-z0-9_'-]+(?: [A-Za-z0-9_'-]+)* ?|\"[A-Za-z0-9_' -]*\" ?)?"
_SIMPLE_FROM = re.compile(rf"({_ADDRESS})|{_NAME}<({_ADDRESS})>")


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
    if isinstance(text, str) and text.isascii() and "=?" not in text:
        # Most headers: no encoded words, nothing to decode. " ".join(split()) is the
        # _SPACE.sub(" ", ...).strip() below (both split on str.isspace characters).
        return clean_text(" ".join(text[:MAX_ENCODED_HEADER].split()))
    if isinstance(text, str) and len(text) > MAX_ENCODED_HEADER:
        # email.header.decode_header is quadratic in the number of encoded words.
        text = text[:MAX_ENCODED_HEADER]
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
    simple = _SIMPLE_FROM.fullmatch(value)
    if simple:  # what getaddresses finds in the most common shapes, without its parser
        return (simple.group(1) or simple.group(2)).lower()[:320]
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


class computed_once(Generic[T]):
    """``functools.cached_property`` without its lock, which Python 3.11 takes for every
    instance of the class: a parsed message is checked in one thread at a time."""

    def __init__(self, compute: Callable[[Any], T]) -> None:
        self.compute = compute
        self.name = compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> computed_once[T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)
        return value


@dataclass
class Part:
    """One leaf of the MIME tree: declared type, file name and decoded payload."""

    content_type: str
    filename: str | None
    disposition: str | None
    depth: int
    message: Message = field(repr=False)
    body: memoryview = field(default_factory=lambda: memoryview(b""), repr=False, compare=False)
    _payload: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def encoding(self) -> str:
        """The declared transfer encoding, lower-cased."""
        return str(self.message.get("Content-Transfer-Encoding", ""))[:100].strip().lower()

    @property
    def payload(self) -> bytes:
        """The payload with its transfer encoding undone (raw bytes where that fails)."""
        if self._payload is not None:
            return self._payload
        try:
            data = mimewalk.decode(self.body, self.encoding)
        except Exception:
            data = bytes(self.body)
        if len(data) <= PAYLOAD_CACHE:
            self._payload = data
        return data

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
    # What the engines derive from the message alone (filter.view.View), computed once for all.
    derived: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    # Decoded headers by lower-case name: the rules and the tokenizer ask for the same ones.
    _decoded: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def header(self, name: str) -> str:
        """One header, decoded (the first of several), or ``""``."""
        key = name.lower()
        try:
            return self._decoded[key]
        except KeyError:
            pass
        try:
            value = decode_header(self.headers.get(name))
        except Exception:
            value = ""
        self._decoded[key] = value
        return value

    def header_count(self, name: str) -> int:
        """How many times a header occurs."""
        if isinstance(self.headers, mimewalk.IndexedMessage):
            return self.headers.count(name)
        return len(self.headers.get_all(name) or [])

    def header_all(self, name: str) -> list[str]:
        """Every instance of a header, decoded."""
        return [decode_header(value) for value in self.headers.get_all(name) or []]

    @computed_once
    def from_header(self) -> str:
        """The decoded From header."""
        return self.header("From")

    @computed_once
    def from_address(self) -> str:
        """The address in the From header, lower-cased."""
        return parse_address(self.from_header)

    @computed_once
    def subject(self) -> str:
        """The decoded subject."""
        return self.header("Subject")

    @computed_once
    def message_id(self) -> str:
        """The Message-ID header as given."""
        return self.header("Message-ID")[:998]

    @computed_once
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

    @computed_once
    def text_body(self) -> str:
        """Plain text of the body parts, bounded."""
        return self._body("text/plain")

    @computed_once
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
    try:
        headers, leaves, defects = mimewalk.walk(raw)
        body = memoryview(raw)
        parts = [_part(leaf, body) for leaf in leaves]
    except Exception:
        headers, parts, defects = _headers_only(raw), [], ["mime-unparseable"]
    if headers.defects:
        defects.append("mime-defects")
    return ParsedMessage(raw=raw, headers=headers, parts=parts, defects=defects)


def _headers_only(raw: bytes) -> Message:
    try:
        return mimewalk.read_headers(raw, 0, len(raw))[0]
    except Exception:
        return Message()


def _part(leaf: mimewalk.Leaf, raw: memoryview) -> Part:
    node = leaf.message
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
    body = raw[leaf.start : leaf.end]
    return Part(clean_text(content_type, 255), name or None, disposition, leaf.depth, node, body)
