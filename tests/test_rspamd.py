"""The rspamd engine against a real rspamd (Debian's package) on loopback, and in the filter."""

from __future__ import annotations

import dataclasses
import json
import smtplib
import time
import uuid
from email import message_from_bytes

import pytest
from sqlalchemy import select

from cleanmail import audit, mailboxes, mime
from cleanmail.filter.engines import EngineError, Envelope, LearnError
from cleanmail.filter.rspamd import RspamdEngine
from cleanmail.models import Message
from tests.conftest import FilterProcess
from tests.messages import GTUBE, message
from tests.servers import RspamdServer, free_port, http_request

ENVELOPE = Envelope("kari@example.com", ("ola@example.no",), "192.0.2.10", "mail.example.com")
SPAM = message(subject="You have won", body=f"{GTUBE}\n")
HAM = message()


def engine(rspamd: RspamdServer, *, timeout: float = 30.0, password: str | None = None):
    """An engine for the test rspamd."""
    return RspamdEngine(
        rspamd.url,
        controller_url=rspamd.controller_url,
        password=rspamd.password if password is None else password,
        timeout=timeout,
    )


def send(port: int, raw: bytes, rcpt: str = "ola@example.no") -> tuple[int, bytes]:
    """Hand one message to the filter; its reply to the data."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("mail.example.com")
        client.mail("kari@example.com")
        client.rcpt(rcpt)
        return client.data(raw)


def with_rspamd(config, rspamd: RspamdServer, **changes):
    """The test's configuration with rspamd as its only engine, unless told otherwise."""
    settings = {
        "engines": ("rspamd",),
        # Generous: the machine running the tests may be busy.
        "verdict_timeout": 60.0,
        "engine_timeout": 30.0,
        "rspamd_url": rspamd.url,
        "rspamd_controller_url": rspamd.controller_url,
        "rspamd_password": rspamd.password,
        **changes,
    }
    return dataclasses.replace(config, **settings)


def held(database) -> list[Message]:
    """Every message in the quarantine."""
    with database.session_scope() as session:
        return list(session.scalars(select(Message)))


def scanned(rspamd: RspamdServer) -> int:
    """How many messages rspamd has checked so far."""
    return int(rspamd.stat()["scanned"])


def test_gtube_is_rejected_with_its_symbol(rspamd_server):
    result = engine(rspamd_server).check(mime.parse(SPAM), ENVELOPE)
    assert result.verdict == "reject"
    assert result.score >= 15
    gtube = next(hit for hit in result.hits if hit.code == "GTUBE")
    assert "rspamd: GTUBE" in gtube.text


def test_ordinary_mail_passes_and_rspamd_sees_the_envelope(rspamd_server):
    envelope = dataclasses.replace(ENVELOPE, client_name="mail.example.com")
    ham = mime.parse(message(subject="Dinner on Saturday?"))  # its own Message-ID
    result = engine(rspamd_server).check(ham, envelope)
    assert result.verdict == "pass"
    assert result.score < 6
    assert all(hit.score > 0 for hit in result.hits)  # rules that lowered the score are no reasons
    history = json.loads(
        http_request(
            f"{rspamd_server.controller_url}/history",
            headers={"Password": rspamd_server.password},
        )
    )
    (latest,) = [row for row in history if row["id"] == ham.header("Message-ID")[1:-1]]
    assert latest["ip"] == "192.0.2.10"
    assert "FROM_EQ_ENVFROM" in latest["symbols"]  # the envelope sender arrived
    assert "TO_MATCH_ENVRCPT_ALL" in latest["symbols"]  # and the recipient
    assert not any(name.startswith("RDNS_") for name in latest["symbols"])  # the name too


def test_a_stopped_rspamd_is_an_engine_error():
    stopped = RspamdEngine(
        f"http://127.0.0.1:{free_port()}", controller_url="http://127.0.0.1:1", timeout=2
    )
    with pytest.raises(EngineError, match="unavailable"):
        stopped.check(mime.parse(HAM), ENVELOPE)


def test_a_hung_rspamd_times_out(rspamd_server):
    hurried = engine(rspamd_server, timeout=0.5)
    started = time.monotonic()
    with rspamd_server.paused(), pytest.raises(EngineError, match="timed out"):
        hurried.check(mime.parse(HAM), ENVELOPE)
    assert time.monotonic() - started < 3
    assert hurried.check(mime.parse(HAM), ENVELOPE).verdict == "pass"  # and it recovers


def unseen(subject: str) -> bytes:
    """A message of words no classifier has seen (rspamd skips mail it is sure of)."""
    return message(subject=subject, body=" ".join(uuid.uuid4().hex[:10] for _ in range(30)))


def test_learning_reaches_rspamd(tmp_path):
    # Its own rspamd: the session's one may still be busy with other tests' mail, and
    # its counts would then move for reasons of their own.
    with RspamdServer(tmp_path) as rspamd:
        teacher = engine(rspamd)
        assert rspamd.learned() == 0
        lesson = unseen("Cheap watches")
        teacher.learn(lesson, spam=True)
        assert rspamd.learned() == 1
        teacher.learn(unseen("Minutes"), spam=False)
        assert rspamd.learned() == 2
        # The same lesson again is no error. rspamd's learn cache mostly answers "already
        # learned", but now and then learns it once more: its count is not ours to check.
        teacher.learn(lesson, spam=True)
        assert rspamd.learned() in (2, 3)


