"""The MIME tree of a raw message, found over its bytes without copying any body.

Only header blocks go through the email package. Where a header block ends, which
lines are boundaries and which bytes belong to a part follow the package's own
parser (compat32), so the parts are the ones ``email.message_from_bytes`` finds; the
walk is iterative, capped, linear, and keeps bodies as spans of the raw message.
"""

from __future__ import annotations

import binascii
import heapq
import io
import re
from collections.abc import Iterator
from email import errors
from email.message import Message
from email.policy import compat32
from typing import Any, NamedTuple

MAX_DEPTH = 40
MAX_PARTS = 1000

# The header lines at the start of a block (the email package's test for a header
# line), up to the blank line or the first line of body text where headers were due.
_LINE = rb"(?:From |[\x21-\x39\x3b-\x7e]*:|[\t ])[^\r\n]*+(?:\r\n|\r|\n|\Z)"
_HEADER_LINES = re.compile(rb"(?:%s)*+" % _LINE)
# A header bomb (millions of short lines) would cost seconds and hundreds of MiB as
# Message objects: lines past this many are skipped, and that is a defect.
MAX_HEADER_LINES = 50_000
# The email package reads the parameters of Content-Type and Content-Disposition in
# quadratic time (a 2 MB header of "a=b;" took 50 s): past this length they are cut.
MAX_PARAMS_HEADER = 8 * 1024
_PARAMS_HEADERS = ("content-type", "content-disposition")
_KEPT_HEADER_LINES = re.compile(rb"(?:%s){0,%d}+" % (_LINE, MAX_HEADER_LINES))
# What may follow "--boundary" on a delimiter line: "--" on the last one, then blanks.
_TAIL = re.compile(rb"(--)?[ \t]*(?=[\r\n]|\Z)")
# bytes.find is fast and needs no compiling; lines that only look like a boundary
# (hostile mail repeats them) switch the search to a pattern compiled for it.
_FALSE_HITS = 64
_IDENTITY = ("7bit", "8bit", "binary")
_UUENCODE = ("x-uuencode", "uuencode", "uue", "x-uue")


class Leaf(NamedTuple):
    """A part with no parts inside: its headers, nesting depth and the span of its body."""

    message: Message
    depth: int
    start: int
    end: int


class _Node(NamedTuple):
    start: int
    end: int
    depth: int
    between: bool  # between boundaries: the line break before the next one is not its own
    digest: bool  # in a multipart/digest, where a part is a message unless it says otherwise


def walk(raw: bytes) -> tuple[Message, list[Leaf], list[str]]:
    """The top-level headers, the leaves in order, and the caps that were hit."""
    defects: list[str] = []
    leaves: list[Leaf] = []
    root: Message | None = None
    stack = [_Node(0, len(raw), 0, False, False)]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_PARTS:
            defects.append("mime-too-many-parts")
            break
        headers, body = read_headers(raw, node.start, node.end)
        if node.digest:
            headers.set_default_type("message/rfc822")
        if root is None:
            root = headers
        children, end = _children(raw, headers, body, node, MAX_PARTS + 1 - seen)
        if not children:
            leaves.append(Leaf(headers, node.depth, body, end))
        elif node.depth >= MAX_DEPTH:
            defects.append("mime-too-deep")
        else:
            stack.extend(reversed(children))
    return root if root is not None else Message(), leaves, defects


def read_headers(raw: bytes, start: int, end: int) -> tuple[Message, int]:
    """The header block at start, parsed, and where the body after it starts."""
    found = _HEADER_LINES.match(raw, start, end)  # always matches, if only nothing
    cut = found.end() if found else start
    kept = cut
    if cut - start > MAX_HEADER_LINES * 20:  # only a block this big can hold too many
        capped = _KEPT_HEADER_LINES.match(raw, start, cut)
        kept = capped.end() if capped else cut
    message, pushed_back = _header_message(raw[start:kept])
    if kept < cut:
        message.defects.append(errors.InvalidHeaderDefect("too many header lines"))
        pushed_back = 0
    if cut < end and raw[cut] not in b"\r\n":
        message.defects.append(errors.MissingHeaderBodySeparatorDefect())
    elif cut < end and not pushed_back:
        return message, _next_line(raw, cut, end)  # the blank line is neither's
    return message, cut - pushed_back


