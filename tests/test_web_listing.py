"""The quarantine list's rows: the compiled row template, and rows kept once rendered."""

from __future__ import annotations

import json
import re
from collections import namedtuple
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from flask import render_template
from flask_babel import gettext
from sqlalchemy import event, update

from cleanmail import audit, bulk, purge, quarantine, quarantine_list, reasons, search, staff
from cleanmail.models import Mailbox, MailboxVersion, Message
from cleanmail.web import listing, preview
from tests.conftest import hold_message, login_as
from tests.messages import message

T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
Listed = namedtuple("Listed", [column.name for column in quarantine_list.LISTED])
HOSTILE = "<script>alert(1)</script> {id} {0} %(num)s %% & \"'"
WHY = [
    {"code": "SUBJECT_CAPS", "text": "the subject is mostly capital letters", "score": 1.0},
    {"code": "LIST_BLOCK_MAILBOX", "text": f"sender blocked by you: {HOSTILE}", "score": 100},
    {"code": "NEW_ENGINE", "text": HOSTILE, "score": 50},
]


def jinja_row(row, zone) -> str:
    """The same row rendered by Jinja itself, with the values the list computes."""
    name, address = preview.sender(row.from_header, row.envelope_sender)
    return render_template(
        "quarantine/_row.html",
        id=row.id,
        date=preview.local_time(quarantine_list.received_time(row.received_at), zone),
        name=name,
        address=address or gettext("(no sender address)"),
        subject=row.subject or gettext("(no subject)"),
        size=preview.human_size(row.size),
        path="/messages/",
        status=row.status,
        release_failed=row.release_failed,
        reasons=[reasons.describe(r) for r in reasons.top(json.loads(row.reasons or "[]"))],
    ).strip()


@pytest.mark.parametrize("language", ["nb", "da", "en"])
def test_rows_are_what_jinja_renders(app, language):
    zone = ZoneInfo("Europe/Oslo")
    rows = [
        Listed(
            7,
            "2026-11-22 08:30:00.000001",
            f'"{HOSTILE}" <a@b.example>',
            "",
            HOSTILE,
            json.dumps(WHY),
            1234567,
            "new",
            False,
        ),
        Listed(8, T0, "", "env@x.example", "", "[]", 999, "released", True),
        Listed(9, T0, HOSTILE, "bounce@x.example", "{}", None, 12_345, "new", True),
        Listed(
            10,
            T0,
            "Kari <kari@x.example>",
            "",
            "Hei {subject}",
            json.dumps(WHY[:1]),
            5,
            "new",
            False,
        ),
    ]
    with app.test_request_context("/", headers={"Accept-Language": language}):
        html = listing.render_rows(rows, language, zone, "/messages/")
        expected = [jinja_row(row, zone) for row in rows]
    assert html.strip().split("\n<tr>") == "\n".join(expected).split("\n<tr>")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; {id} {0}" in html


@pytest.fixture
def ola(client, owner):
    login_as(client, owner)
    return owner


def subjects(client, path="/") -> list[str]:
    return re.findall(r'href="/messages/\d+">([^<]*)</a>', client.get(path).get_data(as_text=True))


def test_the_list_follows_every_change(app, client, ola, database, store, smtp_sink):
    """Rows kept from an earlier page never hide a change, whoever made it."""
    ids = [
        hold_message(database, store, ola.id, message(subject=f"M{n}"), at=T0 + timedelta(hours=n))
        for n in range(5)
    ]
    assert subjects(client) == ["M4", "M3", "M2", "M1", "M0"]
    page = client.get("/").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)

    # New mail from the filter is on the next page view, and in the count.
    hold_message(database, store, ola.id, message(subject="New"), at=T0 + timedelta(hours=9))
    page = client.get("/").get_data(as_text=True)
    assert subjects(client)[0] == "New" and "6 new messages" in page

    # The owner releases and deletes.
    client.post(f"/messages/{ids[4]}/release", data={"csrf_token": csrf})
    client.post(f"/messages/{ids[3]}/delete", data={"csrf_token": csrf})
    assert subjects(client) == ["New", "M2", "M1", "M0"]
    released = client.get("/?released=1").get_data(as_text=True)
    assert re.search(r"M4</a>\s*<span class=\"badge\">Released</span>", released)

    # Another process (the operators' console, a bulk job) records a failed release,
    # then releases one for the owner.
    with database.session_scope(write=True) as session:
        session.execute(update(Message).where(Message.id == ids[2]).values(release_error="451"))
    assert re.search(
        r"M2</a>\s*<span class=\"badge failed\">", client.get("/").get_data(as_text=True)
    )
    relay = app.extensions["cleanmail.relay"]  # the relay another process would use
    with database.session_scope(write=True) as session:
        held = quarantine.get(session, ids[1])
        quarantine.release(session, store, relay, held, audit.Actor("operator", "support"))
    assert subjects(client) == ["New", "M2", "M0"]
    assert "3 new messages" in client.get("/").get_data(as_text=True)

    # The scheduler's purge at the end of the retention.
    with database.session_scope(write=True) as session:
        purge.expire_batch(session, store, T0 + timedelta(days=60))
    assert subjects(client) == [] and "Your quarantine is empty" in client.get("/").get_data(
        as_text=True
    )


