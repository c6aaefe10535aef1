"""Bulk release in chunks: a crash mid-chunk, and a refusal of one message in a chunk."""

from __future__ import annotations

import collections
import email
import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta

from sqlalchemy import func, select

from cleanmail import audit, bulk, mailboxes, mime, quarantine, releases, search, staff
from cleanmail.config import Endpoint
from cleanmail.models import (
    AuditEvent,
    BulkJob,
    BulkStatus,
    LearningEvent,
    Message,
    Status,
)
from cleanmail.relay import Relay
from tests.conftest import FilterProcess
from tests.messages import message

SENDER = "billing@supplier.no"
ACTOR = audit.Actor("operator", "test")


def _hold(database, store, count: int) -> list[int]:
    """Hold ``count`` different invoices from SENDER for three mailboxes; their ids."""
    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, ACTOR, "example.no")
        boxes = [
            mailboxes.add_mailbox(session, ACTOR, f"{name}@example.no").id
            for name in ("ola", "per", "kari")
        ]
        ids = []
        for n in range(count):
            raw = message(subject=f"Invoice {n}", sender=SENDER, body=f"Invoice number {n}\n")
            ids += quarantine.hold(
                session,
                store,
                raw,
                mime.parse(raw),
                quarantine.Origin(SENDER),
                [quarantine.Hold(boxes[n % 3], 6.0)],
                retention_days=30,
            )
    return ids


def _release_ids(messages) -> collections.Counter[int]:
    """How often each quarantined message was received, by its X-Cleanmail-Release-ID."""
    seen: collections.Counter[int] = collections.Counter()
    for received in messages:
        header = email.message_from_bytes(received.data)["X-Cleanmail-Release-ID"]
        seen[int(header.strip("<>").split(".")[0])] += 1
    return seen


def stall_sink_at(smtp_sink, count, seconds):
    """Make the sink hold its ``count``-th message (up to ``seconds``) until ``unstall``.

    Returns (stall, unstall): ``stall`` is set once that message is in.
    """
    arrived, stall, unstall = [0], threading.Event(), threading.Event()

    def gate(_received):
        arrived[0] += 1
        if arrived[0] == count:
            stall.set()
            unstall.wait(seconds)

    smtp_sink.on_message = gate
    return stall, unstall


