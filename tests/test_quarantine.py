"""Quarantine operations on both databases: hold once, share a file, remove it with the last row."""

from sqlalchemy import func, select

from cleanmail import audit, mailboxes, mime, quarantine
from cleanmail.models import AuditEvent, Message, RawMessage, Status
from cleanmail.store import digest
from tests.messages import message

ACTOR = audit.Actor("operator", "test")


def setup_mailboxes(database, *addresses):
    with database.session_scope(write=True) as session:
        domain = mailboxes.add_domain(session, ACTOR, "example.no")
        return [mailboxes.add_mailbox(session, ACTOR, a).id for a in addresses] or [domain.id]


def hold(database, store, raw, mailbox_ids):
    with database.session_scope(write=True) as session:
        holds = [
            quarantine.Hold(i, 9.0, [{"code": "T", "text": "t", "score": 9}]) for i in mailbox_ids
        ]
        return quarantine.hold(
            session,
            store,
            raw,
            mime.parse(raw),
            quarantine.Origin("spammer@example.com"),
            holds,
            retention_days=30,
        )


def test_one_file_for_many_recipients_removed_with_the_last(database, store):
    ola, kari = setup_mailboxes(database, "ola@example.no", "kari@example.no")
    raw = message(subject="Cheap watches")
    ids = hold(database, store, raw, [ola, kari])
    assert len(ids) == 2
    sha = digest(raw)
    assert store.read(sha) == raw
    with database.session_scope(write=True) as session:
        quarantine.delete(session, store, quarantine.get(session, ids[0]), ACTOR)
    assert store.exists(sha)
    with database.session_scope(write=True) as session:
        quarantine.delete(session, store, quarantine.get(session, ids[1]), ACTOR)
        assert session.scalar(select(func.count()).select_from(RawMessage)) == 0
    assert not store.exists(sha)
    with database.session_scope() as session:
        statuses = {m.status for m in session.scalars(select(Message))}
        actions = [e.action for e in session.scalars(select(AuditEvent))]
    assert statuses == {Status.DELETED}
    assert actions.count("message.delete") == 2


def test_a_retried_message_is_held_once(database, store):
    (ola,) = setup_mailboxes(database, "ola@example.no")
    raw = message(subject="Retried")
    assert len(hold(database, store, raw, [ola])) == 1
    assert hold(database, store, raw, [ola]) == []
    with database.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 1


def test_a_rolled_back_delete_keeps_the_file(database, store):
    (ola,) = setup_mailboxes(database, "ola@example.no")
    raw = message(subject="Keep me")
    (message_id,) = hold(database, store, raw, [ola])
    session = database.write_sessions()
    quarantine.delete(session, store, quarantine.get(session, message_id), ACTOR)
    assert not store.exists(digest(raw))
    session.rollback()
    session.close()
    assert store.read(digest(raw)) == raw


def test_hostile_headers_are_stored_safely(database, store):
    (ola,) = setup_mailboxes(database, "ola@example.no")
    raw = (
        b'From: "Evil\x00 <script>alert(1)</script>" <e@evil.test>\r\n'
        b"Subject: =?x-unknown?B?AAAA?= \xff\xfe \x00 nul\r\n"
        b"Date: Mon, 99 Foo 99999 99:99:99\r\n\r\nbody\r\n"
    )
    (message_id,) = hold(database, store, raw, [ola])
    with database.session_scope() as session:
        row = quarantine.get(session, message_id)
        assert "\x00" not in row.subject and "\x00" not in row.from_header
        assert row.from_address == "e@evil.test"
        assert row.date_header is None
    assert store.read(digest(raw)) == raw


def test_list_is_scoped_to_the_mailbox(database, store):
    ola, kari = setup_mailboxes(database, "ola@example.no", "kari@example.no")
    hold(database, store, message(subject="for ola"), [ola])
    hold(database, store, message(subject="for kari"), [kari])
    with database.session_scope() as session:
        mailbox = mailboxes.get_mailbox(session, "ola@example.no")
        subjects = [m.subject for m in quarantine.list_messages(session, mailbox=mailbox)]
    assert subjects == ["for ola"]
