"""What the rules read of a message: bounded views, each computed once and shared.

The rules and the classifier's tokenizer read the same text, HTML and links; a view
that depends on the message alone is kept on the parsed message (``derived``), so the
second reader finds it computed. Every view is bounded (the first 100 KB of text and
HTML, capped links), and every regex is linear.
"""

from __future__ import annotations

import email.utils
import functools
import html
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from cleanmail import mime
from cleanmail.filter import auth, engines, wording

T = TypeVar("T")
TEXT_LIMIT = 100_000
MAX_LINKS = 200
_TAG = re.compile(r"<[^<>]{0,4000}>")
_INVISIBLE_OPEN = re.compile(r"<(script|style|title)\b|<!--")
_A_OPEN = re.compile(r"<a\s[^<>]{0,2000}>", re.I)
_HREF = re.compile(r"href\s*=\s*[\"']?\s*([^\"'\s<>]{1,2000})", re.I)
# Bare URLs in lower-cased text: "http" and "www." searched apart, each from its literal
# at C speed (an alternation is tried at every character), and merged in text order.
_URLS = (
    re.compile(r"https?://[^\s<>\"'()]{1,2000}"),
    re.compile(r"www\.[^\s<>\"'()]{1,2000}"),
)
_HOST = re.compile(r"^[a-z][a-z0-9+.-]{0,20}://([^/?#\s\\]{1,500})", re.I)
_WORD = re.compile(r"[^\W_]+")
# Text whose every character one of these charsets holds (most mail) can be handled a
# byte a character: bytes.translate and bytes.split then find words at C speed, without
# a match object a word.
SINGLE_BYTE = ("latin-1", "cp1252")


def byte_table(charset: str, keep: Callable[[str], bool], digit: bytes = b"") -> bytes:
    """A bytes.translate table: the bytes whose character ``keep`` accepts stay, the rest
    become spaces; ASCII digits become ``digit`` when given."""
    table = bytearray(b" " * 256)
    for byte in range(256):
        try:
            char = bytes((byte,)).decode(charset)
        except UnicodeDecodeError:  # a byte the charset leaves undefined never occurs
            continue
        if keep(char):
            table[byte] = ord(digit) if digit and char.isdigit() and byte < 128 else byte
    return bytes(table)


def single_byte(text: str) -> tuple[bytes, str] | None:
    """The text in the first of SINGLE_BYTE that holds every character, or None."""
    for charset in SINGLE_BYTE:
        try:
            return text.encode(charset), charset
        except UnicodeEncodeError:
            continue
    return None


# _WORD's words are the runs of characters that it matches, all else made spaces.
_WORD_BYTES = {
    charset: byte_table(charset, lambda char: _WORD.fullmatch(char) is not None)
    for charset in SINGLE_BYTE
}
_LOCAL_FROM = re.compile(r"\b(?:localhost|127\.0\.0\.1|::1)\b", re.I)
_FETCHED = re.compile(r"\bwith (?:imap|pop3?|lmtp)\b", re.I)


def _of_message(compute: Callable[[View], T]) -> mime.computed_once[T]:
    """A view that depends on the message alone: shared by every View of that message.

    The classifier's tokenizer builds its own View of the message the rules saw.
    """
    name = compute.__name__

    def get(view: View) -> T:
        cache = view.message.derived
        try:
            return cache[name]
        except KeyError:
            value = cache[name] = compute(view)
            return value

    get.__name__, get.__doc__ = name, compute.__doc__
    return mime.computed_once(get)


