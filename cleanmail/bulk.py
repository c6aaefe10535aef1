"""Bulk release and delete: a job row worked through in the background, with progress.

Why a table and not a request: releasing ten thousand messages takes longer than any
page should, and the operator must be able to leave and come back. ``create`` records
the job (what, for whom, within which domains) in the request's transaction; the web
process then starts ``run`` in a thread at once, and the scheduler's ``resume``
takes over any job whose runner died (a restarted web worker): a job is claimed with
a worker id and a heartbeat. The keyset cursor (``last_id``) moves after each batch
of ids, so a resumed job goes over at most one batch again, where a message already
released or deleted is no longer matched.

A release works in chunks (``releases.release_chunk``): up to ``releases.CHUNK``
messages locked, relayed and marked released in one transaction that also counts
them on the job, so the progress page is exact. A crash between the relay's 250 and
that commit sends the chunk's messages again when the job resumes (at least once,
see ``releases``); a refused message keeps its error and stays retryable. A chunk's
messages go out over ``releases.CONNECTIONS`` relay connections at once, because the
relay's round trips, not the database, set the pace. A delete is one transaction per
message; on PostgreSQL a batch of them is shared by ``PARALLEL`` threads.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from cleanmail import audit, db, quarantine, releases, search
from cleanmail.models import BulkJob, BulkStatus, Message, Status, utcnow
from cleanmail.relay import Relay
from cleanmail.staff import Access, access_from_json
from cleanmail.store import Store

log = logging.getLogger(__name__)

ACTIONS = ("release", "delete")
BATCH = 200  # ids per batch; the cursor moves after each
PARALLEL = 4  # threads of a delete on PostgreSQL (a release: releases.CONNECTIONS)
# A runner that has not moved its job for this long is taken to be dead. Longer than a
# relay timeout, so that a slow mail server does not make two runners share a job.
STALE = timedelta(minutes=5)
PENDING_GRACE = timedelta(seconds=30)  # the web's own thread starts a job well within this


class BulkError(ValueError):
    """A bulk job that cannot be made or changed; the message says why."""


def create(
    session: Session, access: Access, actor: audit.Actor, action: str, query: search.Query
) -> BulkJob:
    """Record a bulk job over everything the query matches (within ``access``)."""
    if action not in ACTIONS:
        raise BulkError(f"unknown bulk action {action!r}")
    total = search.count(session, access, target(action, query))
    job = BulkJob(
        action=action,
        criteria=query.to_json(),
        domain_ids=access.to_json(),
        staff_id=access.staff_id,
        actor_type=actor.type,
        actor=actor.name,
        remote_addr=actor.remote_addr,
        status=BulkStatus.PENDING,
        total=total,
        done=0,
        failed=0,
        skipped=0,
        last_id=0,
    )
    session.add(job)
    session.flush()
    audit.record(session, actor, f"bulk.{action}", job_id=job.id, total=total, **_summary(query))
    return job


def _summary(query: search.Query) -> dict[str, object]:
    """The non-empty fields of a query, for the audit log (a selection as its size)."""
    values = {k: v for k, v in query.to_json().items() if v not in (None, "", [], ())}
    if "ids" in values:
        values["ids"] = len(query.ids)
    return values


def target(action: str, query: search.Query) -> search.Query:
    """The query narrowed to the messages the action can still change."""
    allowed = (Status.NEW,) if action == "release" else (Status.NEW, Status.RELEASED)
    statuses = tuple(s for s in (query.statuses or allowed) if s in allowed) or ("none",)
    return search.Query(**{**query.__dict__, "statuses": statuses})


def get(session: Session, access: Access, job_id: int) -> BulkJob:
    """A job the member of staff may see: their own, or any for an operator."""
    job = session.get(BulkJob, job_id)
    if job is None or not (access.operator or job.staff_id == access.staff_id):
        raise BulkError(f"no bulk job {job_id}")
    return job


def recent(session: Session, access: Access, limit: int = 20) -> list[BulkJob]:
    """The newest jobs this member may see."""
    query = select(BulkJob).order_by(BulkJob.id.desc()).limit(limit)
    if not access.operator:
        query = query.where(BulkJob.staff_id == access.staff_id)
    return list(session.scalars(query))


def cancel(session: Session, access: Access, actor: audit.Actor, job_id: int) -> BulkJob:
    """Stop a job after the message in hand; what was done stays done."""
    job = get(session, access, job_id)
    if job.status in (BulkStatus.PENDING, BulkStatus.RUNNING):
        job.status = BulkStatus.CANCELLED
        job.finished_at = utcnow()
        audit.record(session, actor, "bulk.cancel", job_id=job.id, done=job.done)
    return job


def _claim(database: db.Database, job_id: int, worker: str, now: datetime) -> bool:
    """Take a pending job, or a running one whose runner has gone quiet."""
    with database.session_scope(write=True) as session:
        claimed = session.execute(
            update(BulkJob)
            .where(
                BulkJob.id == job_id,
                or_(
                    BulkJob.status == BulkStatus.PENDING,
                    (BulkJob.status == BulkStatus.RUNNING) & (BulkJob.heartbeat_at < now - STALE),
                ),
            )
            .values(status=BulkStatus.RUNNING, worker=worker, heartbeat_at=now)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return False
        job = session.get(BulkJob, job_id)
        assert job is not None
        job.started_at = job.started_at or now
        return True


def run(
    database: db.Database,
    store: Store,
    relay: Relay,
    job_id: int,
    *,
    progress: Callable[[str], None] | None = None,
) -> bool:
    """Work a job through to its end; False when another runner has it (or it is over).

    ``progress`` is called with each message's outcome ("done", "failed", "skipped")
    once it is committed, from the job's threads (for a command's progress bar).
    """
    worker = uuid.uuid4().hex
    if not _claim(database, job_id, worker, utcnow()):
        return False
    with database.session_scope() as session:
        job = session.get(BulkJob, job_id)
        assert job is not None
        access = access_from_json(job.actor_type, job.staff_id, job.domain_ids)
        query = target(job.action, search.Query.from_json(job.criteria))
        actor = audit.Actor(job.actor_type, job.actor, job.remote_addr)
        runner = _Runner(database, store, relay, job_id, worker, job.action, actor, progress)
        last_id = job.last_id
    try:
        while not runner.stop.is_set():
            with database.session_scope() as session:
                batch = next(
                    search.batches(session, access, query, after_id=last_id, size=BATCH), []
                )
            if not batch:
                _finish(database, job_id, worker)
                return True
            runner.work(batch)
            last_id = batch[-1]
            runner.advance(last_id)
        return True
    except Exception:
        log.exception("bulk job %d stopped; the scheduler resumes it", job_id)
        raise
    finally:
        runner.close()


@dataclass
class _Runner:
    """One claim of a job: handles batches of ids, in parallel where the database allows."""

    database: db.Database
    store: Store
    relay: Relay
    job_id: int
    worker: str
    action: str
    actor: audit.Actor
    progress: Callable[[str], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    _senders: releases.Senders | None = None
    _prepared: quarantine.Prepared = field(default_factory=quarantine.Prepared)

    @property
    def threads(self) -> int:
        """How many threads share a batch: several on PostgreSQL, one on SQLite."""
        return PARALLEL if self.database.engine.dialect.name == "postgresql" else 1

    def work(self, ids: list[int]) -> None:
        """Handle a batch: a release chunk by chunk (its relay threads send each chunk); a
        delete on PostgreSQL in several threads, each with its own connections."""
        if self.action == "release":
            self._release(ids)
            return
        count = min(self.threads, len(ids))
        if count <= 1:
            self._work(ids)
            return
        errors: list[BaseException] = []

        def target(part: list[int]) -> None:
            try:
                self._work(part)
            except BaseException as exc:  # handed to the caller below
                errors.append(exc)
                self.stop.set()

        threads = [
            threading.Thread(target=target, args=(ids[i::count],), name=f"bulk-{self.job_id}-{i}")
            for i in range(count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _work(self, ids: list[int]) -> None:
        with self.database.write_sessions() as session:
            for message_id in ids:
                if self.stop.is_set():
                    return
                self._one(session, message_id)

    def _release(self, ids: list[int]) -> None:
        """Release in chunks, each one transaction (see ``releases``), counted on the job."""
        if self._senders is None:
            self._senders = releases.Senders(self.store, self.relay)
        while ids and not self.stop.is_set():
            with self.database.write_sessions() as session:
                try:
                    outcomes = releases.release_chunk(
                        session,
                        self._senders,
                        ids[: releases.CHUNK],
                        self.actor,
                        self._prepared,
                        stop=self.stop.is_set,
                    )
                    counted = session.execute(self._mine().values(**_counts(outcomes)))
                    session.commit()  # what was sent, even when the job was cancelled meanwhile
                except BaseException:
                    session.rollback()
                    raise
            releases.log_outcomes(outcomes, self.actor)
            if self.progress is not None:
                for outcome in outcomes:
                    self.progress(outcome.outcome)
            if counted.rowcount != 1:  # type: ignore[attr-defined]
                self.stop.set()  # cancelled, or taken over by another runner
            handled = {outcome.message_id for outcome in outcomes}
            ids = [message_id for message_id in ids if message_id not in handled]

    def close(self) -> None:
        """Stop the release's relay threads (each closes its connection)."""
        if self._senders is not None:
            self._senders.close()
            self._senders = None

    def _one(self, session: Session, message_id: int) -> None:
        """Delete one message and count it, in one transaction."""
        try:
            outcome = "skipped"
            message = session.get(Message, message_id, with_for_update=True)
            if message is not None and message.status in (Status.NEW, Status.RELEASED):
                quarantine.delete(session, self.store, message, self.actor)
                outcome = "done"
            column = getattr(BulkJob, outcome)
            counted = session.execute(
                self._mine().values(**{outcome: column + 1}, heartbeat_at=utcnow())
            )
            session.commit()  # the message's fate, even when the job was cancelled meanwhile
        except BaseException:
            session.rollback()
            raise
        if self.progress is not None:
            self.progress(outcome)
        if counted.rowcount != 1:  # type: ignore[attr-defined]
            self.stop.set()  # cancelled, or taken over by another runner

    def advance(self, last_id: int) -> None:
        """Move the job's cursor past a finished batch."""
        with self.database.session_scope(write=True) as session:
            moved = session.execute(self._mine().values(last_id=last_id, heartbeat_at=utcnow()))
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                self.stop.set()

    def _mine(self) -> Any:
        return update(BulkJob).where(
            BulkJob.id == self.job_id,
            BulkJob.worker == self.worker,
            BulkJob.status == BulkStatus.RUNNING,
        )


