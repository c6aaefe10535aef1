"""The SpamAssassin engine against a real spamd (Debian's package), alone and in the filter."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from email import message_from_bytes

import pytest
from sqlalchemy import select

from cleanmail import mime
from cleanmail.filter.engines import EngineError, Envelope, LearnError
from cleanmail.filter.spamassassin import SpamAssassinEngine
from cleanmail.models import Message
from tests.conftest import FilterProcess
from tests.messages import GTUBE, message
from tests.servers import SpamdServer, free_port
from tests.test_rspamd import send

ENVELOPE = Envelope("kari@example.com", ("ola@example.no",), "192.0.2.10", "mail.example.com")
SPAM = message(subject="You have won", body=f"{GTUBE}\n")
HAM = message()


def engine(spamd: SpamdServer, *, timeout: float = 30.0) -> SpamAssassinEngine:
    """An engine for the test spamd."""
    return SpamAssassinEngine(spamd.host, spamd.port, timeout=timeout)


def bayes_counts(spamd: SpamdServer) -> dict[str, int]:
    """spamd's Bayes database counts (``sa-learn --dump magic``): nspam and nham."""
    assert spamd.dir is not None
    if not (spamd.dir / "home" / "bayes_toks").exists():
        return {"nspam": 0, "nham": 0}  # nothing learned yet
    out = subprocess.run(
        [
            "sa-learn",
            f"--siteconfigpath={spamd.dir / 'site'}",
            f"--dbpath={spamd.dir / 'home' / 'bayes'}",
            "--dump",
            "magic",
        ],
        capture_output=True,
        text=True,
        check=True,
        user=spamd.user,
        env={"HOME": str(spamd.dir / "home"), "PATH": "/usr/bin:/bin"},
    ).stdout
    counts = {}
    for line in out.splitlines():
        fields = line.split()
        if line.endswith(("data: nspam", "data: nham")):  # "0.000  0  12  0  non-token data: nham"
            counts[fields[-1]] = int(fields[2])
    return counts


def test_gtube_is_spam_with_its_rule(spamd_server):
    result = engine(spamd_server).check(mime.parse(SPAM), ENVELOPE)
    assert result.verdict == "reject"  # 1000 points, past the reject score of 15
    assert result.score >= 1000
    gtube = next(hit for hit in result.hits if hit.code == "GTUBE")
    assert gtube.score == 1000 and "spamassassin: GTUBE" in gtube.text


def test_ordinary_mail_passes(spamd_server):
    result = engine(spamd_server).check(mime.parse(HAM), ENVELOPE)
    assert result.verdict == "pass"
    assert result.score < 5


def test_a_score_between_the_thresholds_is_quarantined(spamd_server):
    lenient = SpamAssassinEngine(spamd_server.host, spamd_server.port, reject_score=5000)
    assert lenient.check(mime.parse(SPAM), ENVELOPE).verdict == "quarantine"


def test_a_stopped_spamd_is_an_engine_error():
    with SpamdServer() as spamd:
        stopped = engine(spamd, timeout=2)
    with pytest.raises(EngineError, match="unavailable"):
        stopped.check(mime.parse(HAM), ENVELOPE)


def test_a_hung_spamd_times_out(spamd_server):
    hurried = engine(spamd_server, timeout=0.5)
    started = time.monotonic()
    with spamd_server.paused(), pytest.raises(EngineError, match="timed out"):
        hurried.check(mime.parse(HAM), ENVELOPE)
    assert time.monotonic() - started < 3


def test_tell_teaches_spamd(spamd_server):
    teacher = engine(spamd_server)
    before = bayes_counts(spamd_server)
    teacher.learn(message(subject="Cheap pills", body="Buy cheap pills now " * 10), spam=True)
    teacher.learn(message(subject="Minutes", body="The board met on Tuesday " * 10), spam=False)
    after = bayes_counts(spamd_server)
    assert after["nspam"] == before["nspam"] + 1
    assert after["nham"] == before["nham"] + 1


def test_tell_without_allow_tell_says_so():
    with SpamdServer(allow_tell=False) as spamd:
        with pytest.raises(LearnError, match="--allow-tell"):
            engine(spamd).learn(HAM, spam=False)


def test_cleanmail_filter_with_spamassassin(spamd_server, owner, config, database, smtp_sink):
    configured = dataclasses.replace(
        config,
        engines=("spamassassin",),
        verdict_timeout=60.0,
        engine_timeout=30.0,
        spamd_host=spamd_server.host,
        spamd_port=spamd_server.port,
    )
    config.store_dir.mkdir(parents=True, exist_ok=True)
    process = FilterProcess(configured).start()
    try:
        assert send(config.filter_listen.port, SPAM)[0] == 250
        assert send(config.filter_listen.port, HAM)[0] == 250
    finally:
        assert process.stop() == 0
    with database.session_scope() as session:
        (spam,) = session.scalars(select(Message))
        assert "GTUBE" in {reason["code"] for reason in spam.reasons}
    (delivered,) = smtp_sink.wait_for(1)
    assert message_from_bytes(delivered.data)["Subject"] == "Lunch on Friday?"


def test_a_stopped_spamd_gives_451_or_passes_failing_open(owner, config, smtp_sink, start_filter):
    closed = dataclasses.replace(
        config, engines=("rules", "spamassassin"), engine_timeout=2.0, spamd_port=free_port()
    )
    strict = start_filter(closed)
    assert send(strict.port, HAM)[0] == 451
    assert smtp_sink.messages == []
    elsewhere = dataclasses.replace(config.filter_listen, port=free_port())
    lenient = dataclasses.replace(closed, engine_fail_open=True, filter_listen=elsewhere)
    assert send(start_filter(lenient).port, HAM)[0] == 250
    (delivered,) = smtp_sink.wait_for(1)
    assert "ENGINE_UNAVAILABLE" in message_from_bytes(delivered.data)["X-Cleanmail-Reasons"]
