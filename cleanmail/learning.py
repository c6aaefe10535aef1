"""What the classifier learns from: people's decisions about held messages, as events.

A release is ham, "block sender" or an operator's spam mark is spam; mail that passed
and was never complained about teaches nothing. ``record`` adds an event in the same
transaction as the action; the scheduler's learning job (``apply_pending``) folds the
waiting events into a new classifier model version, which every filter then loads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cleanmail import audit, db, mime
from cleanmail.filter import classifier, tokenizer
from cleanmail.models import ClassifierModel, Label, LearningEvent, Message, utcnow
from cleanmail.store import Store, StoreError

log = logging.getLogger(__name__)

SOURCES = ("release", "block", "mark", "train")
BATCH = 500  # events per model version; the job runs again for the rest
KEEP_DAYS = 30  # applied events are kept this long, for people (and engines) to look back
KEEP_VERSIONS = 3  # older model rows are deleted; a filter loads only the newest


class LearningError(ValueError):
    """A decision cannot be learned from (an unknown label or source)."""


def tokens_of(raw: bytes) -> list[str]:
    """The classifier's tokens of a raw message (never raises on odd input)."""
    return tokenizer.tokenize(mime.parse(raw))


def record(
    session: Session,
    message: Message,
    label: Label | str,
    actor: audit.Actor,
    *,
    source: str = "mark",
    raw: bytes | None = None,
    store: Store | None = None,
    tokens: list[str] | None = None,
) -> LearningEvent:
    """Add a learning event for a held message (committed with the caller's action).

    The tokens are taken now, from ``raw`` or from ``store``, so that the lesson
    survives a delete right after; without either the learning job reads the store.
    ``tokens``: already taken from the message's content (``tokens_of``).
    """
    try:
        label = Label(label)
    except ValueError:
        raise LearningError(f"unknown label {label!r}: use ham or spam") from None
    if source not in SOURCES:
        raise LearningError(f"unknown learning source {source!r}")
    if tokens is not None:
        raw = None
    elif raw is None and store is not None and message.raw_sha256 is not None:
        try:
            raw = store.read(message.raw_sha256)
        except StoreError as exc:
            log.warning("learning: cannot read message %s: %s", message.id, exc)
    if tokens is None:
        tokens = tokens_of(raw) if raw is not None else []
    event = LearningEvent(
        label=label,
        source=source,
        actor_type=actor.type,
        actor=actor.name[:320],
        raw_sha256=message.raw_sha256,
        message_id=message.id,
        mailbox_id=message.mailbox_id,
        tokens="\n".join(tokens),
        applied_version=None,
    )
    session.add(event)
    return event


def record_many(
    session: Session,
    label: Label,
    actor: audit.Actor,
    source: str,
    messages: Iterable[tuple[int, int, str | None, str]],
) -> None:
    """Add a learning event per (message_id, mailbox_id, raw_sha256, tokens joined by
    newlines) with one multi-row insert (a bulk release's lessons)."""
    if source not in SOURCES:
        raise LearningError(f"unknown learning source {source!r}")
    at = utcnow()
    rows = [
        {
            "at": at,
            "label": Label(label),
            "source": source,
            "actor_type": actor.type,
            "actor": actor.name[:320],
            "raw_sha256": sha,
            "message_id": message_id,
            "mailbox_id": mailbox_id,
            "tokens": tokens,
            "applied_version": None,
        }
        for message_id, mailbox_id, sha, tokens in messages
    ]
    if rows:
        table = LearningEvent.__table__  # RETURNING: one INSERT of many rows ("insertmanyvalues")
        session.execute(insert(table).returning(table.c.id), rows)


def pending(session: Session, *, limit: int = BATCH) -> list[LearningEvent]:
    """The oldest events no model has taken in yet."""
    query = select(LearningEvent).where(LearningEvent.applied_version.is_(None))
    return list(session.scalars(query.order_by(LearningEvent.id).limit(limit)))


def event_tokens(event: LearningEvent, store: Store | None) -> list[str]:
    """An event's tokens, read from the stored message when they were not kept."""
    if event.tokens:
        return event.tokens.split("\n")
    if store is None or event.raw_sha256 is None:
        return []
    try:
        return tokens_of(store.read(event.raw_sha256))
    except StoreError:
        return []


def mark_applied(session: Session, events: list[LearningEvent], version: int) -> None:
    """Note that a model version took these events in."""
    ids = [event.id for event in events]
    session.execute(
        update(LearningEvent).where(LearningEvent.id.in_(ids)).values(applied_version=version)
    )


class ModelConflict(Exception):
    """Another process wrote a model version first; try again from the newer one."""


def latest_model(session: Session) -> tuple[int, classifier.Model]:
    """The newest model version and its model (version 0 and an empty model when none)."""
    row = session.execute(
        select(ClassifierModel.id, ClassifierModel.state).order_by(ClassifierModel.id.desc())
    ).first()
    if row is None:
        return 0, classifier.Model.empty()
    return row.id, classifier.Model.from_bytes(row.state)


def save_model(
    session: Session, model: classifier.Model, base: int, *, source: str, actor: str
) -> int:
    """Write a model as the version after ``base``; ModelConflict when that one exists.

    The version number is the primary key, so two writers that started from the same
    version cannot both succeed: the second one's insert fails and it starts again.
    """
    version = base + 1
    row = ClassifierModel(
        id=version,
        source=source,
        actor=actor[:320],
        ham_count=model.ham,
        spam_count=model.spam,
        state=model.to_bytes(),
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        raise ModelConflict(f"model version {version} was written by another process") from None
    session.execute(delete(ClassifierModel).where(ClassifierModel.id <= version - KEEP_VERSIONS))
    return version


def forget_applied(session: Session, before: datetime) -> int:
    """Delete events that a model took in and that are older than ``before``; how many."""
    done = LearningEvent.applied_version.is_not(None) & (LearningEvent.at < before)
    return session.execute(delete(LearningEvent).where(done)).rowcount or 0


def apply_pending(
    database: db.Database, store: Store | None = None, *, keep_days: int = KEEP_DAYS
) -> int | None:
    """Fold the waiting events into a new model version; its number, or None if none waited.

    Events a model took in more than ``keep_days`` ago are deleted on the way: the
    model holds their lesson, and the row only kept their tokens.
    """
    with database.session_scope(write=True) as session:
        forget_applied(session, utcnow() - timedelta(days=keep_days))
        events = pending(session)
        if not events:
            return None
        base, model = latest_model(session)
        for event in events:
            features = classifier.indices(event_tokens(event, store))
            if len(features):
                model.learn(features, event.label == Label.SPAM)
        version = save_model(session, model, base, source="learn", actor="scheduler")
        mark_applied(session, events, version)
    log.info("learning: model version %d took in %d events", version, len(events))
    return version
