"""Owners' decisions sent on to the external engines: releases as ham, blocks as spam.

A release or a block only records a learning event, in the owner's own transaction
(cleanmail/learning.py); the scheduler's feedback job hands each event to every
configured engine that learns (rspamd's controller, spamd's ``TELL``). While an engine
is unavailable its lessons wait and are tried again with a growing delay, so an
owner's click never waits for an engine, and no lesson is dropped without a trace:
one given up on keeps the engine's last answer for operators.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, func, select, update

from cleanmail import db
from cleanmail.filter.engines import Learner, LearnError
from cleanmail.models import EngineLesson, Label, LearningEvent
from cleanmail.store import Store, StoreError

log = logging.getLogger(__name__)

# What people decided; "train" events are the classifier's bootstrap folders, which
# an external engine is trained on with its own tools.
SOURCES = ("release", "block", "mark")
# Decisions older than this when an engine is first configured are not sent to it.
HORIZON = timedelta(days=7)
BATCH = 100  # lessons per engine and run
MAX_ATTEMPTS = 12  # with the delays below, about half a day of trying
FIRST_DELAY = timedelta(minutes=1)
LONGEST_DELAY = timedelta(hours=2)
LEARNED, FAILED = "learned", "failed"


@dataclass
class Tally:
    """What one run did for one engine."""

    learned: int = 0
    retrying: int = 0
    failed: int = 0


def run(
    database: db.Database, store: Store, learners: Sequence[Learner], now: datetime
) -> dict[str, Tally]:
    """Queue new decisions for every engine and send the lessons that are due."""
    tallies = {}
    for learner in learners:
        queued = enqueue(database, learner.name, now)
        if queued:
            log.info("feedback: %d new lessons for %s", queued, learner.name)
        tallies[learner.name] = send_due(database, store, learner, now)
    return tallies


def enqueue(database: db.Database, engine: str, now: datetime) -> int:
    """A waiting lesson for each recent learning event this engine has not had yet."""
    with database.session_scope(write=True) as session:
        had = exists().where(
            EngineLesson.event_id == LearningEvent.id, EngineLesson.engine == engine
        )
        ids = session.scalars(
            select(LearningEvent.id)
            .where(LearningEvent.source.in_(SOURCES), LearningEvent.at >= now - HORIZON, ~had)
            .order_by(LearningEvent.id)
            .limit(10 * BATCH)
        ).all()
        session.add_all(
            EngineLesson(event_id=event_id, engine=engine, attempts=0, next_try_at=now)
            for event_id in ids
        )
    return len(ids)


def send_due(database: db.Database, store: Store, learner: Learner, now: datetime) -> Tally:
    """Teach the engine its due lessons, oldest first; stop at the first it cannot take."""
    tally = Tally()
    with database.session_scope() as session:
        due = session.execute(
            select(
                EngineLesson.id,
                EngineLesson.attempts,
                LearningEvent.raw_sha256,
                LearningEvent.label,
            )
            .join(LearningEvent, LearningEvent.id == EngineLesson.event_id)
            .where(
                EngineLesson.engine == learner.name,
                EngineLesson.outcome.is_(None),
                EngineLesson.next_try_at <= now,
            )
            .order_by(EngineLesson.id)
            .limit(BATCH)
        ).all()
    for lesson_id, attempts, sha256, label in due:
        try:
            raw = store.read(sha256) if sha256 else None
        except StoreError:
            raw = None
        if raw is None:
            _finish(database, lesson_id, FAILED, now, "the message is no longer stored")
            tally.failed += 1
            continue
        try:
            learner.learn(raw, spam=label == Label.SPAM)
        except LearnError as exc:
            gave_up = _retry(database, lesson_id, attempts + 1, now, str(exc))
            tally.failed += gave_up
            tally.retrying += not gave_up
            log.warning("feedback: %s did not take a lesson: %s", learner.name, exc)
            break  # the engine is likely down: the others wait for the next run
        _finish(database, lesson_id, LEARNED, now)
        tally.learned += 1
    return tally


def _finish(
    database: db.Database, lesson_id: int, outcome: str, now: datetime, error: str | None = None
) -> None:
    with database.session_scope(write=True) as session:
        values = {"outcome": outcome, "done_at": now}
        if error is not None:
            values["last_error"] = error
        session.execute(update(EngineLesson).where(EngineLesson.id == lesson_id).values(**values))


def _retry(database: db.Database, lesson_id: int, attempts: int, now: datetime, error: str) -> bool:
    """Note a failed attempt; True when that was the last one."""
    gave_up = attempts >= MAX_ATTEMPTS
    delay = min(FIRST_DELAY * 2 ** (attempts - 1), LONGEST_DELAY)
    with database.session_scope(write=True) as session:
        session.execute(
            update(EngineLesson)
            .where(EngineLesson.id == lesson_id)
            .values(
                attempts=attempts,
                last_error=error[:1000],
                next_try_at=now + delay,
                outcome=FAILED if gave_up else None,
                done_at=now if gave_up else None,
            )
        )
    return gave_up


def retry_failed(database: db.Database, now: datetime) -> int:
    """Give the lessons that were given up on a fresh start; how many."""
    with database.session_scope(write=True) as session:
        result = session.execute(
            update(EngineLesson)
            .where(EngineLesson.outcome == FAILED)
            .values(outcome=None, attempts=0, next_try_at=now, done_at=None)
        )
        return result.rowcount or 0


def summary(database: db.Database) -> dict[str, dict[str, int]]:
    """Per engine, how many lessons were learned, are waiting, or were given up on."""
    counts: dict[str, dict[str, int]] = {}
    with database.session_scope() as session:
        rows = session.execute(
            select(EngineLesson.engine, EngineLesson.outcome, func.count()).group_by(
                EngineLesson.engine, EngineLesson.outcome
            )
        )
        for engine, outcome, count in rows:
            tally = counts.setdefault(engine, {LEARNED: 0, "waiting": 0, FAILED: 0})
            tally[outcome or "waiting"] = count
    return counts


def failures(database: db.Database, limit: int = 20) -> list[tuple[str, int, str]]:
    """The latest lessons given up on: engine, learning event id, the engine's last answer."""
    with database.session_scope() as session:
        rows = session.execute(
            select(EngineLesson.engine, EngineLesson.event_id, EngineLesson.last_error)
            .where(EngineLesson.outcome == FAILED)
            .order_by(EngineLesson.id.desc())
            .limit(limit)
        )
        return [(engine, event_id, error or "") for engine, event_id, error in rows]
