"""Group commit of quarantine writes, on both databases: batched, isolated, all-or-nothing."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from cleanmail import audit, mailboxes, mime, quarantine
from cleanmail.filter.committer import Committer, _Work
from cleanmail.models import Message
from cleanmail.store import digest
from tests.messages import GTUBE, message

ACTOR = audit.Actor("operator", "test")
THREADS = 12


@pytest.fixture
def ola(database):
    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, ACTOR, "example.no")
        return mailboxes.add_mailbox(session, ACTOR, "ola@example.no").id


@pytest.fixture
def dialect(database):
    """The database's SQLAlchemy dialect, which the driver-level hold compiles for."""
    return database.engine.dialect


def holding(store, raw, mailbox_id, dialect):
    """The filter's work for one message: hold it for one mailbox."""

    def work(connection):
        return quarantine.hold_on_driver(
            connection,
            dialect,
            store,
            raw,
            mime.parse(raw),
            quarantine.Origin("spammer@example.com"),
            [quarantine.Hold(mailbox_id, 9.0, [{"code": "T", "text": "t", "score": 9}])],
            retention_days=30,
        )

    return work


def waiting_for(committer, count, work):
    """Work that first waits until ``count`` other threads have queued behind it."""

    def run(connection):
        deadline = time.monotonic() + 10
        while committer.queued < count:
            assert time.monotonic() < deadline, "the other threads never queued"
            time.sleep(0.005)
        return work(connection)

    return run


def run_together(committer, works):
    """Run the first work, then the rest from other threads while it holds the transaction."""
    with ThreadPoolExecutor(len(works)) as pool:
        first = pool.submit(committer.run, waiting_for(committer, len(works) - 1, works[0]))
        while not committer.batches:  # until the first thread runs its batch of one
            time.sleep(0.001)
        rest = [pool.submit(committer.run, work) for work in works[1:]]
        return [f.exception() or f.result() for f in [first, *rest]]


def stored(database):
    with database.session_scope() as session:
        return list(session.execute(select(Message.mailbox_id, Message.raw_sha256)))


def test_concurrent_holds_share_one_commit_and_are_stored_once(database, store, ola, dialect):
    committer = Committer(database)
    raws = [message(subject=f"offer {n}", body=f"{GTUBE}\n") for n in range(THREADS)]
    for raw in raws:
        store.ensure(digest(raw), raw)
    outcomes = run_together(committer, [holding(store, raw, ola, dialect) for raw in raws])
    assert all(isinstance(ids, list) and len(ids) == 1 for ids in outcomes), outcomes
    assert len({ids[0] for ids in outcomes}) == THREADS
    assert sorted(stored(database)) == sorted((ola, digest(raw)) for raw in raws)
    # The first message alone, then everything that queued meanwhile in one transaction.
    assert committer.batches == 2
    assert all(store.read(digest(raw)) == raw for raw in raws)


def test_holding_again_in_a_batch_does_not_double(database, store, ola, dialect):
    committer = Committer(database)
    raw = message(body=f"{GTUBE}\n")
    outcomes = run_together(committer, [holding(store, raw, ola, dialect) for _ in range(4)])
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    assert stored(database) == [(ola, digest(raw))]


def test_a_failing_message_fails_alone(database, store, ola, dialect):
    committer = Committer(database)
    good = [message(subject=f"offer {n}") for n in range(3)]
    bad = message(subject="for nobody")
    # No mailbox 999999: the foreign key refuses that one row.
    works = [holding(store, good[0], ola, dialect), holding(store, bad, 999999, dialect)]
    works += [holding(store, raw, ola, dialect) for raw in good[1:]]
    outcomes = run_together(committer, works)
    assert isinstance(outcomes[1], SQLAlchemyError)
    assert [len(o) for i, o in enumerate(outcomes) if i != 1] == [1, 1, 1]
    assert sorted(stored(database)) == sorted((ola, digest(raw)) for raw in good)


