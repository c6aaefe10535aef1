"""Learning events: releases and blocks become ham and spam lessons, in the same transaction."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from cleanmail import audit, learning, mime, quarantine, scheduler
from cleanmail.filter import classifier, engines, learned
from cleanmail.models import ClassifierModel, Label, LearningEvent
from cleanmail.relay import Relay
from tests.conftest import hold_message, login_as
from tests.messages import message

OPERATOR = audit.Actor("operator", "support@isp.example")


@pytest.fixture
def ola(client, owner):
    login_as(client, owner)
    return owner


def events(database) -> list[LearningEvent]:
    with database.session_scope() as session:
        return list(session.scalars(select(LearningEvent).order_by(LearningEvent.id)))


def token(client, path: str) -> str:
    page = client.get(path).get_data(as_text=True)
    return page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


def test_owner_release_is_ham_and_block_is_spam(client, ola, database, store, smtp_sink):
    wanted = hold_message(database, store, ola.id, message(subject="Invoice for October"))
    pest = hold_message(
        database, store, ola.id, message(subject="CHEAP PILLS", sender="pest@spam.example")
    )
    csrf = token(client, f"/messages/{wanted}")
    client.post(f"/messages/{wanted}/release", data={"csrf_token": csrf})
    client.post(f"/messages/{pest}/block", data={"csrf_token": csrf})
    client.post(f"/messages/{wanted}/release", data={"csrf_token": csrf})  # already released
    ham, spam = events(database)
    assert (ham.label, ham.source, ham.actor_type, ham.message_id) == (
        "ham",
        "release",
        "owner",
        wanted,
    )
    assert (spam.label, spam.source, spam.message_id, spam.mailbox_id) == (
        "spam",
        "block",
        pest,
        ola.id,
    )
    assert "subj:invoice" in ham.tokens.split("\n")
    assert "subj:cheap" in spam.tokens.split("\n")
    assert ham.applied_version is None and spam.applied_version is None


def test_refused_release_teaches_nothing(config, database, store, owner, smtp_sink):
    held = hold_message(database, store, owner.id, message(subject="Busy"))
    smtp_sink.refuse = "451 4.3.0 busy"
    relay = Relay(config.relay, timeout=5, hostname="test")
    with database.session_scope(write=True) as session:  # commits the failed attempt
        with pytest.raises(quarantine.ReleaseFailed):
            quarantine.release(session, store, relay, quarantine.get(session, held), OPERATOR)
    assert events(database) == []
    smtp_sink.refuse = None
    with database.session_scope(write=True) as session:
        assert quarantine.release(session, store, relay, quarantine.get(session, held), OPERATOR)
    (event,) = events(database)
    assert (event.label, event.actor_type, event.actor) == (
        "ham",
        "operator",
        "support@isp.example",
    )


def test_operator_mark_keeps_the_lesson_after_a_delete(database, store, owner):
    held = hold_message(database, store, owner.id, message(subject="Unusual offer"))
    with database.session_scope(write=True) as session:
        row = quarantine.get(session, held)
        learning.record(session, row, "spam", OPERATOR, store=store)
        quarantine.delete(session, store, row, OPERATOR)
    (event,) = events(database)
    assert (event.label, event.source, event.actor) == (Label.SPAM, "mark", "support@isp.example")
    with database.session_scope() as session:
        (pending,) = learning.pending(session)
        assert "subj:unusual" in learning.event_tokens(pending, None)


def test_unknown_label_is_refused(database, store, owner):
    held = hold_message(database, store, owner.id, message())
    with database.session_scope() as session:
        with pytest.raises(learning.LearningError):
            learning.record(session, quarantine.get(session, held), "maybe", OPERATOR)


def test_learning_job_folds_events_into_new_versions(database, store, owner):
    ids = [hold_message(database, store, owner.id, message(subject=f"Offer {n}")) for n in range(5)]
    assert learning.apply_pending(database, store) is None  # nothing waits: no new version
    versions = []
    for n, message_id in enumerate(ids):
        with database.session_scope(write=True) as session:
            row = quarantine.get(session, message_id)
            # Without raw bytes or a store the event keeps no tokens: the job reads the store.
            learning.record(session, row, "spam" if n % 2 else "ham", OPERATOR)
        versions.append(learning.apply_pending(database, store))
    assert versions == [1, 2, 3, 4, 5]
    with database.session_scope() as session:
        assert learning.pending(session) == []
        applied = session.scalars(select(LearningEvent.applied_version).order_by(LearningEvent.id))
        assert list(applied) == [1, 2, 3, 4, 5]
        kept = session.scalars(select(ClassifierModel.id).order_by(ClassifierModel.id)).all()
        assert kept == [3, 4, 5]  # older versions are pruned
        version, model = learning.latest_model(session)
    assert (version, model.ham, model.spam) == (5, 3, 2)
    assert model.logit(classifier.indices(["subj:offer"])) != 0
    with database.session_scope(write=True) as session:  # one event still waits
        learning.record(session, quarantine.get(session, ids[0]), "ham", OPERATOR, store=store)
    assert learning.apply_pending(database, store, keep_days=0) == 6
    (left,) = events(database)  # applied events past their keeping time are gone
    assert left.applied_version == 6


def test_a_second_writer_of_the_same_version_waits_its_turn(database):
    with database.session_scope(write=True) as session:
        base, model = learning.latest_model(session)
        assert learning.save_model(session, model, base, source="train", actor="a") == 1
    with database.session_scope(write=True) as session:
        with pytest.raises(learning.ModelConflict):
            learning.save_model(session, model, base, source="learn", actor="b")
        # The failed insert left the session usable: the caller can start again.
        assert learning.latest_model(session)[0] == 1


def test_scheduler_job_learns_and_a_barely_trained_model_stays_silent(
    config, database, store, owner
):
    held = hold_message(database, store, owner.id, message(subject="Cheap pills"))
    with database.session_scope(write=True) as session:
        learning.record(session, quarantine.get(session, held), "spam", OPERATOR, store=store)
    scheduler._runtime = scheduler.Runtime(config, database)
    try:
        scheduler.learning_job()
    finally:
        scheduler._runtime = None
    watcher = learned.ModelWatcher(database)
    assert watcher.current() is not None and watcher.version == 1
    # One lesson is no basis for a verdict: the engine adds nothing yet.
    result = learned.LearnedEngine(watcher).check(
        mime.parse(message(subject="Cheap pills")), engines.Envelope("", ())
    )
    assert result == engines.EngineResult(0.0, ())