class IndexedMessage(Message):
    """A compat32 Message whose header look-ups use an index instead of a scan.

    The checks ask for some twenty headers of every message, and Message.get walks
    the whole header list each time. The parameters of a header (Content-Type's
    charset, name and boundary) are parsed once too: the package parses them again
    for every ``get_param``.
    """

    _index: dict[str, list[tuple[str, str]]] | None = None
    _params: dict[str, Any] | None = None
    _first: dict[str, str] | None = None  # what get returned, where that is a str

    def _headers_by_name(self) -> dict[str, list[tuple[str, str]]]:
        if self._index is None:
            index: dict[str, list[tuple[str, str]]] = {}
            for name, value in self._headers:
                index.setdefault(name.lower(), []).append((name, value))
            self._index = index
        return self._index

    def get(self, name: str, failobj: Any = None) -> Any:
        """The first value of a header, as Message.get gives it."""
        key = name.lower()
        if self._first is not None and key in self._first:
            return self._first[key]
        found = self._headers_by_name().get(key)
        if not found:
            return failobj
        value = self.policy.header_fetch_parse(*found[0])
        if key in _PARAMS_HEADERS and isinstance(value, str) and len(value) > MAX_PARAMS_HEADER:
            value = value[:MAX_PARAMS_HEADER]
        if isinstance(value, str):  # kept only when immutable (not a fresh Header object)
            if self._first is None:
                self._first = {}
            self._first[key] = value
        return value

    def get_all(self, name: str, failobj: Any = None) -> Any:
        """Every value of a header, as Message.get_all gives them."""
        found = self._headers_by_name().get(name.lower())
        if not found:
            return failobj
        return [self.policy.header_fetch_parse(k, v) for k, v in found]

    def __contains__(self, name: Any) -> bool:
        """Whether the header is there (Message builds a list of every name to tell)."""
        return name.lower() in self._headers_by_name()

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        """A header's parameters as the package parses them, parsed once per header."""
        key = header.lower()
        if self._params is None:
            self._params = {}
        try:
            params = self._params[key]
        except KeyError:
            params = self._params[key] = super()._get_params_preserve(_ABSENT, header)
        return failobj if params is _ABSENT else params

    def names(self) -> list[str]:
        """The lower-case header names, each once, in the order they first occur."""
        return list(self._headers_by_name())

    def count(self, name: str) -> int:
        """How many times a header occurs, without decoding any."""
        return len(self._headers_by_name().get(name.lower(), ()))

    def set_raw(self, name: str, value: Any) -> None:
        """Add a header (and forget the index)."""
        self._index = self._params = self._first = None
        super().set_raw(name, value)

    def add_header(self, _name: str, _value: Any, **_params: Any) -> None:
        """Add a header with parameters (and forget the index)."""
        self._index = self._params = self._first = None
        super().add_header(_name, _value, **_params)

    def replace_header(self, _name: str, _value: Any) -> None:
        """Replace a header's first value (and forget the index)."""
        self._index = self._params = self._first = None
        super().replace_header(_name, _value)

    def set_boundary(self, boundary: str) -> None:
        """Set Content-Type's boundary (and forget the index)."""
        super().set_boundary(boundary)
        self._index = self._params = self._first = None

    def __setitem__(self, name: str, value: Any) -> None:
        self._index = self._params = self._first = None
        super().__setitem__(name, value)

    def __delitem__(self, name: str) -> None:
        self._index = self._params = self._first = None
        super().__delitem__(name)


_ABSENT = object()  # what a header's parameters are when it is not there


def _header_message(block: bytes) -> tuple[Message, int]:
    """Header lines read as the email package reads them (its _parse_headers), and the
    length of a last line that it takes for body text after all."""
    message, pushed_back = IndexedMessage(), 0
    add = message._headers.append  # what set_raw does, less a call per header line
    lines = io.StringIO(block.decode("ascii", "surrogateescape"), newline="").readlines()
    header: list[str] = []
    for number, line in enumerate(lines):
        if line[0] in " \t":
            if header:
                header.append(line)
            else:
                message.defects.append(errors.FirstHeaderLineIsContinuationDefect(line))
            continue
        if header:
            add(compat32.header_source_parse(header))
            header = []
        if line.startswith("From "):
            if number == 0:
                message.set_unixfrom(line.rstrip("\r\n"))
            elif number == len(lines) - 1:  # the package guesses it starts the body
                pushed_back = len(line)
            else:
                message.defects.append(errors.MisplacedEnvelopeHeaderDefect(line))
        elif line[0] == ":":
            message.defects.append(errors.InvalidHeaderDefect("Missing header name."))
        else:
            header = [line]
    if header:
        add(compat32.header_source_parse(header))
    return message, pushed_back


