"""Owners' releases and blocks reach the real rspamd and spamd, retried while they are down."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta

from click.testing import CliRunner
from sqlalchemy import select

from cleanmail import audit, feedback, learning, quarantine
from cleanmail.cli import cli
from cleanmail.cli import feedback as feedback_cli  # noqa: F401 - registers `engine feedback`
from cleanmail.filter.rspamd import RspamdEngine
from cleanmail.filter.spamassassin import SpamAssassinEngine
from cleanmail.models import EngineLesson, Label, Message, utcnow
from cleanmail.relay import Relay
from tests.conftest import FilterProcess, hold_message
from tests.messages import message
from tests.servers import free_port
from tests.test_spamassassin import bayes_counts

OWNER = audit.Actor("owner", "ola@example.no")


def lessons(database) -> list[EngineLesson]:
    """Every lesson, oldest first (detached)."""
    with database.session_scope() as session:
        rows = list(session.scalars(select(EngineLesson).order_by(EngineLesson.id)))
        session.expunge_all()
        return rows


def decide(database, store, config, owner, tag: str) -> tuple[int, int]:
    """An owner releases one held message and blocks the sender of another: their ids.

    The daemons live for the whole session and their Bayes classifiers skip mail they
    are already sure of, so each call makes messages of words they have never seen.
    """

    def words() -> str:
        return " ".join(uuid.uuid4().hex[:10] for _ in range(30))

    wanted = hold_message(
        database, store, owner.id, message(subject=f"Invoice {tag}", body=words())
    )
    unwanted = hold_message(
        database, store, owner.id, message(subject=f"Pills {tag}", body=words())
    )
    relay = Relay(config.relay, timeout=10, hostname="test")
    with database.session_scope(write=True) as session:
        quarantine.release(session, store, relay, session.get(Message, wanted), OWNER)
        # What the web app's "block sender" does besides adding the list entry.
        learning.record(
            session, session.get(Message, unwanted), Label.SPAM, OWNER, source="block", store=store
        )
    return wanted, unwanted


def rspamd_engine(rspamd, controller_url: str | None = None) -> RspamdEngine:
    """An engine that learns through the test rspamd's controller (or another address)."""
    return RspamdEngine(
        rspamd.url,
        controller_url=controller_url or rspamd.controller_url,
        password=rspamd.password,
        timeout=2,
    )


def test_releases_and_blocks_reach_rspamd(rspamd_server, owner, config, database, store):
    decide(database, store, config, owner, "a")
    before = rspamd_server.learned()
    tallies = feedback.run(database, store, [rspamd_engine(rspamd_server)], utcnow())
    assert dataclasses.astuple(tallies["rspamd"]) == (2, 0, 0)
    assert rspamd_server.learned() == before + 2
    assert {lesson.outcome for lesson in lessons(database)} == {"learned"}
    again = feedback.run(database, store, [rspamd_engine(rspamd_server)], utcnow())
    assert dataclasses.astuple(again["rspamd"]) == (0, 0, 0)  # each lesson is sent once
    assert feedback.summary(database) == {"rspamd": {"learned": 2, "waiting": 0, "failed": 0}}


def test_lessons_wait_while_rspamd_is_down_and_go_when_it_is_back(
    rspamd_server, owner, config, database, store
):
    decide(database, store, config, owner, "b")
    down = rspamd_engine(rspamd_server, f"http://127.0.0.1:{free_port()}")
    now = utcnow()
    tally = feedback.run(database, store, [down], now)["rspamd"]
    assert (tally.learned, tally.retrying) == (0, 1)  # stops at the first: the engine is down
    first, second = lessons(database)
    assert (first.attempts, first.outcome) == (1, None)
    assert "unavailable" in first.last_error
    assert first.next_try_at > now
    assert second.attempts == 0
    before = rspamd_server.learned()
    later = now + timedelta(minutes=5)
    assert (
        feedback.run(database, store, [rspamd_engine(rspamd_server)], later)["rspamd"].learned == 2
    )
    assert rspamd_server.learned() == before + 2


