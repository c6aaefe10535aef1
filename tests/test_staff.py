"""Staff, their access, the operators' search and bulk jobs, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select

import cleanmail.cli.staff  # noqa: F401 - registers the commands
from cleanmail import audit, bulk, mailboxes, search, staff
from cleanmail.cli import cli, data  # noqa: F401 - registers the commands
from cleanmail.config import Endpoint
from cleanmail.models import AuditEvent, BulkJob, BulkStatus, Mailbox, Message, Role, Status
from cleanmail.relay import Relay
from tests.conftest import T0, FilterProcess

ACTOR = audit.Actor("operator", "test")


def _admin(database, domains=("example.no",)):
    with database.session_scope(write=True) as session:
        member = staff.add(
            session,
            ACTOR,
            "admin@example.no",
            Role.DOMAIN_ADMIN,
            password="Secret123",
            domains=domains,
        )
        return staff.access_for(session, member)


def _found(database, access, query, order=None, **kw):
    with database.session_scope() as session:
        result = search.page(session, access, query, order, **kw)
        return [row.message.id for row in result.rows], result.next


def test_staff_roles_and_access(database, two_domains):
    admin = _admin(database)
    assert admin is not None and not admin.operator
    with database.session_scope(write=True) as session:
        operator = staff.add(
            session, ACTOR, "root@provider.example", "operator", password="Secret123"
        )
        assert operator.domain_id is None  # a staff address outside the served domains
        assert staff.access_for(session, operator) == staff.Access("operator", operator.id)
        owner = session.get(Mailbox, two_domains["box:ola@example.no"])
        assert staff.access_for(session, owner) is None
        with pytest.raises(staff.StaffError):
            staff.add(session, ACTOR, "x@provider.example", "owner")
        with pytest.raises(staff.StaffError):
            staff.add(session, ACTOR, "y@provider.example", "operator", password="weak")
        with pytest.raises(mailboxes.MailboxError):
            staff.add(session, ACTOR, "z@provider.example", "domain_admin", domains=["nope.no"])
    everything = staff.OPERATOR
    ids, _next = _found(database, everything, search.Query())
    assert len(ids) == 5
    ids, _next = _found(database, admin, search.Query())
    assert sorted(ids) == sorted(
        [two_domains["invoice"], two_domains["newsletter"], two_domains["per"]]
    )
    # A domain admin with no domains sees nothing at all.
    assert _found(database, staff.Access("domain_admin", 1, frozenset()), search.Query())[0] == []


def test_search_criteria(database, two_domains):
    ids = two_domains
    op = staff.OPERATOR

    def found(**fields):
        return set(_found(database, op, search.Query(**fields))[0])

    assert found(sender="Invoice@Supplier.no") == {ids["invoice"], ids["per"], ids["mette"]}
    assert found(sender="supplier.no") == {ids["invoice"], ids["per"], ids["mette"]}
    assert found(recipient="ola@example.no") == {ids["invoice"], ids["newsletter"]}
    assert found(recipient="other.dk") == {ids["mette"], ids["virus"]}
    # Subject words: whole words, any case, all of them, in any order (search.subject_words).
    assert found(subject="INVOICE") == {ids["invoice"], ids["per"]}
    assert found(subject="invoice 2231") == {ids["invoice"]}
    assert found(subject="October, invoice!") == {ids["invoice"]}
    assert found(subject="invoice 223") == set()  # a part of a word is not the word
    assert found(subject="sale autumn") == {ids["newsletter"]}
    assert found(subject="100%_") == set()
    assert found(subject="%_") == set(found())  # no words: the subject does not narrow
    assert found(reason="BLOCKED_ATTACHMENT") == {ids["virus"]}
    assert found(min_score=9, max_score=12) == {ids["newsletter"], ids["mette"]}
    assert found(since=T0 + timedelta(hours=2), until=T0 + timedelta(hours=4)) == {
        ids["per"],
        ids["mette"],
    }
    assert found(statuses=("released",)) == set()
    assert found(sender="invoice@supplier.no", recipient="example.no") == {
        ids["invoice"],
        ids["per"],
    }
    with pytest.raises(search.SearchError):
        found(recipient="not an address@")
    with database.session_scope() as session:
        query = search.Query(sender="supplier.no")
        assert search.count(session, op, query) == 3
        assert search.count(session, op, search.Query(), cap=2) == 3  # "more than 2"
        assert [b for b in search.batches(session, op, query, size=2)] == [
            sorted([ids["invoice"], ids["per"]]),
            [ids["mette"]],
        ]


@pytest.mark.parametrize("sort", sorted(search.SORTS))
def test_search_sorts_and_pages_with_keyset(database, two_domains, sort):
    for descending in (True, False):
        order = search.Order(sort, descending)
        everything, _none = _found(database, staff.OPERATOR, search.Query(), order, limit=100)
        paged, cursor = [], None
        while True:
            ids, cursor = _found(
                database, staff.OPERATOR, search.Query(), order, after=cursor, limit=2
            )
            paged += ids
            if cursor is None:
                break
            cursor = search.Cursor.decode(cursor.encode(), order)  # through the URL
        assert paged == everything and len(paged) == 5
    with database.session_scope() as session:
        rows = search.page(session, staff.OPERATOR, search.Query(), search.Order("score")).rows
        assert [r.message.score for r in rows] == sorted(
            (r.message.score for r in rows), reverse=True
        )
    assert search.Cursor.decode("garbage", search.Order(sort)) is None
    assert search.Cursor.decode('["x", -1]', search.Order(sort)) is None


def test_query_survives_json():
    query = search.Query(sender="a@b.no", since=T0, statuses=("new",), ids=(3, 4), min_score=2.5)
    assert search.Query.from_json(query.to_json()) == query


def _relay(config):
    return Relay(Endpoint(config.relay.host, config.relay.port), timeout=10)


def test_bulk_release_by_search(database, store, config, smtp_sink, two_domains):
    admin = _admin(database)
    query = search.Query(sender="invoice@supplier.no")
    with database.session_scope(write=True) as session:
        job = bulk.create(
            session,
            admin,
            audit.Actor("domain_admin", "admin@example.no", "10.0.0.9"),
            "release",
            query,
        )
        job_id = job.id
        assert job.total == 2  # not mette@other.dk's copy: another domain
    outcomes: list[str] = []
    assert bulk.run(database, store, _relay(config), job_id, progress=outcomes.append)
    assert outcomes == ["done", "done"]
    assert sorted(m.rcpt_tos[0] for m in smtp_sink.wait_for(2)) == [
        "ola@example.no",
        "per@example.no",
    ]
    with database.session_scope() as session:
        job = session.get(BulkJob, job_id)
        assert (job.status, job.done, job.failed, job.total) == (BulkStatus.DONE, 2, 0, 2)
        mette = session.get(Message, two_domains["mette"])
        assert mette.status == Status.NEW
        releases = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "message.release")
        ).all()
        assert {(e.actor_type, e.actor, e.remote_addr) for e in releases} == {
            ("domain_admin", "admin@example.no", "10.0.0.9")
        }
    # Run again: nothing is delivered twice, the finished job is not taken again.
    assert not bulk.run(database, store, _relay(config), job_id)
    assert len(smtp_sink.messages) == 2


def test_bulk_release_refused_stays_visible_and_delete(
    database, store, config, smtp_sink, two_domains
):
    smtp_sink.refuse = "451 4.3.0 try later"
    with database.session_scope(write=True) as session:
        job = bulk.create(
            session,
            staff.OPERATOR,
            ACTOR,
            "release",
            search.Query(ids=(two_domains["invoice"], two_domains["virus"])),
        )
        job_id = job.id
    bulk.run(database, store, _relay(config), job_id)
    with database.session_scope() as session:
        job = session.get(BulkJob, job_id)
        assert (job.done, job.failed, job.status) == (0, 2, BulkStatus.DONE)
        assert "451" in job.last_error
        held = session.get(Message, two_domains["invoice"])
        assert held.status == Status.NEW and "451" in held.release_error
    smtp_sink.refuse = None
    with database.session_scope(write=True) as session:
        job = bulk.create(
            session, staff.OPERATOR, ACTOR, "delete", search.Query(recipient="other.dk")
        )
        job_id = job.id
    bulk.run(database, store, _relay(config), job_id)
    with database.session_scope() as session:
        assert session.get(BulkJob, job_id).done == 2
        assert session.get(Message, two_domains["virus"]).status == Status.DELETED
        assert session.get(Message, two_domains["invoice"]).status == Status.NEW


def test_bulk_job_resumes_after_its_runner_died(database, store, config, smtp_sink, two_domains):
    with database.session_scope(write=True) as session:
        job = bulk.create(
            session, staff.OPERATOR, ACTOR, "release", search.Query(sender="supplier.no")
        )
        job_id = job.id
        # A runner claimed it, released nothing, and died ten minutes ago.
        job.status, job.worker = BulkStatus.RUNNING, "dead"
        job.heartbeat_at = datetime.now(UTC) - timedelta(minutes=10)
    assert bulk.resume(database, store, _relay(config)) == 1
    assert len(smtp_sink.wait_for(3)) == 3
    with database.session_scope() as session:
        assert session.get(BulkJob, job_id).status == BulkStatus.DONE


def test_bulk_cancel(database, store, config, two_domains):
    with database.session_scope(write=True) as session:
        job = bulk.create(session, staff.OPERATOR, ACTOR, "delete", search.Query())
        job_id = job.id
    admin = _admin(database)
    with database.session_scope(write=True) as session, pytest.raises(bulk.BulkError):
        bulk.cancel(session, admin, ACTOR, job_id)  # not theirs
    with database.session_scope(write=True) as session:
        assert bulk.cancel(session, staff.OPERATOR, ACTOR, job_id).status == BulkStatus.CANCELLED
    assert not bulk.run(database, store, _relay(config), job_id)
    with database.session_scope() as session:
        assert session.get(Message, two_domains["virus"]).status == Status.NEW


@pytest.fixture
def run(config):
    """Run a cleanmail command against the test's configuration."""
    env = FilterProcess(config).environment()

    def invoke(*args: str, ok: bool = True, stdin: str | None = None):
        result = CliRunner().invoke(cli, list(args), env=env, input=stdin, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


def test_staff_commands(run, database):
    run("domain", "add", "example.no")
    run("domain", "add", "other.dk")
    out = run("staff", "add", "Boss@Provider.example", stdin="Secret123\nSecret123\n").output
    assert "boss@provider.example\toperator" in out
    run(
        "staff",
        "add",
        "anne@example.no",
        "--role",
        "domain_admin",
        "--domain",
        "example.no",
        "--password-stdin",
        stdin="Secret123\n",
    )
    listed = run("staff", "list").output.splitlines()
    assert listed == [
        "anne@example.no\tdomain_admin\tno-totp\tactive\texample.no",
        "boss@provider.example\toperator\tno-totp\tactive",
    ]
    assert run("staff", "domains", "anne@example.no", "--add", "other.dk").output.split() == [
        "example.no",
        "other.dk",
    ]
    assert run("staff", "domains", "anne@example.no", "--remove", "example.no").output.split() == [
        "other.dk"
    ]
    weak = run("staff", "add", "c@provider.example", "--password-stdin", stdin="short\n", ok=False)
    assert weak.exit_code == 1 and "at least 8 characters" in weak.output
    again = run(
        "staff", "add", "anne@example.no", "--password-stdin", stdin="Secret123\n", ok=False
    )
    assert "already domain_admin" in again.output
    assert "operator" in run("staff", "set-role", "anne@example.no", "operator").output
    run("staff", "remove", "anne@example.no")
    assert "not staff" in run("staff", "remove", "anne@example.no", ok=False).output
    with database.session_scope() as session:
        anne = session.scalar(select(Mailbox).where(Mailbox.address == "anne@example.no"))
        assert anne.role == Role.OWNER and anne.key_version == 3  # set-role and remove end sessions
        assert staff.assigned_domain_ids(session, anne) == []
        actions = session.scalars(
            select(AuditEvent.action).where(AuditEvent.action.like("staff.%"))
        ).all()
        assert {
            "staff.add",
            "staff.assign",
            "staff.unassign",
            "staff.set_role",
            "staff.remove",
        } <= set(actions)


def test_the_scheduler_resumes_orphaned_jobs(
    database, store, config, smtp_sink, two_domains, monkeypatch
):
    from cleanmail import scheduler

    with database.session_scope(write=True) as session:
        job = bulk.create(
            session, staff.OPERATOR, ACTOR, "release", search.Query(sender="evil.example")
        )
        job.created_at = datetime.now(UTC) - timedelta(minutes=2)  # its web thread never started
        job_id = job.id
    monkeypatch.setattr(scheduler, "_runtime", scheduler.Runtime(config, database))
    scheduler.bulk_job()
    (received,) = smtp_sink.wait_for(1)
    assert received.rcpt_tos == ["mette@other.dk"]
    with database.session_scope() as session:
        assert session.get(BulkJob, job_id).status == BulkStatus.DONE


def test_subject_words_index_follows_changes_and_migrates_both_ways(database, two_domains):
    """Migration 0008's word index finds new, changed and deleted subjects, up and down."""
    from alembic import command

    from cleanmail import db

    op = staff.OPERATOR

    def found(subject):
        return set(_found(database, op, search.Query(subject=subject))[0])

    with database.session_scope(write=True) as session:
        session.get(Message, two_domains["virus"]).subject = "Your parcel is waiting"
        session.delete(session.get(Message, two_domains["mette"]))
    assert found("parcel waiting") == {two_domains["virus"]}
    assert found("faktura") == set()
    database.dispose()
    command.downgrade(db.alembic_config(database.url), "0007")
    assert db.current_revision(database.engine) == "0007"
    db.upgrade(database.url)  # on SQLite the FTS table is rebuilt from the messages
    assert found("waiting parcel") == {two_domains["virus"]}
    assert found("invoice") == {two_domains["invoice"], two_domains["per"]}


@pytest.mark.parametrize("rare", [5_000, 0])
def test_subject_words_common_and_rare_find_the_same(database, two_domains, monkeypatch, rare):
    """SQLite looks a rare word up by id and checks a common one row by row: same answer."""
    monkeypatch.setattr(search, "RARE", rare)
    ids = two_domains

    def found(subject, **kw):
        return _found(database, staff.OPERATOR, search.Query(subject=subject), **kw)

    assert set(found("invoice")[0]) == {ids["invoice"], ids["per"]}
    assert set(found("autumn sale")[0]) == {ids["newsletter"]}
    first, after = found("invoice", limit=1)
    assert first == [ids["per"]] and after is not None  # newest first, keyset pages
    assert found("invoice", after=after, limit=1)[0] == [ids["invoice"]]
    with database.session_scope() as session:
        query = search.Query(subject="invoice")
        assert search.count(session, staff.OPERATOR, query) == 2
        assert list(search.batches(session, staff.OPERATOR, query)) == [
            sorted([ids["invoice"], ids["per"]])
        ]
