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
from tests.messages import GTUBE
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