def _children(
    raw: bytes, headers: Message, body: int, node: _Node, limit: int
) -> tuple[list[_Node], int]:
    """The parts inside a container, or none and where a leaf's body ends."""
    try:
        ctype = headers.get_content_type()
    except Exception:
        ctype = "text/plain"
    kind = ctype.partition("/")[0]
    if kind == "message" and ctype != "message/delivery-status":
        return [_Node(body, node.end, node.depth + 1, node.between, False)], 0
    if kind != "multipart":
        return [], _strip_line_break(raw, body, node.end) if node.between else node.end
    try:
        boundary = headers.get_boundary()
    except Exception:
        boundary = None
    if boundary is None:
        headers.defects.append(errors.NoBoundaryInMultipartDefect())
        return [], node.end
    if str(headers.get("Content-Transfer-Encoding", "8bit")).lower() not in _IDENTITY:
        headers.defects.append(errors.InvalidMultipartContentTransferEncodingDefect())
    try:
        delimiter = b"--" + boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:  # an RFC 2231 boundary in a charset: no line can match it
        delimiter = b""
    if b"\r" in delimiter or b"\n" in delimiter:  # folded into the value: nor can this
        delimiter = b""
    limit = 0 if node.depth >= MAX_DEPTH else limit
    spans, closed, end = _split(raw, body, node.end, delimiter, limit)
    if spans is None:
        headers.defects.append(errors.StartBoundaryNotFoundDefect())
        return [], end
    if not closed:
        headers.defects.append(errors.CloseBoundaryNotFoundDefect())
    digest = ctype == "multipart/digest"
    return [_Node(start, stop, node.depth + 1, True, digest) for start, stop in spans], 0


def _split(
    raw: bytes, start: int, end: int, delimiter: bytes, limit: int
) -> tuple[list[tuple[int, int]] | None, bool, int]:
    """Spans of the parts between delimiter lines, whether the close delimiter came, and
    where a preamble ends when there are no parts (spans None)."""
    spans: list[tuple[int, int]] = []
    part = -1  # where the current part starts; -1 while in the preamble
    follow = -1  # where a delimiter line right after the last one would start
    for line, tail, close in _delimiters(raw, start, end, delimiter):
        if line == follow:  # delimiter lines in a row open no empty parts (nor does a close)
            part = follow = _next_line(raw, tail, end)
            continue
        if part < 0 and close:
            return None, True, line
        if part >= 0:
            spans.append((part, line))
            if close or len(spans) > limit:
                return spans, True, 0
        part = follow = _next_line(raw, tail, end)
    if part < 0:
        return None, False, end
    spans.append((part, end))
    return spans, False, 0


def _delimiters(
    raw: bytes, start: int, end: int, delimiter: bytes
) -> Iterator[tuple[int, int, bool]]:
    """Each delimiter line in raw[start:end]: where it starts, where its tail ends, close?"""
    if not delimiter:
        return
    pos, false_hits = start, 0
    while false_hits < _FALSE_HITS:
        at = raw.find(delimiter, pos, end)
        if at < 0:
            return
        at_line_start = at > 0 and raw[at - 1] in b"\r\n"
        tail = _TAIL.match(raw, at + len(delimiter), end) if at_line_start else None
        if tail is None:
            false_hits += 1
            pos = at + 1
            continue
        yield at, tail.end(), tail.group(1) is not None
        pos = tail.end()
    # A literal pattern per kind of line break keeps the regex engine's fast search.
    rest = re.escape(delimiter) + rb")(--)?[ \t]*(?=[\r\n]|\Z)"
    pos = max(pos - 1, 0)
    eols = (b"\n", b"\r") if raw.find(b"\r" + delimiter, pos, end) >= 0 else (b"\n",)
    found = [re.compile(eol + b"(" + rest).finditer(raw, pos, end) for eol in eols]
    for match in heapq.merge(*found, key=lambda match: match.start()):
        yield match.start(1), match.end(), match.group(2) is not None


def _next_line(raw: bytes, pos: int, end: int) -> int:
    """Where the line after the line break at pos starts."""
    return pos + 2 if raw.startswith(b"\r\n", pos, end) else min(pos + 1, end)


def _strip_line_break(raw: bytes, start: int, end: int) -> int:
    """The end of a body less its last line break, which belongs to the next boundary."""
    if end > start and raw[end - 1] == 0x0A:
        end -= 1
        if end > start and raw[end - 1] == 0x0D:
            end -= 1
    elif end > start and raw[end - 1] == 0x0D:
        end -= 1
    return end


def decode(body: memoryview, encoding: str) -> bytes:
    """A body with its transfer encoding undone as the email package does it."""
    if encoding == "base64":
        try:
            return binascii.a2b_base64(body)  # skips line breaks and other stray bytes
        except binascii.Error:
            pass
        try:
            return binascii.a2b_base64(bytes(body) + b"==")  # padding left off
        except binascii.Error:
            return bytes(body).translate(None, b"\r\n")
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding in _UUENCODE:  # rare enough to hand to the package as text
        message = Message()
        message["Content-Transfer-Encoding"] = encoding
        message.set_payload(bytes(body).decode("ascii", "surrogateescape"))
        data = message.get_payload(decode=True)
        return data if isinstance(data, bytes) else bytes(body)
    return bytes(body)