def test_a_job_killed_mid_chunk_resumes_and_releases_everything(database, store, config, smtp_sink):
    ids = _hold(database, store, 260)
    # The sink stalls on the 150th message: the job is then in the middle of a chunk,
    # with messages relayed (250) but not yet marked released.
    stall, unstall = stall_sink_at(smtp_sink, 150, 60)
    command = [sys.executable, "-m", "cleanmail", "release", "--sender", SENDER, "--yes"]
    process = subprocess.Popen(
        command,
        env=FilterProcess(config).environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert stall.wait(60), "the job never reached the sink's 150th message"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
    finally:
        unstall.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    smtp_sink.on_message = None
    smtp_sink.wait_for(150)  # the one in flight is taken once the sink goes on
    with database.sessions() as session:
        (job,) = session.scalars(select(BulkJob)).all()
        assert job.status == BulkStatus.RUNNING
        marked = session.scalar(select(func.count()).where(Message.status == Status.RELEASED))
    assert marked < 150  # relayed, not marked: the crash window

    # The scheduler's resume, once the dead runner's heartbeat is older than STALE.
    with database.session_scope(write=True) as session:
        session.get(BulkJob, job.id).heartbeat_at -= bulk.STALE + timedelta(seconds=1)
    relay = Relay(Endpoint(config.relay.host, config.relay.port), timeout=10)
    assert bulk.resume(database, store, relay) == 1

    with database.sessions() as session:
        job = session.get(BulkJob, job.id)
        assert (job.status, job.done, job.failed) == (BulkStatus.DONE, 260, 0)
        statuses = session.execute(select(Message.id, Message.status)).all()
        assert sorted(tuple(row) for row in statuses) == [(i, "released") for i in sorted(ids)]
        # The rolled-back chunk left no records: one release and one lesson per message.
        audited = session.scalars(
            select(AuditEvent.message_id).where(AuditEvent.action == "message.release")
        ).all()
        assert sorted(audited) == sorted(ids)
        learned = session.scalars(select(LearningEvent.message_id)).all()
        assert sorted(learned) == sorted(ids)
    received = smtp_sink.messages
    seen = _release_ids(received)
    assert set(seen) == set(ids)  # every message delivered at least once
    again = [message_id for message_id, n in seen.items() if n > 1]
    assert set(seen.values()) <= {1, 2}
    # At least the message in flight at the kill went out twice; at most its chunk.
    assert 1 <= len(again) <= releases.CHUNK
    assert len(again) == len(received) - len(ids)


def test_a_refused_message_stays_retryable_and_its_chunk_goes_on(
    database, store, config, smtp_sink
):
    ids = _hold(database, store, 7)

    def refuse_one(received):
        if b"Subject: Invoice 3\r\n" in received.data:
            raise RuntimeError("mailbox busy")

    smtp_sink.on_message = refuse_one
    with database.session_scope(write=True) as session:
        job_id = bulk.create(
            session, staff.OPERATOR, ACTOR, "release", search.Query(sender=SENDER)
        ).id
    relay = Relay(Endpoint(config.relay.host, config.relay.port), timeout=10)
    outcomes: list[str] = []
    assert bulk.run(database, store, relay, job_id, progress=outcomes.append)
    assert sorted(outcomes) == ["done"] * 6 + ["failed"]
    refused = ids[3]
    with database.sessions() as session:
        job = session.get(BulkJob, job_id)
        assert (job.status, job.done, job.failed) == (BulkStatus.DONE, 6, 1)
        assert "451" in job.last_error and "mailbox busy" in job.last_error
        held = session.get(Message, refused)
        assert held.status == Status.NEW and "mailbox busy" in held.release_error
        assert held.release_attempts == 1
        failed = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "message.release_failed")
        ).all()
        assert [(e.message_id, e.actor) for e in failed] == [(refused, "test")]
        released = session.scalars(select(Message.id).where(Message.status == Status.RELEASED))
        assert sorted(released) == sorted(set(ids) - {refused})
    assert sorted(_release_ids(smtp_sink.messages)) == sorted(set(ids) - {refused})

    # Retried (the console's "release again"): delivered, the error gone.
    smtp_sink.on_message = None
    with database.session_scope(write=True) as session:
        held = session.get(Message, refused)
        assert quarantine.release(session, store, relay, held, ACTOR)
    with database.sessions() as session:
        held = session.get(Message, refused)
        assert (held.status, held.release_error, held.release_attempts) == (
            Status.RELEASED,
            None,
            2,
        )
    assert _release_ids(smtp_sink.messages)[refused] == 1


def test_a_release_during_a_chunk_waits_for_it_and_delivers_once(
    database, store, config, smtp_sink
):
    ids = _hold(database, store, 10)
    stall, unstall = stall_sink_at(smtp_sink, 5, 30)
    with database.session_scope(write=True) as session:
        job_id = bulk.create(
            session, staff.OPERATOR, ACTOR, "release", search.Query(sender=SENDER)
        ).id
    relay = Relay(Endpoint(config.relay.host, config.relay.port), timeout=30)
    job = threading.Thread(target=bulk.run, args=(database, store, relay, job_id))
    job.start()
    owner: list[bool] = []

    def release_by_owner():
        with database.session_scope(write=True) as session:
            held = session.get(Message, ids[0])
            owner.append(quarantine.release(session, store, relay, held, ACTOR))

    try:
        assert stall.wait(30)  # the chunk has relayed ids[0] but not committed
        clicked = threading.Thread(target=release_by_owner)
        clicked.start()
        clicked.join(1.0)
        assert clicked.is_alive()  # waits for the chunk's lock
    finally:
        unstall.set()
    clicked.join(30)
    job.join(60)
    assert owner == [False]  # found released: not sent again
    assert _release_ids(smtp_sink.messages) == {message_id: 1 for message_id in ids}