def _counts(outcomes: list[releases.Outcome]) -> dict[str, Any]:
    """The job's counters and last error moved by a chunk's outcomes."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    for name, n in Counter(outcome.outcome for outcome in outcomes).items():
        values[name] = getattr(BulkJob, name) + n
    errors = [outcome.error for outcome in outcomes if outcome.error is not None]
    if errors:
        values["last_error"] = errors[-1]
    return values


def _finish(database: db.Database, job_id: int, worker: str) -> None:
    with database.session_scope(write=True) as session:
        job = session.get(BulkJob, job_id, with_for_update=True)
        if job is None or job.worker != worker or job.status != BulkStatus.RUNNING:
            return
        job.status, job.finished_at = BulkStatus.DONE, utcnow()
        actor = audit.Actor(job.actor_type, job.actor, job.remote_addr)
        audit.record(
            session,
            actor,
            "bulk.finish",
            job_id=job.id,
            done=job.done,
            failed=job.failed,
            skipped=job.skipped,
        )


def start(database: db.Database, store: Store, relay: Relay, job_id: int) -> threading.Thread:
    """Run a job in a background thread of this process (after its row is committed)."""
    # A relay of its own: connections are per thread, and this thread closes its one.
    own = Relay(relay.endpoint, timeout=relay.timeout, hostname=relay.hostname)
    thread = threading.Thread(
        target=_run_logged, args=(database, store, own, job_id), name=f"bulk-{job_id}", daemon=True
    )
    thread.start()
    return thread


def _run_logged(database: db.Database, store: Store, relay: Relay, job_id: int) -> None:
    try:
        run(database, store, relay, job_id)
    except Exception:  # logged by run(); the scheduler resumes the job
        return


def resume(database: db.Database, store: Store, relay: Relay, now: datetime | None = None) -> int:
    """Run the jobs nobody is working on (their web worker died); how many were run."""
    now = now or utcnow()
    with database.session_scope() as session:
        orphans = list(
            session.scalars(
                select(BulkJob.id).where(
                    or_(
                        (BulkJob.status == BulkStatus.PENDING)
                        & (BulkJob.created_at < now - PENDING_GRACE),
                        (BulkJob.status == BulkStatus.RUNNING)
                        & (BulkJob.heartbeat_at < now - STALE),
                    )
                )
            )
        )
    return sum(1 for job_id in orphans if run(database, store, relay, job_id))