def breaking(database):
    """Work that makes the batch's transaction fail for real (at commit, or with its link)."""

    def work(connection):
        cursor = connection.cursor()
        if database.engine.dialect.name == "sqlite":
            # Foreign keys checked only at COMMIT, which then fails.
            cursor.execute("PRAGMA defer_foreign_keys = ON")
            cursor.execute(
                "INSERT INTO messages (mailbox_id, size, score, reasons, status, received_at,"
                " expires_at, release_attempts, envelope_sender, from_header, from_address,"
                " sender_domain, subject, message_id_header)"
                " VALUES (999999, 1, 0, '[]', 'new', '2026-01-01', '2026-01-01', 0,"
                " '', '', '', '', '', '')"
            )
        else:
            # The server ends this session's connection, as when the database goes down.
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return []

    return work


def test_a_failed_transaction_fails_every_message_of_its_batch(database, store, ola, dialect):
    committer = Committer(database)
    raws = [message(subject=f"offer {n}") for n in range(5)]
    works = [
        holding(store, raws[0], ola, dialect),
        *(holding(store, r, ola, dialect) for r in raws[1:3]),
    ]
    works += [breaking(database), *(holding(store, r, ola, dialect) for r in raws[3:])]
    # The first message commits alone; the other five share a transaction that fails.
    outcomes = run_together(committer, works)
    assert isinstance(outcomes[0], list) and len(outcomes[0]) == 1
    assert all(isinstance(o, SQLAlchemyError) for o in outcomes[1:]), outcomes
    assert stored(database) == [(ola, digest(raws[0]))]
    database.engine.dispose()  # the terminated connection must not serve the next one
    assert committer.run(holding(store, raws[4], ola, dialect))  # and the next batch works again
    assert len(stored(database)) == 2


def test_many_threads_without_coordination_all_commit(database, store, ola, dialect):
    committer = Committer(database)
    raws = [message(subject=f"offer {n}", body=f"{GTUBE}\n") for n in range(40)]
    start = threading.Barrier(8)

    def hold_some(chunk):
        start.wait()
        return [committer.run(holding(store, raw, ola, dialect), key=digest(raw)) for raw in chunk]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(hold_some, [raws[i::8] for i in range(8)]))
    assert sum(len(r) for r in results) == 40
    with database.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 40
    assert committer.batches <= 40


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_message_that_loses_a_deadlock_runs_again_alone(database, store, ola, dialect):
    # Two filter processes (two committers), each with a batch of two messages for the
    # same two mailboxes in opposite order: each batch's second message waits for the
    # other's first mailbox. PostgreSQL fails one of them; it must still be stored.
    with database.session_scope(write=True) as session:
        kari = mailboxes.add_mailbox(session, ACTOR, "kari@example.no").id
    meet = threading.Barrier(2, timeout=10)
    raws = [message(subject=f"offer {n}") for n in range(4)]

    def then_meet(work):
        def run(connection):
            result = work(connection)
            meet.wait()  # both batches hold their first mailbox now
            return result

        return run

    first = [
        _Work(then_meet(holding(store, raws[0], ola, dialect)), "1"),
        _Work(holding(store, raws[1], kari, dialect), "2"),
    ]
    second = [
        _Work(then_meet(holding(store, raws[2], kari, dialect)), "1"),
        _Work(holding(store, raws[3], ola, dialect), "2"),
    ]
    committers = [Committer(database), Committer(database)]
    with ThreadPoolExecutor(2) as pool:
        for done in [
            pool.submit(c._commit, b) for c, b in zip(committers, [first, second], strict=True)
        ]:
            done.result()
    assert [item.error for item in first + second] == [None] * 4
    assert sorted(stored(database)) == sorted(
        [
            (ola, digest(raws[0])),
            (kari, digest(raws[1])),
            (kari, digest(raws[2])),
            (ola, digest(raws[3])),
        ]
    )
    assert sum(c.batches for c in committers) == 3  # the loser ran once more, alone
