"""Message tokens for the learning classifier: words, header clues, links and HTML shape.

Input is hostile: every view is bounded (the rules engine's 100 KB text and HTML views,
then the first ``BODY_LIMIT`` characters of them), every regex is linear, and the
result is a bounded set of short strings. Headers, the plain text, the visible text of
the HTML, link hosts and a few structural clues each get their own prefix, so that
"free" in a subject and "free" in a body weigh separately.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime

from cleanmail import mime, mimewalk
from cleanmail.filter import engines
from cleanmail.filter.view import SINGLE_BYTE, View, byte_table, single_byte

log = logging.getLogger(__name__)

BODY_LIMIT = 30_000  # characters of text read; spam says what it wants early
MAX_TOKENS = 2_000
MAX_WORD = 24
MAX_HEADER_VALUE = 500
# Words of letters and digits (any script), with inner dots, dashes and apostrophes:
# "don't", "e-mail", "v1.2". Three or more characters: shorter words tell little.
_WORD = re.compile(r"[^\W_](?:[\w'.-]{0,40}[^\W_])?")
_RUN_CHAR = re.compile(r"[\w'.-]")
# Scripts written without spaces (Chinese, Japanese, Korean Hangul runs): a run is read as
# overlapping pairs of characters, as search engines do, not as one over-long "word".
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]{2,}")
# What every mail program writes today says nothing about the mail: UTF-8 or ASCII text,
# sent as it is, quoted-printable or base64. Only other charsets and encodings are clues.
_USUAL_CHARSETS = frozenset(("utf-8", "utf8", "us-ascii", "ascii"))
_USUAL_ENCODINGS = frozenset(("7bit", "8bit", "quoted-printable", "base64", "binary"))
_CHARSET_PARAM = re.compile(r";\s*charset\s*=\s*\"?[\w.:-]{0,40}\"?", re.I)
_TAG_NAME = re.compile(r"<([a-z][a-z0-9]{0,10})\b")
_IP_HOST = re.compile(r"^[\d.]{7,15}$|^\d{8,10}$|^0x[0-9a-f]{8}$")
_NINES = str.maketrans("012345678", "999999999")
# For text in a single-byte charset (single_byte): the bytes _WORD can match kept
# (ASCII digits read as 9), all others made spaces, so that bytes.split finds the runs
# words lie in at C speed. A run of letters and digits no longer than _WORD's longest
# match is one word; the rest go to _WORD.
_RUN_BYTES = {
    charset: byte_table(charset, lambda char: _RUN_CHAR.fullmatch(char) is not None, b"9")
    for charset in SINGLE_BYTE
}
_LONGEST = 42
_JOINERS = "_'.-"  # what _WORD takes inside a word but not at its ends
_EMPTY = engines.Envelope("", ())
# Headers whose words are tokens of their own; the rest count by name only.
WORD_HEADERS = ("subject", "from", "to", "reply-to", "x-mailer", "user-agent", "content-type")
_CLOCK_FIXED = datetime(2000, 1, 1, tzinfo=UTC)


def tokenize(message: mime.ParsedMessage) -> list[str]:
    """The message's distinct tokens, in a stable order; never raises on odd input."""
    view = View(message, _EMPTY, _CLOCK_FIXED)
    found: list[str] = []
    for source in (_headers, _body, _links, _shape):
        try:
            found += source(message, view)
        except Exception:  # one odd part must not cost the others; the words still count
            log.exception("tokenizer: %s failed", source.__name__)
    return list(dict.fromkeys(found))[:MAX_TOKENS]


