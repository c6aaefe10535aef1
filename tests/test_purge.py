"""Purging on both databases: expiry frees files with their last row; old orphan files go."""

import os
from datetime import timedelta

from click.testing import CliRunner
from sqlalchemy import func, select, update

from cleanmail import purge
from cleanmail.cli import cli, scheduler  # noqa: F401 - registers the commands
from cleanmail.models import AuditEvent, Message, RawMessage, Status, utcnow
from cleanmail.store import digest
from tests.conftest import FilterProcess
from tests.messages import message
from tests.test_quarantine import hold, setup_mailboxes


def age(store, sha, hours):
    """Make a stored file look ``hours`` old."""
    when = (utcnow() - timedelta(hours=hours)).timestamp()
    os.utime(store.path(sha), (when, when))


def set_expiry(database, ids, when):
    with database.session_scope(write=True) as session:
        session.execute(update(Message).where(Message.id.in_(ids)).values(expires_at=when))


def statuses(database):
    with database.session_scope() as session:
        return {m.id: m.status for m in session.scalars(select(Message))}


def test_expiry_frees_a_file_with_its_last_reference(database, store):
    ola, kari = setup_mailboxes(database, "ola@example.no", "kari@example.no")
    shared = message(subject="Shared")
    alone = message(subject="Alone")
    ola_shared, kari_shared = hold(database, store, shared, [ola, kari])
    (ola_alone,) = hold(database, store, alone, [ola])
    now = utcnow()
    set_expiry(database, [ola_shared, ola_alone], now - timedelta(minutes=1))
    set_expiry(database, [kari_shared], now + timedelta(days=1))

    result = purge.run(database, store, now)

    assert (result.expired, result.orphans) == (2, 0)
    assert statuses(database) == {
        ola_shared: Status.EXPIRED,
        kari_shared: Status.NEW,
        ola_alone: Status.EXPIRED,
    }
    assert store.exists(digest(shared)) and not store.exists(digest(alone))
    with database.session_scope() as session:
        assert set(session.scalars(select(RawMessage.sha256))) == {digest(shared)}
        expired = session.scalar(select(func.count()).where(AuditEvent.action == "message.expire"))
        assert expired == 2
    # A day later the shared file goes with its last row.
    assert purge.run(database, store, now + timedelta(days=2)).expired == 1
    assert not store.exists(digest(shared))
    assert purge.run(database, store, now + timedelta(days=2)).expired == 0


def test_released_messages_expire_and_batches_commit(database, store):
    (ola,) = setup_mailboxes(database, "ola@example.no")
    ids = [hold(database, store, message(subject=f"m{n}"), [ola])[0] for n in range(5)]
    with database.session_scope(write=True) as session:
        session.execute(update(Message).where(Message.id == ids[0]).values(status=Status.RELEASED))
        session.execute(update(Message).where(Message.id == ids[1]).values(status=Status.DELETED))
    later = utcnow() + timedelta(days=31)
    assert purge.expired(database, store, later, batch=2) == 4
    result = statuses(database)
    assert result.pop(ids[1]) == Status.DELETED
    assert set(result.values()) == {Status.EXPIRED}


def test_orphan_files_older_than_the_grace_go(database, store):
    (ola,) = setup_mailboxes(database, "ola@example.no")
    kept = message(subject="Kept")
    hold(database, store, kept, [ola])
    old, fresh = message(subject="Old orphan"), message(subject="Fresh orphan")
    for raw in (old, fresh):
        store.write(digest(raw), raw)
    age(store, digest(old), 2)
    age(store, digest(kept), 2)

    with database.session_scope() as session:
        found = list(purge.find_orphans(session, store, utcnow() - purge.ORPHAN_GRACE))
    assert found == [digest(old)]
    result = purge.run(database, store, utcnow())
    assert (result.expired, result.orphans) == (0, 1)
    assert not store.exists(digest(old))
    assert store.exists(digest(fresh)) and store.exists(digest(kept))
    with database.session_scope() as session:
        assert set(session.scalars(select(RawMessage.sha256))) == {digest(kept)}


def test_a_claimed_orphan_rolled_back_stays(database, store):
    orphan = message(subject="Orphan")
    store.write(digest(orphan), orphan)
    age(store, digest(orphan), 2)
    session = database.write_sessions()
    try:
        assert purge.orphan_files(session, store, utcnow() - purge.ORPHAN_GRACE) == 1
        assert not store.exists(digest(orphan))
        session.rollback()
    finally:
        session.close()
    assert store.exists(digest(orphan))


def test_dry_run_changes_nothing(database, store, config):
    (ola,) = setup_mailboxes(database, "ola@example.no")
    (held,) = hold(database, store, message(subject="Due"), [ola])
    set_expiry(database, [held], utcnow() - timedelta(minutes=1))
    orphan = message(subject="Orphan")
    store.write(digest(orphan), orphan)
    age(store, digest(orphan), 2)
    env = FilterProcess(config).environment()

    dry = CliRunner().invoke(cli, ["purge", "--dry-run"], env=env, catch_exceptions=False)
    assert dry.exit_code == 0, dry.output
    assert dry.output == "would expire 1 messages; would delete 1 unreferenced files\n"
    assert statuses(database) == {held: Status.NEW}
    assert store.exists(digest(orphan))

    done = CliRunner().invoke(cli, ["purge"], env=env, catch_exceptions=False)
    assert done.output == "expired 1 messages; deleted 1 unreferenced files\n"
    assert statuses(database) == {held: Status.EXPIRED}
    assert not store.exists(digest(orphan))
