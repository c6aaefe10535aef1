"""The message view never fails: broken MIME, charsets, NUL bytes, deep nesting."""

from __future__ import annotations

import base64
import email
import gc
import os
import time
import tracemalloc
from email.message import EmailMessage, Message
from email.policy import SMTP, compat32
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleanmail import mime, mimewalk
from cleanmail.filter import attachments, rules
from cleanmail.filter.engines import Envelope

ENVELOPE = Envelope(sender="a@example.com", recipients=("ola@example.no",))
CORPUS = Path("/work/shared/corpus")


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


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=400)
NAMES = st.text("abcxyzABC019_-.æøå€", min_size=1, max_size=30).filter(lambda n: n.strip("."))
TYPES = st.sampled_from(["application/pdf", "application/zip", "image/png", "text/plain"])


@st.composite
def well_formed(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A message as the stdlib writes one, and the attachments put into it."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "kari@example.com", "ola@example.no", "Hei"
    msg.set_content(draw(TEXT) + "\n")
    if draw(st.booleans()):
        msg.add_alternative(f"<p>{draw(TEXT)}</p>\n", subtype="html")
    attached = []
    for _ in range(draw(st.integers(0, 4))):
        name, data = draw(NAMES), draw(st.binary(max_size=3000))
        maintype, _, subtype = draw(TYPES).partition("/")
        if maintype == "text":  # the stdlib rewrites line ends: compared with it only
            msg.add_attachment(data.decode("latin-1"), subtype=subtype, filename=name)
        else:
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
            attached.append((name, data))
    if draw(st.booleans()):  # a forwarded message: a message/rfc822 part with parts inside
        outer = EmailMessage()
        outer["Subject"] = "Fwd: Hei"
        outer.set_content("see below\n")
        outer.add_attachment(msg)
        msg = outer
    stem = draw(st.text("abcXYZ019'()+_,-./:=? ", min_size=1, max_size=40).map(str.strip))
    for number, part in enumerate(m for m in msg.walk() if m.is_multipart()):
        if part.get_content_maintype() == "multipart":  # not random.random, for hypothesis
            part.set_boundary(f"{stem}{number}")
    linesep = draw(st.sampled_from(["\r\n", "\n"]))
    return msg.as_bytes(policy=SMTP.clone(linesep=linesep)), attached


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(well_formed())
def test_parts_are_the_ones_the_email_package_finds(case: tuple[bytes, list]) -> None:
    raw, attached = case
    leaves = [
        m for m in email.message_from_bytes(raw, policy=compat32).walk() if not m.is_multipart()
    ]
    parsed = mime.parse(raw)
    assert [p.content_type for p in parsed.parts] == [m.get_content_type() for m in leaves]
    assert [p.payload for p in parsed.parts] == [m.get_payload(decode=True) for m in leaves]
    assert [p.filename for p in parsed.parts] == [m.get_filename() for m in leaves]
    # Text attachments are left out of ``attached`` (the stdlib rewrites their line ends),
    # and one may equal a binary one byte for byte: compare the binary ones only.
    binary = [
        (p.filename, p.payload)
        for p in parsed.parts
        if p.filename and not p.content_type.startswith("text/")
    ]
    assert binary == attached
    assert not parsed.defects


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=200) | st.text("QUJDab+/=\r\n !\x00é", max_size=200).map(str.encode),
    st.sampled_from(["base64", "quoted-printable", "7bit", "x-uuencode"]),
)
def test_transfer_encodings_decode_as_the_email_package_does(body: bytes, encoding: str) -> None:
    message = Message()
    message["Content-Transfer-Encoding"] = encoding
    message.set_payload(body.decode("ascii", "surrogateescape"))
    assert mimewalk.decode(memoryview(body), encoding) == message.get_payload(decode=True)


def test_lf_only_and_broken_structure() -> None:
    raw = (
        b"Subject: lf\nContent-Type: multipart/mixed; boundary=b\n\npreamble\n--b \n"
        b"Content-Type: text/plain\n\nfirst\n--b\t\nContent-Type: message/rfc822\n\n"
        b"Subject: inner\nContent-Type: text/html\n\n<p>inner</p>\n\n--b\n\nno close\n"
    )
    parsed = mime.parse(raw)
    assert [(p.content_type, p.depth, p.payload) for p in parsed.parts] == [
        ("text/plain", 1, b"first"),
        ("text/html", 2, b"<p>inner</p>\n"),
        ("text/plain", 1, b"no close"),
    ]
    assert parsed.defects == ["mime-defects"]  # the close delimiter never came
    no_boundary = mime.parse(b"Content-Type: multipart/mixed\r\n\r\n--x\r\nhi\r\n")
    assert [p.payload for p in no_boundary.parts] == [b"--x\r\nhi\r\n"]
    assert no_boundary.defects == ["mime-defects"]


def test_a_header_bomb_is_cut_short() -> None:
    raw = b"Subject: bomb\r\n" + b"X-H: y\r\n" * 300_000 + b"\r\nbody\r\n"
    started = time.monotonic()
    parsed = check_everything(raw)
    assert time.monotonic() - started < 5
    assert parsed.subject == "bomb" and parsed.text_body == "body\r\n"
    assert len(parsed.headers) == mimewalk.MAX_HEADER_LINES
    assert parsed.defects == ["mime-defects"]


def big_message(size: int = 18 * 2**20, attachment: int = 13 * 2**20) -> bytes:
    """A message of about size bytes, most of it one base64 attachment of random bytes."""
    encoded = base64.encodebytes(os.urandom(attachment)).replace(b"\n", b"\r\n")
    head = (
        b'From: a@example.com\r\nSubject: big\r\nContent-Type: multipart/mixed; boundary="b"\r\n'
        b"\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
    )
    tail = b'\r\n--b\r\nContent-Type: application/octet-stream; name="data.bin"\r\n'
    tail += b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--b--\r\n"
    filler = b"Some words of body text.\r\n" * max(0, (size - len(head) - len(tail)) // 26)
    return head + filler + tail


def test_memory_of_an_18_mib_message() -> None:
    raw = big_message()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        parsed = mime.parse(raw)
        attachments.scan(parsed.parts)
        rules.RulesEngine().check(parsed, ENVELOPE)
        held, peak = (value - base for value in tracemalloc.get_traced_memory())
    finally:
        tracemalloc.stop()
    print(f"18 MiB message: peak {peak / 2**20:.1f} MiB above the raw {len(raw) / 2**20:.1f} MiB")
    assert len(parsed.parts[1].payload) == 13 * 2**20
    assert peak <= 2.5 * len(raw)
    assert held < 2**20 * 4  # the decoded attachment is not kept once the scan is done


@pytest.mark.skipif(not CORPUS.is_dir(), reason="no corpus")
def test_speed_against_the_email_package(capsys: pytest.CaptureFixture[str]) -> None:
    raws = []
    for folder in ("ham", "spam"):
        for path in sorted((CORPUS / folder).iterdir())[:250]:
            raw = path.read_bytes()
            raws.append(raw.partition(b"\n")[2] if raw.startswith(b"From ") else raw)
    started = time.perf_counter()
    for raw in raws:
        email.message_from_bytes(raw, policy=compat32)
    old = time.perf_counter() - started
    started = time.perf_counter()
    for raw in raws:
        mime.parse(raw)
    new = time.perf_counter() - started
    with capsys.disabled():
        per = 1e6 / len(raws)
        print(f"\nparse of {len(raws)} corpus messages: email package {old * per:.0f} µs, ", end="")
        print(f"mime.parse {new * per:.0f} µs per message")