def _words(text: str, prefix: str = "") -> list[str]:
    """Lower-case words of 3 to MAX_WORD characters, every digit read as 9.

    So prices, phone numbers and tracking ids of one shape are one token.
    """
    text = text[:BODY_LIMIT].lower()
    if encoded := single_byte(text):
        return _single_byte_words(*encoded, prefix)
    text = text.translate(_NINES)
    out = []
    if _CJK_RUN.search(text):
        for run in _CJK_RUN.findall(text):
            out += [prefix + run[i : i + 2] for i in range(len(run) - 1)]
        text = _CJK_RUN.sub(" ", text)
    words = _WORD.findall(text)
    out += [prefix + word for word in words if 2 < len(word) <= MAX_WORD]
    out += [f"{prefix}long:{size}" for size in {len(w) // 10 for w in words if len(w) > MAX_WORD}]
    return out


def _single_byte_words(data: bytes, charset: str, prefix: str) -> list[str]:
    """``_words`` of lower-case text in a single-byte charset: the same tokens, faster."""
    runs = data.translate(_RUN_BYTES[charset]).decode(charset).split()
    # A run's characters are letters, digits and _'.-, so _WORD finds in it the run less
    # the _'.- at its ends, in one piece as long as that is no longer than _LONGEST.
    words = [word for run in runs if len(word := run.strip(_JOINERS)) > 2]
    longest = max(map(len, words), default=0)
    if longest > _LONGEST:
        return _split_words(runs, prefix)
    if longest > MAX_WORD:
        longs = {len(word) // 10 for word in words if len(word) > MAX_WORD}
        words = [word for word in words if len(word) <= MAX_WORD]
        words += [f"long:{size}" for size in longs]
    return [prefix + word for word in words] if prefix else words


def _split_words(runs: list[str], prefix: str) -> list[str]:
    """``_words`` of the runs where some are too long for _WORD to take in one piece."""
    out = []
    longs: set[int] = set()  # filled in word order, as _words fills its set
    for run in runs:
        words = (run,) if len(run) <= _LONGEST and run.isalnum() else _WORD.findall(run)
        for word in words:
            size = len(word)
            if size > MAX_WORD:
                longs.add(size // 10)
            elif size > 2:
                out.append(prefix + word)
    out += [f"{prefix}long:{size}" for size in longs]
    return out


def _headers(message: mime.ParsedMessage, view: View) -> list[str]:
    out = []
    headers = message.headers
    if isinstance(headers, mimewalk.IndexedMessage) and len(headers) <= 200:
        names = [name[:40] for name in headers.names()]  # the same, from the index
    else:
        names = [str(name).lower()[:40] for name in headers.keys()[:200]]
    out += [f"h:{name}" for name in dict.fromkeys(names)]
    for name in WORD_HEADERS:
        value = message.header(name)[:MAX_HEADER_VALUE]
        if name == "content-type":
            value = _CHARSET_PARAM.sub("", value)  # the charset is a clue of its own, below
        if value:
            out += _words(value, f"{name[:4]}:")
    sender = message.from_address
    if sender:
        out.append(f"fromdom:{mime.address_domain(sender)[:60]}")
    msgid = message.message_id
    out.append(
        f"msgid:{msgid.rpartition('@')[2].strip('<> ').lower()[:60]}"
        if "@" in msgid
        else "msgid:none"
    )
    if message.date is None:
        out.append("date:none")
    return out


def _body(message: mime.ParsedMessage, view: View) -> list[str]:
    text = view.text[:BODY_LIMIT]
    out = _words(text)
    if view.html:
        out += _words(view.html_visible[:BODY_LIMIT], "" if not text.strip() else "hv:")
    return out


def _links(message: mime.ParsedMessage, view: View) -> list[str]:
    out = []
    for host in view.hosts[:50]:
        host = host.lower().rstrip(".")[:100]
        out.append(f"url:{host}")
        labels = host.split(".")
        if len(labels) > 2:
            out.append(f"url:{'.'.join(labels[-2:])}")
        if _IP_HOST.match(host):
            out.append("url:ip")
    out.append(f"links:{min(len(view.links), 20) // 5}")
    return out


def _shape(message: mime.ParsedMessage, view: View) -> list[str]:
    out = [f"part:{part.content_type[:60]}" for part in message.parts[:50]]
    for part in message.parts[:20]:
        charset = part.message.get_content_charset()
        if charset and charset not in _USUAL_CHARSETS:
            out.append(f"charset:{charset[:30]}")
        if part.encoding and part.encoding not in _USUAL_ENCODINGS:
            out.append(f"cte:{part.encoding[:20]}")
    if view.html:
        lower = view.html_lower[:BODY_LIMIT]
        # Each name once, in order: tokenize keeps only a token's first place anyway.
        out += [f"tag:{name}" for name in dict.fromkeys(_TAG_NAME.findall(lower))]
    if message.defects:
        out.append("mime:defect")
    return out
