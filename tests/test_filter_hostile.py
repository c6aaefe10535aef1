"""Hostile messages through the running filter: always a clear reply, never a crash or hang."""

from __future__ import annotations

import dataclasses
import smtplib
import time

import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import func, select

from cleanmail import audit, mailboxes
from cleanmail.filter.engines import EngineResult
from cleanmail.models import Message
from tests.conftest import FilterThread
from tests.messages import GTUBE, message
from tests.test_mime import broken_mime, nested

ACTOR = audit.Actor("operator", "test")

HOSTILE = {
    "deep-nesting": nested(1500),
    "nul-and-8bit-headers": (
        b"From: \x00\xff\xfe@\x80.test\r\nSubject: \x00\xe6\xf8\r\n\r\nbody\r\n"
    ),
    "long-line": b"Subject: long\r\n\r\n" + b"x" * 60000 + b"\r\n" + GTUBE.encode() + b"\r\n",
    "broken-base64": (
        b"Subject: b64\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
        b"Content-Type: application/octet-stream; name=a.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n@@@@====%%%%\r\n--q--\r\n"
    ),
    "no-headers-at-all": b"\r\n\r\n\r\n",
    "script-subject": b"Subject: <script>alert(1)</script>\r\n"
    b"From: <img src=x onerror=alert(1)>\r\n\r\n" + GTUBE.encode() + b"\r\n",
}


@pytest.fixture
def served(database):
    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, ACTOR, "example.no")
    return database


def deliver(port: int, raw: bytes) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("x")
        client.mail("a@example.com")
        client.rcpt("ola@example.no")
        return client.data(raw)[0]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_message_gets_250_and_is_kept(served, filter_server, smtp_sink, name):
    assert deliver(filter_server.port, HOSTILE[name]) == 250
    with served.session_scope() as session:
        quarantined = session.scalar(select(func.count()).select_from(Message))
    assert quarantined + len(smtp_sink.messages) == 1


class SlowEngine:
    """An engine that takes longer than the filter's time limit (like a hung scanner)."""

    name = "slow"

    def check(self, message, envelope):
        time.sleep(1.5)
        return EngineResult.from_hits([])


def test_a_check_past_the_time_limit_answers_451(served, config, database, smtp_sink):
    hurried = dataclasses.replace(config, verdict_timeout=0.3)
    config.store_dir.mkdir(parents=True, exist_ok=True)
    running = FilterThread(hurried, database)
    running.pipeline.engines.append(SlowEngine())
    running.start()
    try:
        started = time.monotonic()
        assert deliver(running.port, HOSTILE["script-subject"]) == 451
        assert time.monotonic() - started < 1.2
        time.sleep(1.5)  # the late check finishes, and must have delivered nothing
        assert smtp_sink.messages == []
        with served.session_scope() as session:
            assert session.scalar(select(func.count()).select_from(Message)) == 0
    finally:
        running.stop()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=broken_mime())
def test_broken_mime_over_smtp_is_accepted_or_clearly_refused(served, filter_server, raw):
    # A lone "." line would end DATA early; smtplib stuffs dots, so any bytes are fair.
    assert deliver(filter_server.port, raw) in (250, 451)


def raw_session(port: int, lines: list[bytes], data: bytes | None = None) -> list[bytes]:
    """Speak SMTP over a plain socket; the replies, one per command."""
    import socket as socketlib

    replies = []
    with socketlib.create_connection(("127.0.0.1", port), timeout=60) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            line = reader.readline()
            while line[3:4] == b"-":
                line = reader.readline()
            return line.rstrip()

        reply()  # greeting
        for line in lines:
            sock.sendall(line + b"\r\n")
            replies.append(reply())
            if line == b"DATA" and data is not None and replies[-1].startswith(b"354"):
                sock.sendall(data + b"\r\n.\r\n")
                replies.append(reply())
    return replies


def test_bounces_with_the_null_sender_are_accepted(served, filter_server, smtp_sink):
    """Bounces and auto-replies come from <>; refusing them would lose them for good."""
    commands = [b"EHLO mx", b"MAIL FROM:<> SIZE=100", b"RCPT TO:<someone@elsewhere.test>", b"DATA"]
    replies = raw_session(filter_server.port, commands, message(subject="bounce"))
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250"]
    (got,) = smtp_sink.wait_for(1)
    assert got.mail_from in ("", "<>")


def test_the_size_limit_is_for_the_message_not_its_dots(served, config, database, smtp_sink):
    small = dataclasses.replace(config, max_message_size=20_000)
    config.store_dir.mkdir(parents=True, exist_ok=True)
    running = FilterThread(small, database).start()
    try:
        head = b"Subject: dots\r\n\r\n"
        exact = head + b".\r\n" * ((19_998 - len(head)) // 3)
        exact += b"x" * (19_998 - len(exact))
        assert len(exact + b"\r\n") == 20_000  # the final line end is the message's own
        stuffed = exact.replace(b"\r\n.", b"\r\n..")
        commands = [b"EHLO mx", b"MAIL FROM:<a@b.test>", b"RCPT TO:<x@elsewhere.test>", b"DATA"]
        assert raw_session(running.port, commands, stuffed)[-1][:3] == b"250"
        assert raw_session(running.port, commands, stuffed + b"y")[-1][:9] == b"552 5.3.4"
        assert smtp_sink.wait_for(1)[0].data == exact + b"\r\n"
    finally:
        running.stop()


def test_garbage_xforward_and_non_ascii_recipients_get_clear_replies(
    served, filter_server, smtp_sink
):
    commands = [
        b"EHLO mx",
        b"XFORWARD ADDR=\xff\xfe NAME=\x00",
        b"MAIL FROM:<a@b.test>",
        b"RCPT TO:<\xc3\xb8@elsewhere.test>",
        b"DATA",
    ]
    replies = raw_session(filter_server.port, commands, message(subject="x"))
    assert replies[1][:3] == b"250" and replies[-1][:3] == b"553"
    # The relay connection was not left half-way: the next message goes through.
    assert deliver(filter_server.port, message(subject="next")) == 250


def test_a_hostile_tar_header_does_not_freeze_the_filter(served, filter_server):
    import gzip
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("a.txt")
        info.pax_headers = {"comment": "1" * 400_000}
        archive.addfile(info, io.BytesIO(b""))
    raw = message(
        subject="tar",
        attachments=[("x.tar.gz", gzip.compress(buffer.getvalue()), "application/gzip")],
    )
    started = time.monotonic()
    assert deliver(filter_server.port, raw) == 250
    assert time.monotonic() - started < 5


def test_a_zip_with_a_huge_directory_is_held_not_read(served, filter_server):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for n in range(12_000):
            archive.writestr(f"f{n}", b"")
    raw = message(subject="zip", attachments=[("many.zip", buffer.getvalue(), "application/zip")])
    assert deliver(filter_server.port, raw) == 250
    with served.session_scope() as session:
        (row,) = session.scalars(select(Message))
        assert "too large to inspect" in row.reasons[0]["text"]