@dataclass
class View:
    """Bounded, lazily computed views of one message that the rules share."""

    message: mime.ParsedMessage
    envelope: engines.Envelope
    now: datetime

    @mime.computed_once
    def arrival(self) -> datetime | None:
        """When the message reached us: the newest Received header that is not a local hop."""
        # Local hops (content filter re-injection, fetchmail, LMTP) can come long after arrival.
        for value in (self.message.headers.get_all("Received") or [])[:10]:
            value = " ".join(str(value)[:2000].split())
            if _local_hop(value):
                continue
            try:
                when = email.utils.parsedate_to_datetime(value.rpartition(";")[2].strip())
            except (TypeError, ValueError, IndexError, OverflowError):
                continue
            return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
        return None

    @_of_message
    def text(self) -> str:
        return self.message.text_body[:TEXT_LIMIT]

    @_of_message
    def html(self) -> str:
        return self.message.html_body[:TEXT_LIMIT]

    @_of_message
    def html_lower(self) -> str:
        return self.html.lower()

    @_of_message
    def html_visible(self) -> str:
        """The HTML's readable text: no tags, scripts, styles or comments."""
        return " ".join(_unescape(_TAG.sub(" ", _drop_invisible(self.html))).split())

    @_of_message
    def body(self) -> str:
        """The readable body: the plain text, or the visible HTML text when there is none."""
        return self.text if self.text.strip() else self.html_visible

    @_of_message
    def words(self) -> str:
        """Subject and body as lower-case words joined by single spaces, padded."""
        text = f"{self.message.subject}\n{self.body}".lower()
        if encoded := single_byte(text):
            data, charset = encoded
            words = b" ".join(data.translate(_WORD_BYTES[charset]).split())
            return " " + words.decode(charset) + " "
        return " " + " ".join(_WORD.findall(text)) + " "

    @_of_message
    def phrases(self) -> dict[str, set[str]]:
        """The typical spam phrases found in the subject and body, by family."""
        found: dict[str, set[str]] = {}
        for phrase in wording.PHRASE.findall(self.words):
            found.setdefault(wording.FAMILY[phrase], set()).add(phrase)
        return found

    @_of_message
    def links(self) -> list[tuple[str, str]]:
        """(href, visible anchor text) pairs from the HTML, then bare URLs from the text."""
        found: list[tuple[str, str]] = []
        for match in _A_OPEN.finditer(self.html):
            href = _HREF.search(match.group(0))
            if href:
                end = self.html.find("</a", match.end(), match.end() + 1000)
                label = self.html[match.end() : end] if end >= 0 else ""
                label = " ".join(_unescape(_TAG.sub(" ", label)).split())
                found.append((_unescape(href.group(1)), label))
            if len(found) >= MAX_LINKS:
                return found
        for url in _bare_urls(self.text.lower()):
            found.append((url, ""))
            if len(found) >= MAX_LINKS:
                break
        return found

    @_of_message
    def hosts(self) -> list[str]:
        return [host for href, _ in self.links if (host := url_host(href))]


def _local_hop(received: str) -> bool:
    """A Received line of a hop inside the receiving system (from localhost, IMAP, LMTP)."""
    source = received.partition(" by ")[0]
    if received.isascii():  # the literals any match holds, looked for at C speed first
        lower = source.lower()
        local = "localhost" in lower or "127.0.0.1" in lower or "::1" in lower
        if not local and "with " not in received.lower():
            return False
    return bool(_LOCAL_FROM.search(source) or _FETCHED.search(received))


def _bare_urls(text: str) -> Iterator[str]:
    """The bare URLs in text order, as one alternation of the shapes finds them."""
    # The shapes start with different letters, so at most one matches at any position.
    # A shape not found from one position is not found from a later one: it stays None.
    ahead = [shape.search(text) for shape in _URLS]
    while found := [match for match in ahead if match]:
        first = min(found, key=lambda match: match.start())
        yield first.group(0)
        pos = first.end()
        ahead = [
            shape.search(text, pos) if match and match.start() < pos else match
            for match, shape in zip(ahead, _URLS, strict=True)
        ]


def _unescape(text: str) -> str:
    return html.unescape(text) if "&" in text else text


def _drop_invisible(text: str) -> str:
    """Cut scripts, styles, titles and comments; an unclosed one hides the rest."""
    lower = text.lower()
    if len(lower) != len(text):  # a few characters grow when lower-cased; keep offsets aligned
        lower = text
    out, pos = [], 0
    while match := _INVISIBLE_OPEN.search(lower, pos):
        out.append(text[pos : match.start()])
        closer = "-->" if match.group(0) == "<!--" else f"</{match.group(1)}"
        end = lower.find(closer, match.end())
        if end < 0:
            return "".join(out)
        pos = end + len(closer)
    out.append(text[pos:])
    return "".join(out)


def url_host(url: str) -> str:
    """The lower-case host of a URL (``www.`` URLs without a scheme too), or ``""``."""
    url = url.strip()
    if url[:4].lower() == "www.":
        url = "http://" + url
    match = _HOST.match(url)
    return match.group(1).rpartition("@")[2].partition(":")[0].lower().rstrip(".") if match else ""


def other_site(shown: str, actual: str) -> bool:
    """True when two host names belong to different registrable domains."""
    return registrable(shown) != registrable(actual)


@functools.lru_cache(maxsize=4096)
def registrable(domain: str) -> str:
    """``auth.organizational_domain``, kept for the last few thousand names asked about.

    A suffix-list look-up costs several microseconds (IDNA encoding, label by label),
    and mail names the same senders' and sites' domains again and again.
    """
    return auth.organizational_domain(domain)
