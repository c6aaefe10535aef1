"""Releasing many held messages in one transaction: a bulk job's unit of work.

A bulk release used to commit once per message (on SQLite an fsync each). Here a
chunk of messages is locked, sent one after another over the relay's reused
connection, and marked released in the same transaction, with its audit rows,
learning events and counters written as a few multi-row statements.

The price is a crash window of one chunk. A process that dies between the relay's
250 and the commit loses the chunk's marks; its row locks go with its connection,
the messages are still ``new``, and the resumed job sends them again. A message
then reaches its mailbox at least once, and at most once more per crash; both
copies carry the same ``X-Cleanmail-Release-ID`` header (and the original
Message-ID), so the second can be recognised. Releases at the same time still
deliver once: an owner's release waits for the chunk's row locks, then finds the
message released. ``CHUNK`` and ``SECONDS`` bound both the window and how long the
locks (on SQLite, the database's write lock) are held.

A chunk's messages go out over ``Senders``: a few threads, each with its own kept-open
relay connection, so that the relay's round trips overlap. They only relay; the one
thread that holds the transaction reads and writes the database, on SQLite as well.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, bindparam, select, text, update
from sqlalchemy.orm import Session

from cleanmail import audit, learning, logs, quarantine, stats
from cleanmail.models import Label, Mailbox, Message, Status, utcnow
from cleanmail.relay import Relay, RelayError
from cleanmail.store import Store, StoreError

log = logging.getLogger(__name__)

CHUNK = 100  # messages per transaction: at most this many are sent again after a crash
SECONDS = 1.0  # and no chunk holds its locks much longer than this (plus one relay timeout)
CONNECTIONS = 4  # relay connections (threads) that send a chunk's messages at once

_MESSAGES = Message.__table__
_RELEASED = (
    update(_MESSAGES)
    .where(_MESSAGES.c.id.in_(bindparam("b_ids", expanding=True)))
    .values(
        status=Status.RELEASED,
        released_at=bindparam("b_at"),
        release_error=None,
        release_attempts=_MESSAGES.c.release_attempts + 1,
    )
)
# Marking a chunk released bumps each mailbox's list version (migration 0009), row by
# row in no set order. Taken first and in mailbox order, those locks cannot deadlock
# with the filter after messages went out, which would send the chunk again.
_LOCK_VERSIONS = text(
    "SELECT mailbox_id FROM mailbox_versions WHERE mailbox_id = ANY(:ids)"
    " ORDER BY mailbox_id FOR UPDATE"
)
_REFUSED = (
    update(_MESSAGES)
    .where(_MESSAGES.c.id == bindparam("b_id"))
    .values(release_error=bindparam("b_error"), release_attempts=_MESSAGES.c.release_attempts + 1)
)


@dataclass(frozen=True)
class Outcome:
    """What became of one message of a chunk: "done", "failed" or "skipped"."""

    message_id: int
    outcome: str
    mailbox_id: int | None = None
    error: str | None = None
    refused: bool = False  # the relay said no: kept on the message, retryable


class Senders:
    """Threads that relay a chunk's messages at once, each over its own kept-open connection."""

    def __init__(self, store: Store, relay: Relay, count: int = CONNECTIONS) -> None:
        self.store = store
        self.relay = relay  # its connections are per thread
        self._tasks: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._local = threading.local()
        self._threads = [
            threading.Thread(target=self._serve, name=f"relay-{n}", daemon=True)
            for n in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        self._local.prepared = quarantine.Prepared()  # the content this thread read last
        try:
            while (task := self._tasks.get()) is not None:
                task()
        finally:
            self.relay.close()  # this thread's connection

    def send_all(
        self,
        rows: Sequence[Row[Any]],
        actor: audit.Actor,
        *,
        deadline: float,
        stop: Callable[[], bool] | None = None,
    ) -> list[Outcome]:
        """Relay the rows in order over every thread until the deadline or ``stop()``.

        Returns the outcomes of a prefix of the rows: each thread takes the next row
        that nobody took, and once time is up no thread takes another.
        """
        outcomes: list[Outcome | None] = [None] * len(rows)
        taken, lock, finished = [0], threading.Lock(), threading.Semaphore(0)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                while True:
                    with lock:
                        n = taken[0]
                        late = n and time.monotonic() > deadline  # but one message at least
                        if n >= len(rows) or late or errors or (stop is not None and stop()):
                            return
                        taken[0] += 1
                    outcomes[n] = self._send(rows[n], actor)
            except BaseException as exc:  # raised by the caller below
                errors.append(exc)
            finally:
                finished.release()

        for _thread in self._threads:
            self._tasks.put(work)
        for _thread in self._threads:
            finished.acquire()
        if errors:
            raise errors[0]
        return [outcome for outcome in outcomes[: taken[0]] if outcome is not None]

    def _send(self, row: Row[Any], actor: audit.Actor) -> Outcome:
        """Relay one locked message; its outcome (nothing is written yet)."""
        if row.status != Status.NEW or row.raw_sha256 is None:
            return Outcome(row.id, "skipped", row.mailbox_id)  # released, deleted or expired
        try:
            raw = self._local.prepared.raw(self.store, row.raw_sha256)
        except StoreError as exc:  # its content is unreadable: counted, not retried
            return Outcome(row.id, "failed", row.mailbox_id, str(exc)[:1000])
        header = quarantine.release_header(row.id, row.raw_sha256, actor, utcnow())
        try:
            self.relay.send(row.envelope_sender, [row.address], raw, prefix=header)
        except RelayError as exc:
            return Outcome(row.id, "failed", row.mailbox_id, str(exc)[:1000], refused=True)
        return Outcome(row.id, "done", row.mailbox_id)

    def close(self) -> None:
        """Stop the threads; each closes its relay connection."""
        for _thread in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            thread.join()


def release_chunk(
    session: Session,
    senders: Senders,
    ids: Sequence[int],
    actor: audit.Actor,
    prepared: quarantine.Prepared,
    *,
    stop: Callable[[], bool] | None = None,
    seconds: float = SECONDS,
) -> list[Outcome]:
    """Release the held messages among ``ids`` in the caller's transaction, in id order.

    Returns an outcome for each id handled: every one, unless ``seconds`` ran out or
    ``stop()`` said so, when the caller commits and goes on with the rest. A message
    the relay refused keeps its error and stays ``new``. ``prepared`` keeps the
    classifier's tokens of the content read last.
    """
    rows = session.execute(
        select(
            Message.id,
            Message.mailbox_id,
            Message.status,
            Message.raw_sha256,
            Message.envelope_sender,
            Message.subject,
            Mailbox.address,
        )
        .join(Mailbox, Mailbox.id == Message.mailbox_id)
        .where(Message.id.in_(list(ids)))
        .order_by(Message.id)
        .with_for_update(of=_MESSAGES)
    )
    found = {row.id: row for row in rows}
    if found and session.get_bind().dialect.name == "postgresql":
        session.execute(_LOCK_VERSIONS, {"ids": sorted({r.mailbox_id for r in found.values()})})
    sent = senders.send_all(
        [found[message_id] for message_id in ids if message_id in found],
        actor,
        deadline=time.monotonic() + seconds,
        stop=stop,
    )
    # Ids no longer there (deleted for good) come first: they need no relay.
    gone = [Outcome(message_id, "skipped") for message_id in ids if message_id not in found]
    tokens: dict[str, str] = {}  # the classifier's tokens by content, joined once
    for outcome in sent:
        sha = found[outcome.message_id].raw_sha256
        if outcome.outcome == "done" and sha not in tokens:
            try:
                tokens[sha] = "\n".join(prepared.tokens(sha, prepared.raw(senders.store, sha)))
            except StoreError:  # gone since it was sent: the learning job reads it or skips it
                tokens[sha] = ""
    _record(session, actor, found, sent, tokens)
    return gone + sent


def _record(
    session: Session,
    actor: audit.Actor,
    found: dict[int, Row[Any]],
    outcomes: list[Outcome],
    tokens: dict[str, str],
) -> None:
    """Write a chunk's outcomes: a few multi-row statements, whatever its size."""
    done = [o for o in outcomes if o.outcome == "done"]
    refused = [o for o in outcomes if o.refused]
    if done:
        # One statement for the chunk: released_at is when the chunk is marked, within
        # SECONDS of each message's own X-Cleanmail-Released time.
        session.execute(_RELEASED, {"b_ids": [o.message_id for o in done], "b_at": utcnow()})
        counts = Counter(stats.address_domain(found[o.message_id].address) for o in done)
        stats.add(session, {(stats.today(), domain, "released"): n for domain, n in counts.items()})
        audit.record_many(
            session,
            actor,
            "message.release",
            (
                (o.mailbox_id, o.message_id, {"subject": found[o.message_id].subject[:200]})
                for o in done
            ),
        )
        # A release says the message was wanted: the classifier learns it as ham.
        learning.record_many(
            session,
            Label.HAM,
            actor,
            "release",
            (
                (o.message_id, o.mailbox_id, sha, tokens[sha])
                for o in done
                for sha in (found[o.message_id].raw_sha256,)
            ),
        )
    if refused:
        session.execute(_REFUSED, [{"b_id": o.message_id, "b_error": o.error} for o in refused])
        audit.record_many(
            session,
            actor,
            "message.release_failed",
            ((o.mailbox_id, o.message_id, {"error": o.error}) for o in refused),
        )


def log_outcomes(outcomes: Sequence[Outcome], actor: audit.Actor) -> None:
    """Log each release and refusal of a chunk, once its transaction committed."""
    who = f"{actor.type}:{actor.name}"
    for o in outcomes:
        if o.outcome == "done":
            logs.event(
                log, "message.release", message_id=o.message_id, mailbox_id=o.mailbox_id, actor=who
            )
        elif o.refused:
            logs.event(
                log,
                "message.release_failed",
                level=logging.WARNING,
                message_id=o.message_id,
                mailbox_id=o.mailbox_id,
                actor=who,
                error=o.error,
            )