def test_learning_with_a_wrong_password_is_refused(rspamd_server):
    with pytest.raises(LearnError, match="PASSWORD"):
        engine(rspamd_server, password="wrong").learn(message(subject="x" * 30), spam=True)


def test_learning_from_a_stopped_controller_is_a_learn_error():
    stopped = RspamdEngine("http://127.0.0.1:1", controller_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(LearnError, match="unavailable"):
        stopped.learn(HAM, spam=False)


# Through the filter ------------------------------------------------------------------


def test_cleanmail_filter_quarantines_gtube_and_passes_ham(
    rspamd_server, owner, config, database, smtp_sink
):
    config.store_dir.mkdir(parents=True, exist_ok=True)
    process = FilterProcess(with_rspamd(config, rspamd_server)).start()
    try:
        assert send(config.filter_listen.port, SPAM)[0] == 250
        assert send(config.filter_listen.port, HAM)[0] == 250
    finally:
        assert process.stop() == 0
    (spam,) = held(database)
    assert spam.subject == "You have won"
    codes = {reason["code"] for reason in spam.reasons}
    assert "GTUBE" in codes
    (delivered,) = smtp_sink.wait_for(1)
    headers = message_from_bytes(delivered.data)
    assert headers["Subject"] == "Lunch on Friday?"
    assert headers["X-Cleanmail-Verdict"] == "pass"


def test_rspamd_reject_is_refused_where_the_domain_rejects(
    rspamd_server, owner, config, database, smtp_sink, start_filter
):
    with database.session_scope(write=True) as session:
        mailboxes.set_thresholds(
            session,
            audit.Actor("operator", "test"),
            "example.no",
            quarantine_threshold=5.0,
            reject_threshold=100.0,
        )
    thread = start_filter(with_rspamd(config, rspamd_server))
    code, text = send(thread.port, SPAM)
    assert (code, text[:5]) == (550, b"5.7.1")
    assert held(database) == []
    assert smtp_sink.messages == []


def test_rules_decide_first_and_rspamd_only_sees_undecided_mail(
    rspamd_server, owner, config, database, smtp_sink, start_filter
):
    with database.session_scope(write=True) as session:
        mailboxes.set_thresholds(
            session,
            audit.Actor("operator", "test"),
            "example.no",
            quarantine_threshold=5.0,
            reject_threshold=100.0,
        )
    chained = with_rspamd(config, rspamd_server, engines=("rules", "rspamd"))
    thread = start_filter(chained)
    before = scanned(rspamd_server)
    assert send(thread.port, SPAM)[0] == 550  # the rules' GTUBE score is past the reject line
    assert scanned(rspamd_server) == before
    assert send(thread.port, HAM)[0] == 250  # undecided by the rules: rspamd is asked
    assert scanned(rspamd_server) == before + 1
    smtp_sink.wait_for(1)


def test_a_stopped_rspamd_gives_451_and_nothing_is_delivered(
    owner, config, database, smtp_sink, start_filter
):
    gone = f"http://127.0.0.1:{free_port()}"
    stopped = dataclasses.replace(
        config, engines=("rules", "rspamd"), engine_timeout=2.0, rspamd_url=gone
    )
    thread = start_filter(stopped)
    code, text = send(thread.port, HAM)
    assert code == 451 and b"4.7.1" in text
    assert smtp_sink.messages == [] and held(database) == []


def test_fail_open_passes_with_a_reason_saying_rspamd_was_unavailable(
    owner, config, database, smtp_sink, start_filter
):
    gone = f"http://127.0.0.1:{free_port()}"
    lenient = dataclasses.replace(
        config,
        engines=("rules", "rspamd"),
        engine_timeout=2.0,
        engine_fail_open=True,
        rspamd_url=gone,
    )
    thread = start_filter(lenient)
    assert send(thread.port, HAM)[0] == 250
    (delivered,) = smtp_sink.wait_for(1)
    headers = message_from_bytes(delivered.data)
    assert headers["X-Cleanmail-Verdict"] == "pass"
    assert "ENGINE_UNAVAILABLE" in headers["X-Cleanmail-Reasons"]


def test_a_hung_rspamd_gives_451_within_the_engine_timeout(
    rspamd_server, owner, config, database, smtp_sink, start_filter
):
    hurried = with_rspamd(config, rspamd_server, engine_timeout=0.5)
    thread = start_filter(hurried)
    started = time.monotonic()
    with rspamd_server.paused():
        code = send(thread.port, HAM)[0]
    assert code == 451
    assert time.monotonic() - started < 5
    assert smtp_sink.messages == [] and held(database) == []


def test_big_mail_is_left_to_the_embedded_engines(owner, config, database, smtp_sink, start_filter):
    gone = f"http://127.0.0.1:{free_port()}"
    small_limit = dataclasses.replace(
        config, engines=("rules", "rspamd"), engine_max_size=len(HAM) - 1, rspamd_url=gone
    )
    thread = start_filter(small_limit)
    assert send(thread.port, HAM)[0] == 250  # rspamd is down, but it was not asked
    smtp_sink.wait_for(1)
    assert send(thread.port, message(subject="Hi", body="short"))[0] == 451  # this one it is
