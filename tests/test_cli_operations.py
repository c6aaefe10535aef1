"""Operator commands: release and delete by search, tokens, audit, on both databases."""

from __future__ import annotations

import csv
import io

import pytest
from click.testing import CliRunner

from cleanmail import audit, mailboxes
from cleanmail.cli import cli, operations  # noqa: F401 - registers the commands
from cleanmail.models import Message, Status
from tests.conftest import FilterProcess, hold_message
from tests.messages import message

ACTOR = audit.Actor("operator", "test")


@pytest.fixture
def run(config):
    """Run a cleanmail command against the test's configuration."""
    env = FilterProcess(config).environment()

    def invoke(*args: str, ok: bool = True, stdin: str | None = None):
        result = CliRunner().invoke(cli, list(args), env=env, input=stdin)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


@pytest.fixture
def invoices(database, store, owner):
    """Three invoices from a supplier and one other message, all held for ola."""
    ids = [
        hold_message(
            database,
            store,
            owner.id,
            message(subject=f"Invoice {n}", sender="invoice@supplier.no"),
            sender="invoice@supplier.no",
        )
        for n in range(3)
    ]
    other = hold_message(database, store, owner.id, message(subject="Lunch"))
    return ids, other


def statuses(database, ids):
    with database.session_scope() as session:
        return [session.get(Message, i).status for i in ids]


def test_release_by_search_dry_run_changes_nothing(run, database, invoices, smtp_sink):
    ids, _other = invoices
    shown = run("release", "--sender", "invoice@supplier.no", "--dry-run").output
    assert "3 messages match" in shown
    assert all(str(i) in shown for i in ids) and "Lunch" not in shown
    assert "dry run" in shown
    assert statuses(database, ids) == [Status.NEW] * 3
    assert smtp_sink.messages == []


def test_release_by_search_asks_and_needs_yes_outside_a_terminal(run, database, invoices):
    ids, _other = invoices
    refused = run("release", "--sender", "supplier.no", ok=False)
    assert refused.exit_code != 0 and "--yes" in refused.output
    assert statuses(database, ids) == [Status.NEW] * 3


def test_release_by_search_delivers_each_once(run, database, invoices, smtp_sink):
    ids, other = invoices
    done = run("release", "--sender", "supplier.no", "--since", "2000-01-01", "--yes").output
    assert "3 released, 0 failed, 0 skipped" in done
    assert len(smtp_sink.wait_for(3)) == 3
    assert statuses(database, ids) == [Status.RELEASED] * 3
    assert statuses(database, [other]) == [Status.NEW]
    again = run("release", "--sender", "supplier.no", "--yes").output
    assert "0 messages match" in again
    trail = run("audit", "--action", "message.release").output
    assert trail.count("message.release") == 3 and "cli:" in trail


def test_a_refused_release_exits_non_zero_and_stays_held(run, database, invoices, smtp_sink):
    ids, _other = invoices
    smtp_sink.refuse = "550 5.1.1 mailbox unavailable"
    failed = run("release", str(ids[0]), "--yes", ok=False)
    assert failed.exit_code == 1 and "1 failed" in failed.output
    assert "mailbox unavailable" in failed.output
    assert statuses(database, ids[:1]) == [Status.NEW]


def test_delete_by_id(run, database, invoices):
    ids, _other = invoices
    result = run("delete", str(ids[1]), "--yes")
    assert "1 deleted" in result.output
    assert statuses(database, ids) == [Status.NEW, Status.DELETED, Status.NEW]


def test_release_needs_something_to_look_for(run):
    result = run("release", "--yes", ok=False)
    assert result.exit_code == 2 and "give message ids" in result.output
    bad = run("release", "--since", "last week", ok=False)
    assert bad.exit_code == 2 and "--since" in bad.output


def test_tokens_create_list_revoke(run, database, owner):
    secret = run("token", "create", "monitoring", "--domain", "example.no").stdout.strip()
    assert secret.startswith("cm_")
    listed = run("token", "list").output
    assert "monitoring" in listed and "example.no" in listed and secret not in listed
    assert run("token", "create", "monitoring", ok=False).exit_code == 1
    assert (
        "not a served domain" in run("token", "create", "x", "--domain", "nope.no", ok=False).output
    )
    run("token", "revoke", "monitoring")
    assert run("token", "list").stdout.strip() == ""
    assert "revoked" in run("token", "list", "--all").output
    assert run("token", "revoke", "ghost", ok=False).exit_code == 1


def test_audit_filters_and_csv(run, database, store, invoices):
    ids, _other = invoices
    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, ACTOR, "example.dk")
        kari = mailboxes.add_mailbox(session, ACTOR, "kari@example.dk")
        audit.record(
            session,
            audit.Actor("owner", "kari@example.dk"),
            "list.allow",
            mailbox_id=kari.id,
            pattern="=cmd|' /C calc'!A0",
        )
    run("delete", str(ids[0]), "--yes")
    only_delete = run("audit", "--action", "message.delete").output
    assert only_delete.count("message.delete") == 1
    by_mailbox = run("audit", "--mailbox", "kari@").output
    assert "list.allow" in by_mailbox and "message.delete" not in by_mailbox
    by_actor = run("audit", "--actor", "owner").output
    assert "list.allow" in by_actor and "mailbox.add" not in by_actor
    assert run("audit", "--since", "2099-01-01").stdout == ""
    exported = list(csv.reader(io.StringIO(run("audit", "--csv").stdout)))
    assert exported[0][:5] == ["id", "at", "actor_type", "actor", "action"]
    actions = [row[4] for row in exported[1:]]
    assert "message.delete" in actions and "list.allow" in actions
    detail = next(row[8] for row in exported[1:] if row[4] == "list.allow")
    assert "calc" in detail and not detail.startswith("=")
