"""The message view never fails: broken MIME, charsets, NUL bytes, deep nesting."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleanmail import mime
from cleanmail.filter import attachments, rules
from cleanmail.filter.engines import Envelope

ENVELOPE = Envelope(sender="a@example.com", recipients=("ola@example.no",))


def nested(depth: int) -> bytes:
    """A multipart message nested ``depth`` levels deep."""
    head, tail = b"", b""
    for level in range(depth):
        head += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (level, level)
        tail = b"\r\n--b%d--\r\n" % level + tail
    return (
        b"From: a@b.test\r\nSubject: deep\r\n" + head + b"Content-Type: text/plain\r\n\r\nhi" + tail
    )


def check_everything(raw: bytes) -> mime.ParsedMessage:
    """What the filter does with a message, end to end, minus the network."""
    parsed = mime.parse(raw)
    for value in (parsed.subject, parsed.from_header, parsed.from_address, parsed.message_id):
        assert isinstance(value, str) and "\x00" not in value
        value.encode("utf-8")  # no lone surrogates: storable in PostgreSQL
    assert parsed.date is None or parsed.date.tzinfo is not None
    attachments.scan(parsed.parts)
    rules.RulesEngine().check(parsed, ENVELOPE)
    return parsed


def test_nesting_hundreds_deep_is_capped_quickly() -> None:
    for depth in (100, 500, 3000):
        started = time.monotonic()
        parsed = check_everything(nested(depth))
        assert time.monotonic() - started < 5
        assert parsed.subject == "deep"
        if depth > mime.MAX_DEPTH:
            assert "mime-too-deep" in parsed.defects


def test_unknown_and_lying_charsets_decode() -> None:
    raw = (
        b"Subject: =?x-klingon?Q?caf=E9?= =?utf-8?B?////?=\r\n"
        b"From: =?iso-8859-1?Q?J=F8rgen?= <j@example.dk>\r\n"
        b"Content-Type: text/plain; charset=utf-7000\r\n\r\n\xe6\xf8\xe5 \xff\r\n"
    )
    parsed = check_everything(raw)
    assert parsed.from_header.startswith("Jørgen")
    assert "æøå" in parsed.text_body or "\ufffd" in parsed.text_body


def test_broken_base64_and_nul_bytes() -> None:
    raw = (
        b"Subject: nul\x00here\r\nFrom: x\x00@y.test\r\nContent-Type: multipart/mixed; "
        b'boundary=zz\r\n\r\n--zz\r\nContent-Type: application/pdf; name="a\x00.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64 at all===\r\n--zz--\r\n"
    )
    parsed = check_everything(raw)
    assert "\x00" not in parsed.subject


def test_enormous_header_and_line() -> None:
    raw = (
        b"Subject: "
        + b"A" * 2_000_000
        + b"\r\n"
        + b"X-Junk: y\r\n" * 20000
        + b"\r\n"
        + b"z" * 3_000_000
    )
    started = time.monotonic()
    parsed = check_everything(raw)
    assert time.monotonic() - started < 10
    assert len(parsed.subject) <= mime.HEADER_LIMIT


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=5000))
def test_random_bytes_never_break_the_checks(raw: bytes) -> None:
    check_everything(raw)


HEADER_NAMES = st.sampled_from(
    [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "X-Y",
    ]
)
HEADER_VALUES = st.one_of(
    st.text(max_size=200),
    st.sampled_from(
        [
            "multipart/mixed; boundary=",
            'multipart/alternative; boundary="a"',
            "text/html; charset=",
            "base64",
            "quoted-printable",
            "attachment; filename*=utf-8''%E2%80%AEexe.pdf",
            "=?utf-8?b?",
            "=?unknown?q?=FF?=",
            "<>",
            "@@@",
            "Mon, 32 Dec 99999 25:61:61 +9999",
        ]
    ),
)


@st.composite
def broken_mime(draw: st.DrawFn) -> bytes:
    """Header soup around nested parts with random boundaries and encodings."""
    lines = [
        f"{draw(HEADER_NAMES)}: {draw(HEADER_VALUES)}" for _ in range(draw(st.integers(0, 12)))
    ]
    body = []
    for _ in range(draw(st.integers(0, 6))):
        body.append(f"--{draw(st.sampled_from(['a', '', 'zz', 'a--']))}")
        body += [
            f"{draw(HEADER_NAMES)}: {draw(HEADER_VALUES)}" for _ in range(draw(st.integers(0, 3)))
        ]
        body += ["", draw(st.text(max_size=300))]
    text = "\r\n".join(lines) + "\r\n\r\n" + "\r\n".join(body)
    return text.encode("utf-8", "surrogatepass") + draw(st.binary(max_size=100))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken_mime())
def test_broken_mime_never_breaks_the_checks(raw: bytes) -> None:
    check_everything(raw)
