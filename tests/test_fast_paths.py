"""The checks' fast paths give exactly what the slower code they stand in for gives.

Each test holds a fast path against the plain version (the code it replaced, kept here
as the oracle) on hostile, generated strings: a difference would change a verdict.
"""

from __future__ import annotations

import email.utils
import functools
import re

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleanmail import mime, mimewalk
from cleanmail.filter import classifier, learned, rules, tokenizer, view

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Letters, digits, the characters words join on, spaces of several kinds, Latin-1 and
# cp1252 letters and marks, characters that change length or shape when lower-cased,
# CJK, and a lone surrogate.
TRICKY = st.text(
    st.sampled_from(
        list("aB9_'.-x0 \t\n!,@<>\"=?")
        + list("\x1c\x0b\x85\xa0\xb2\xaa\xb5\xdf\xff\xc9\xe9\xd7\u2019\u201c\u20ac\u0192\u0160")
        + list("\u0161\u0178\u2122\u0130\u03a3\u01c5\ufb00\xbd\u4e2d\ud800")
    ),
    max_size=80,
)
RUNS = st.lists(
    st.text(st.sampled_from(list("ab9_'.-é")), min_size=1, max_size=60), max_size=8
).map(" ".join)


def words_by_regex(text: str, prefix: str = "") -> list[str]:
    """tokenizer._words as it was: one regex match a word."""
    text = text[: tokenizer.BODY_LIMIT].lower().translate(tokenizer._NINES)
    out = []
    if tokenizer._CJK_RUN.search(text):
        for run in tokenizer._CJK_RUN.findall(text):
            out += [prefix + run[i : i + 2] for i in range(len(run) - 1)]
        text = tokenizer._CJK_RUN.sub(" ", text)
    words = tokenizer._WORD.findall(text)
    out += [prefix + word for word in words if 2 < len(word) <= tokenizer.MAX_WORD]
    longs = {len(w) // 10 for w in words if len(w) > tokenizer.MAX_WORD}
    return out + [f"{prefix}long:{size}" for size in longs]


@FAST
@given(st.one_of(TRICKY, RUNS), st.sampled_from(["", "hv:", "subj:"]))
def test_tokenizer_words_match_the_regex(text: str, prefix: str) -> None:
    assert tokenizer._words(text, prefix) == words_by_regex(text, prefix)


def test_tokenizer_words_match_the_regex_for_every_character() -> None:
    for code in range(0x3100):
        char = chr(code)
        for text in (char, f"ab{char}cd", char * 3, "x" * 30 + char + "y" * 20):
            assert tokenizer._words(text) == words_by_regex(text), repr(text)


@FAST
@given(st.one_of(TRICKY, RUNS))
def test_rule_words_match_the_regex(text: str) -> None:
    message = mime.parse(b"Subject: s\r\n\r\n")
    message.__dict__["subject"] = ""
    found = view.View(message, tokenizer._EMPTY, tokenizer._CLOCK_FIXED)
    found.__dict__["body"] = text
    expected = " " + " ".join(re.findall(r"[^\W_]+", f"\n{text}".lower())) + " "
    assert found.words == expected


URLS = st.lists(
    st.sampled_from(["http://", "https://", "www.", "http:/", "ww", "x", ".", " ", "(", "a",
                     "hwww.", "httpwww.x"]),
    max_size=12,
).map("".join)  # fmt: skip


@FAST
@given(URLS)
def test_bare_urls_match_one_alternation(text: str) -> None:
    pattern = re.compile(r"(?:https?://|www\.)[^\s<>\"'()]{1,2000}")
    assert list(view._bare_urls(text)) == [m.group(0) for m in pattern.finditer(text)]


RECEIVED = st.lists(
    st.sampled_from(
        ["from ", " by ", " BY ", "localhost", "LocalHost", "127.0.0.1", "::1", "with ", "WITH ",
         "imap", "POP3", "lmtp", "x", "é", " ", "\u017f", "1", ":"]
    ),
    max_size=10,
).map("".join)  # fmt: skip


@FAST
@given(RECEIVED)
def test_local_hops_match_the_patterns(value: str) -> None:
    expected = view._LOCAL_FROM.search(value.partition(" by ")[0]) or view._FETCHED.search(value)
    assert view._local_hop(value) == bool(expected)


HTML = st.lists(
    st.sampled_from(
        ["on", "load", "click", "=", " ", "_", "x", "<script", "<scriptx", "javascript:", "é",
         "display", ":", "none", "visibility", "hidden", "font-size", "0", "1", ".5", "px", ";",
         '"', "<font", "size", ">"]
    ),
    max_size=10,
).map("".join)  # fmt: skip


@FAST
@given(HTML)
def test_split_html_patterns_match_their_alternations(html: str) -> None:
    script = re.compile(r"<script\b|\bon(?:load|click|mouseover|error)\s*=|javascript:")
    hidden = re.compile(
        r"display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*[01](?:\.\d+)?\s*(?:px|pt)?"
        r"\s*[;\"']|<font[^<>]{0,300}size\s*=\s*[\"']?0\b"
    )
    assert any(p.search(html) for p in rules._SCRIPT) == bool(script.search(html))
    assert any(p.search(html) for p in rules._HIDDEN) == bool(hidden.search(html))


def address_by_parser(value: str) -> str:
    """mime.parse_address as it was: the email package's address parser."""
    for _name, address in email.utils.getaddresses([value]):
        address = address.strip().lower()
        if "@" in address and " " not in address:
            return address[:320]
    return ""


ADDRESS = st.from_regex(mime._SIMPLE_FROM, fullmatch=True)
NEAR_ADDRESS = st.lists(
    st.sampled_from(["a", "Z", "0", ".", "@", "<", ">", '"', " ", "-", "'", "!", "x.y", "@b.c",
                     "(c)", ",", ";", ":", "\\", "[", "é", ".."]),
    max_size=10,
).map("".join)  # fmt: skip


@FAST
@given(st.one_of(ADDRESS, NEAR_ADDRESS))
def test_simple_from_shapes_match_the_parser(value: str) -> None:
    assert mime.parse_address(value) == address_by_parser(value)


@FAST
@given(st.text(st.characters(max_codepoint=127), max_size=60))
def test_plain_headers_decode_as_before(value: str) -> None:
    expected = mime.clean_text(re.sub(r"\s+", " ", value).strip())
    if "=?" not in value:
        assert mime.decode_header(value) == expected


def test_indexed_message_forgets_what_it_kept_when_headers_change() -> None:
    message, _ = mimewalk._header_message(
        b'Content-Type: text/plain; charset="koi8-r"\r\nSubject: one\r\n'
    )
    assert message.get("subject") == "one" and message.get_content_charset() == "koi8-r"
    assert message.count("subject") == 1 and "Subject" in message
    message.replace_header("Subject", "two")
    message.set_param("charset", "utf-8")
    message["Subject"] = "three"
    assert message.get("subject") == "two" and message.get_content_charset() == "utf-8"
    assert message.count("subject") == 2
    assert message.names() == list(dict.fromkeys(name.lower() for name in message.keys()))
    del message["Subject"]
    assert "Subject" not in message and message.get("subject") is None


def explain_by_kind(model: classifier.Model, tokens: list[str], score: float) -> tuple:
    """learned.explain as it was: every token, its kind by learned.kind."""
    if abs(score) < learned.QUIET:
        return ()
    if score < 0:
        return (learned.engines.Hit(learned.HAM_HIT[0], score, learned.HAM_HIT[1]),)
    weights = model.weights[classifier.hashes(tokens)]
    shares: dict[str, float] = {}
    words = []
    for token, weight in zip(tokens, weights.tolist(), strict=True):
        if weight <= 0:
            continue
        what = learned.kind(token)
        shares[what] = shares.get(what, 0.0) + weight
        if what == "words" and not token.startswith("long:"):
            words.append((weight, token.partition(":")[2] if ":" in token else token))
    total = sum(shares.values()) or 1.0
    named = {what: s for what, s in shares.items() if s / total >= learned.SHARE} or {"words": 1}
    hits = []
    for what, share in sorted(named.items(), key=lambda item: -item[1]):
        code, text = learned.HITS[what]
        if what == "words" and words:
            top = dict.fromkeys(word for _weight, word in sorted(words, reverse=True))
            text = f"{text}: {', '.join(list(top)[:3])}"
        score_part = round(score * share / sum(named.values()), 2)
        hits.append(learned.engines.Hit(code, score_part, text))
    return tuple(hits)


TOKENS = st.lists(
    st.sampled_from(["long", "long:3", "subj:long", "hv:free", "free", "subj:free", "url:x.com",
                     "links:2", "h:received", "tag:a", "part:text/html", "money", "x:y", ":odd",
                     "odd:", "fromdom:a.b"]).flatmap(
        lambda t: st.sampled_from([t, t + "1", t + "22"])),
    max_size=40, unique=True,
)  # fmt: skip


@functools.cache
def random_model() -> classifier.Model:
    """A model whose weights are random, half of them for spam."""
    model = classifier.Model.empty()
    model.weights[:] = np.random.default_rng(1).normal(0, 1, classifier.FEATURES)
    return model


@FAST
@given(TOKENS, st.sampled_from([0.3, -1.0, 0.7, 3.3, 8.0]))
def test_explain_matches_every_token_walk(tokens: list[str], score: float) -> None:
    model = random_model()
    assert learned.explain(model, tokens, score) == explain_by_kind(model, tokens, score)