def test_rows_follow_the_owners_language_and_time_zone(client, ola, database, store):
    hold_message(database, store, ola.id, message(subject="Tid"), at=T0)
    page = client.get("/").get_data(as_text=True)
    assert "22/11/2026 10:00" in page and "The subject is mostly capital letters" in page
    with database.session_scope(write=True) as session:
        session.execute(
            update(Mailbox)
            .where(Mailbox.id == ola.id)
            .values(language="nb", timezone="America/New_York")
        )
    page = client.get("/").get_data(as_text=True)
    assert "22.11.2026 04:00" in page and "Emnet er nesten bare store bokstaver" in page
    assert "The subject is mostly capital letters" not in page


def version(database, mailbox_id) -> int:
    with database.session_scope() as session:
        found = session.get(MailboxVersion, mailbox_id)
        return found.version if found else 0


def test_every_change_to_listed_messages_bumps_the_mailbox_version(database, store, owner):
    """The triggers of migration 0009, whatever code or tool writes the rows."""
    seen = [version(database, owner.id)]

    def bumped() -> bool:
        seen.append(version(database, owner.id))
        return seen[-1] > seen[-2]

    first = hold_message(database, store, owner.id, message(subject="A"), at=T0)
    assert bumped()
    second = hold_message(database, store, owner.id, message(subject="B"), at=T0)
    assert bumped()
    changes = [
        {"status": "released"},
        {"release_error": "451 busy"},
        {"subject": "changed"},
        {"reasons": []},
    ]
    for values in changes:
        with database.session_scope(write=True) as session:
            session.execute(update(Message).where(Message.id == first).values(**values))
        assert bumped(), values
    with database.session_scope(write=True) as session:  # the report run's bookkeeping
        session.execute(update(Message).where(Message.id == first).values(release_attempts=3))
    assert not bumped()
    with database.session_scope(write=True) as session:
        session.execute(Message.__table__.delete().where(Message.id == second))
    assert bumped()


def test_a_kept_page_is_served_without_queries_with_each_sessions_token(
    app, client, owner, database, store
):
    hold_message(database, store, owner.id, message(subject="Kept"), at=T0)
    other = app.test_client()
    other.environ_base["HTTP_ACCEPT_LANGUAGE"] = "en"
    login_as(client, owner)
    login_as(other, owner)
    first = client.get("/").get_data(as_text=True)
    statements: list[str] = []
    engine = app.extensions["cleanmail.db"].engine
    listen = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listen)
    try:
        second = other.get("/").get_data(as_text=True)
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    assert not any("messages" in statement for statement in statements), statements
    token = r'name="csrf_token" value="([^"]+)"'
    assert re.findall(token, first)[0] != re.findall(token, second)[0]
    assert re.sub(token, "", first) == re.sub(token, "", second)
    (message_id,) = re.findall(r'name="ids" value="(\d+)"', second)
    data = {"csrf_token": re.findall(token, second)[1], "action": "delete", "ids": message_id}
    assert other.post("/messages/bulk", data=data).status_code == 302
    assert "Your quarantine is empty" in client.get("/").get_data(as_text=True)


def test_a_bulk_job_and_another_web_process_are_seen(app, client, ola, database, store, config):
    from cleanmail.web import create_app

    for n in range(3):
        hold_message(database, store, ola.id, message(subject=f"B{n}"), at=T0 + timedelta(hours=n))
    assert subjects(client) == ["B2", "B1", "B0"]
    second = create_app(config)  # another web process: its own kept pages
    try:
        other = second.test_client()
        login_as(other, ola)
        assert subjects(other) == ["B2", "B1", "B0"]
        page = other.get("/").get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        b2 = re.search(r'href="/messages/(\d+)">B2<', page).group(1)
        other.post(f"/messages/{b2}/delete", data={"csrf_token": csrf})
        assert subjects(client) == ["B1", "B0"]
    finally:
        second.extensions["cleanmail.db"].dispose()
    with database.session_scope(write=True) as session:
        query = search.Query(recipient="ola@example.no", subject="B1")
        job = bulk.create(session, staff.OPERATOR, audit.Actor("operator", "t"), "delete", query)
    bulk.run(database, store, app.extensions["cleanmail.relay"], job.id)
    assert subjects(client) == ["B0"]


def test_mailbox_versions_migrate_both_ways(database, store, owner):
    from alembic import command

    from cleanmail import db

    database.dispose()
    command.downgrade(db.alembic_config(database.url), "0008")
    hold_message(database, store, owner.id, message(subject="Without versions"), at=T0)
    db.upgrade(database.url)
    assert version(database, owner.id) == 0  # a new table; the page keep starts from here
    hold_message(database, store, owner.id, message(subject="With versions"), at=T0)
    assert version(database, owner.id) == 1