def test_a_lesson_is_given_up_after_many_attempts_and_can_be_retried(
    rspamd_server, owner, config, database, store
):
    decide(database, store, config, owner, "c")
    down = rspamd_engine(rspamd_server, f"http://127.0.0.1:{free_port()}")
    when = utcnow()
    for _run in range(2 * feedback.MAX_ATTEMPTS):  # one attempt per run while it is down
        feedback.run(database, store, [down], when)
        when += feedback.LONGEST_DELAY
    assert [lesson.outcome for lesson in lessons(database)] == ["failed", "failed"]
    (failure, _other) = feedback.failures(database)
    assert failure[0] == "rspamd" and "unavailable" in failure[2]
    assert feedback.retry_failed(database, when) == 2
    assert (
        feedback.run(database, store, [rspamd_engine(rspamd_server)], when)["rspamd"].learned == 2
    )


def test_a_purged_message_is_given_up_at_once(rspamd_server, owner, config, database, store):
    wanted, _unwanted = decide(database, store, config, owner, "d")
    with database.session_scope() as session:
        sha256 = session.get(Message, wanted).raw_sha256
    store.path(sha256).unlink()
    tally = feedback.run(database, store, [rspamd_engine(rspamd_server)], utcnow())["rspamd"]
    assert (tally.learned, tally.failed) == (1, 1)
    assert "no longer stored" in feedback.failures(database)[0][2]


def test_releases_and_blocks_reach_spamd(spamd_server, owner, config, database, store):
    decide(database, store, config, owner, "e")
    before = bayes_counts(spamd_server)
    teacher = SpamAssassinEngine(spamd_server.host, spamd_server.port)
    assert feedback.run(database, store, [teacher], utcnow())["spamassassin"].learned == 2
    after = bayes_counts(spamd_server)
    assert (after["nham"], after["nspam"]) == (before["nham"] + 1, before["nspam"] + 1)


def test_cleanmail_engine_feedback_sends_and_reports(rspamd_server, owner, config, database, store):
    decide(database, store, config, owner, "f")
    configured = dataclasses.replace(
        config,
        engines=("rules", "rspamd"),
        engine_timeout=2.0,
        rspamd_url=rspamd_server.url,
        rspamd_controller_url=rspamd_server.controller_url,
        rspamd_password=rspamd_server.password,
    )
    env = FilterProcess(configured).environment()
    result = CliRunner().invoke(cli, ["engine", "feedback", "--send"], env=env)
    assert result.exit_code == 0, result.output
    assert "rspamd: sent 2, will retry 0, gave up 0" in result.output
    assert "rspamd: learned 2, waiting 0, failed 0" in result.output


def test_the_scheduler_job_sends_lessons_to_the_configured_engine(
    rspamd_server, owner, config, database, store, monkeypatch
):
    from cleanmail import scheduler

    decide(database, store, config, owner, "g")
    configured = dataclasses.replace(
        config,
        engines=("rules", "rspamd"),
        engine_timeout=2.0,
        rspamd_url=rspamd_server.url,
        rspamd_controller_url=rspamd_server.controller_url,
        rspamd_password=rspamd_server.password,
    )
    monkeypatch.setattr(scheduler, "_runtime", scheduler.Runtime(configured, database))
    assert scheduler.JOBS["feedback"][0] is scheduler.feedback_job
    before = rspamd_server.learned()
    scheduler.feedback_job()
    assert rspamd_server.learned() == before + 2
    monkeypatch.setattr(scheduler, "_runtime", scheduler.Runtime(config, database))
    scheduler.feedback_job()  # no external engine configured: nothing to do, no error
    assert feedback.summary(database) == {"rspamd": {"learned": 2, "waiting": 0, "failed": 0}}
