"""The REST API: bearer tokens, scoping to domains, JSON errors, actions and their audit."""

from __future__ import annotations

import base64

import pytest
from sqlalchemy import select

from cleanmail import apitokens, audit, mailboxes
from cleanmail.models import AuditEvent, ListEntry, Message, Status
from tests.conftest import hold_message
from tests.messages import message

ACTOR = audit.Actor("operator", "test")


def make_token(database, name, domains=()):
    """A new API token's secret."""
    with database.session_scope(write=True) as session:
        return apitokens.create(session, ACTOR, name, domains).secret


def bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def two_domains(database, owner):
    """example.no (ola) and example.dk (mette), each with a held message."""
    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, ACTOR, "example.dk")
        mette = mailboxes.add_mailbox(session, ACTOR, "mette@example.dk")
    return owner, mette


@pytest.fixture
def held(database, store, two_domains):
    ola, mette = two_domains
    ours = hold_message(database, store, ola.id, message(subject="Invoice 42"))
    theirs = hold_message(
        database, store, mette.id, message(subject="Faktura 7", to="mette@example.dk")
    )
    return ours, theirs


def test_requests_without_a_valid_token_get_401_in_json(client, database):
    for headers in ({}, bearer("cm_wrong"), {"Authorization": "Basic !!!"}):
        response = client.get("/api/v1/stats", headers=headers)
        assert response.status_code == 401
        assert response.json["error"]["status"] == 401
        assert "token" in response.json["error"]["message"]


def test_revoked_tokens_stop_working_at_once(client, database):
    secret = make_token(database, "ops")
    assert client.get("/api/v1/stats", headers=bearer(secret)).status_code == 200
    with database.session_scope(write=True) as session:
        apitokens.revoke(session, ACTOR, "ops")
    assert client.get("/api/v1/stats", headers=bearer(secret)).status_code == 401


def test_tokens_are_stored_hashed(database):
    secret = make_token(database, "ops")
    with database.session_scope() as session:
        (token,) = apitokens.list_tokens(session)
        assert token.token_hash == apitokens.hash_secret(secret)
        assert secret not in (token.token_hash, token.prefix)


def test_basic_auth_password_is_a_token_too(client, database):
    secret = make_token(database, "rspamd")
    basic = base64.b64encode(f"rspamd:{secret}".encode()).decode()
    response = client.get("/api/v1/stats", headers={"Authorization": f"Basic {basic}"})
    assert response.status_code == 200


def test_message_details_and_release_reach_the_sink(client, database, held, smtp_sink):
    ours, _theirs = held
    secret = make_token(database, "ops")
    details = client.get(f"/api/v1/messages/{ours}", headers=bearer(secret))
    assert details.status_code == 200
    assert details.json["subject"] == "Invoice 42"
    assert details.json["mailbox"] == "ola@example.no"
    released = client.post(f"/api/v1/messages/{ours}/release", headers=bearer(secret))
    assert released.status_code == 200 and released.json["released"] is True
    assert smtp_sink.wait_for(1)[0].rcpt_tos == ["ola@example.no"]
    again = client.post(f"/api/v1/messages/{ours}/release", headers=bearer(secret))
    assert again.json["released"] is False
    with database.session_scope() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "message.release")
        ).one()
        assert (event.actor_type, event.actor, event.message_id) == ("api", "ops", ours)


def test_delete_is_audited_with_the_token_name(client, database, held):
    ours, _theirs = held
    secret = make_token(database, "ops")
    response = client.delete(f"/api/v1/messages/{ours}", headers=bearer(secret))
    assert response.status_code == 200
    with database.session_scope() as session:
        assert session.get(Message, ours).status == Status.DELETED
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "message.delete")
        ).one()
        assert (event.actor_type, event.actor) == ("api", "ops")


def test_domain_token_never_sees_or_touches_another_domain(client, database, held, smtp_sink):
    ours, theirs = held
    secret = make_token(database, "no-admin", ["example.no"])
    h = bearer(secret)
    assert client.get(f"/api/v1/messages/{ours}", headers=h).status_code == 200
    refused = [
        client.get(f"/api/v1/messages/{theirs}", headers=h),
        client.post(f"/api/v1/messages/{theirs}/release", headers=h),
        client.delete(f"/api/v1/messages/{theirs}", headers=h),
        client.get("/api/v1/mailboxes/mette@example.dk", headers=h),
        client.post("/api/v1/mailboxes/mette@example.dk/login-link", headers=h),
        client.get("/api/v1/lists?scope=domain&owner=example.dk", headers=h),
        client.get("/api/v1/lists?scope=mailbox&owner=mette@example.dk", headers=h),
        client.post(
            "/api/v1/lists",
            json={"scope": "domain", "owner": "example.dk", "action": "allow", "pattern": "x.com"},
            headers=h,
        ),
        client.get("/api/v1/stats?domain=example.dk", headers=h),
    ]
    assert [r.status_code for r in refused] == [404] * len(refused)
    operator_only = [
        client.get("/api/v1/lists?scope=global", headers=h),
        client.post(
            "/api/v1/lists",
            json={"scope": "global", "action": "block", "pattern": "x.com"},
            headers=h,
        ),
        client.get("/api/v1/reports/status", headers=h),
    ]
    assert [r.status_code for r in operator_only] == [403] * len(operator_only)
    found = client.get("/api/v1/mailboxes", headers=h).json["mailboxes"]
    assert [m["address"] for m in found] == ["ola@example.no"]
    with database.session_scope() as session:
        assert session.get(Message, theirs).status == Status.NEW
        assert session.scalars(select(ListEntry)).all() == []
    assert smtp_sink.messages == []


def test_lists_add_and_remove(client, database, owner):
    secret = make_token(database, "ops")
    h = bearer(secret)
    added = client.post(
        "/api/v1/lists",
        json={
            "scope": "mailbox",
            "owner": "ola@example.no",
            "action": "block",
            "pattern": "*@spam.example",
        },
        headers=h,
    )
    assert added.status_code == 201
    entries = client.get("/api/v1/lists?scope=mailbox&owner=ola@example.no", headers=h).json
    assert [e["pattern"] for e in entries["entries"]] == ["spam.example"]
    bad = client.post(
        "/api/v1/lists",
        json={
            "scope": "mailbox",
            "owner": "ola@example.no",
            "action": "block",
            "pattern": "not a pattern!",
        },
        headers=h,
    )
    assert bad.status_code == 400 and bad.json["error"]["message"]
    removed = client.delete(f"/api/v1/lists/{added.json['id']}", headers=h)
    assert removed.status_code == 200
    with database.session_scope() as session:
        actions = session.scalars(select(AuditEvent.action).where(AuditEvent.actor_type == "api"))
        assert list(actions) == ["list.block", "list.remove"]


def test_login_link_for_a_mailbox_logs_the_owner_in(client, database, owner):
    secret = make_token(database, "ops")
    response = client.post("/api/v1/mailboxes/ola@example.no/login-link", headers=bearer(secret))
    assert response.status_code == 201
    url = response.json["url"]
    path = url.split("://", 1)[1].partition("/")[2]
    opened = client.get("/" + path)
    assert opened.status_code == 303
    assert client.get(opened.headers["Location"]).status_code == 200


def test_bad_input_gets_a_clear_json_error(client, database, owner):
    h = bearer(make_token(database, "ops"))
    cases = [
        client.post("/api/v1/lists", data="not json", headers=h),
        client.post("/api/v1/lists", json={"scope": "planet"}, headers=h),
        client.post(
            "/api/v1/lists", json={"scope": "mailbox", "action": "allow", "pattern": 7}, headers=h
        ),
        client.get("/api/v1/stats?days=zero", headers=h),
        client.get("/api/v1/stats?days=100000", headers=h),
        client.get("/api/v1/mailboxes?limit=-1", headers=h),
        client.get("/api/v1/mailboxes?q=a%00b", headers=h),
        client.get("/api/v1/messages/99999999999999999999999", headers=h),
        client.post(
            "/api/v1/lists",
            data='{"scope": "global", "action": "allow", "pattern": "x\\u0000.no"}',
            content_type="application/json",
            headers=h,
        ),
        client.post(
            "/api/v1/lists",
            data='{"scope": "global", "action": "allow", "pattern": "\\ud800.no"}',
            content_type="application/json",
            headers=h,
        ),
    ]
    assert [r.status_code for r in cases] == [400] * 7 + [404, 400, 400]
    assert all(r.is_json and r.json["error"]["message"] for r in cases)
    assert client.get("/api/v1/nowhere", headers=h).json["error"]["status"] == 404
    assert client.put("/api/v1/stats", headers=h).json["error"]["status"] == 405


def test_search_finds_by_sender_and_subject_within_the_token_scope(
    client, database, store, two_domains
):
    ola, mette = two_domains
    hold_message(
        database,
        store,
        ola.id,
        message(subject="Invoice 42", sender="bill@supplier.no"),
        sender="bill@supplier.no",
    )
    hold_message(
        database,
        store,
        ola.id,
        message(subject="Lunch", sender="kari@friends.no"),
        sender="kari@friends.no",
    )
    hold_message(
        database,
        store,
        mette.id,
        message(subject="Invoice 7", to="mette@example.dk", sender="bill@supplier.no"),
        sender="bill@supplier.no",
    )
    operator = bearer(make_token(database, "ops"))
    found = client.get("/api/v1/messages?sender=supplier.no", headers=operator).json
    assert sorted(m["mailbox"] for m in found["messages"]) == ["mette@example.dk", "ola@example.no"]
    assert found["total"] == 2
    words = client.get("/api/v1/messages?subject=invoice", headers=operator).json
    assert {m["subject"] for m in words["messages"]} == {"Invoice 42", "Invoice 7"}
    scoped = bearer(make_token(database, "no-admin", ["example.no"]))
    mine = client.get("/api/v1/messages?sender=supplier.no", headers=scoped).json
    assert [m["mailbox"] for m in mine["messages"]] == ["ola@example.no"]
    everything = client.get("/api/v1/messages?status=any&limit=1", headers=scoped).json
    assert everything["total"] == 2 and len(everything["messages"]) == 1
    rest = client.get(
        "/api/v1/messages",
        query_string={"status": "any", "cursor": everything["next_cursor"]},
        headers=scoped,
    ).json
    assert len(rest["messages"]) == 1 and rest["next_cursor"] is None
    assert client.get("/api/v1/messages?cursor=[1", headers=scoped).status_code == 400
    assert client.get("/api/v1/messages?since=yesterday", headers=scoped).status_code == 400


def test_bulk_release_by_search_only_within_the_token_domains(
    client, database, store, two_domains, smtp_sink
):
    ola, mette = two_domains
    for n in range(3):
        hold_message(
            database,
            store,
            ola.id,
            message(subject=f"Invoice {n}", sender="bill@supplier.no"),
            sender="bill@supplier.no",
        )
    theirs = hold_message(
        database,
        store,
        mette.id,
        message(subject="Invoice 7", to="mette@example.dk", sender="bill@supplier.no"),
        sender="bill@supplier.no",
    )
    scoped = bearer(make_token(database, "no-admin", ["example.no"]))
    created = client.post(
        "/api/v1/bulk",
        json={"action": "release", "query": {"sender": "bill@supplier.no"}},
        headers=scoped,
    )
    assert created.status_code == 202 and created.json["total"] == 3
    assert len(smtp_sink.wait_for(3)) == 3
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/bulk/{created.json['id']}", headers=scoped).json
        if job["status"] == "done":
            break
        time.sleep(0.1)
    assert (job["status"], job["done"]) == ("done", 3)
    assert all(m.rcpt_tos == ["ola@example.no"] for m in smtp_sink.messages)
    with database.session_scope() as session:
        assert session.get(Message, theirs).status == Status.NEW
    refused = client.post("/api/v1/bulk", json={"action": "release", "query": {}}, headers=scoped)
    assert refused.status_code == 400


# Every API route, as a token limited to example.no tries it on example.dk, and the
# status that must come back. A new API route fails the coverage test until it is added.
SCOPED_ROUTES = {
    "api.openapi": [("GET", "/api/v1/openapi.json", None, 200)],
    "api.find": [("GET", "/api/v1/messages?recipient=example.dk&status=any", None, 200)],
    "api.message": [("GET", "/api/v1/messages/{theirs}", None, 404)],
    "api.release": [("POST", "/api/v1/messages/{theirs}/release", None, 404)],
    "api.delete": [("DELETE", "/api/v1/messages/{theirs}", None, 404)],
    "api.bulk_create": [
        ("POST", "/api/v1/bulk", {"action": "delete", "query": {"recipient": "example.dk"}}, 202)
    ],
    "api.bulk_status": [("GET", "/api/v1/bulk/{job}", None, 404)],
    "api.list_entries": [
        ("GET", "/api/v1/lists?scope=domain&owner=example.dk", None, 404),
        ("GET", "/api/v1/lists?scope=global", None, 403),
    ],
    "api.add_entry": [
        (
            "POST",
            "/api/v1/lists",
            {"scope": "mailbox", "owner": "mette@example.dk", "action": "allow", "pattern": "a.no"},
            404,
        )
    ],
    "api.remove_entry": [("DELETE", "/api/v1/lists/{entry}", None, 404)],
    "api.find_mailboxes": [("GET", "/api/v1/mailboxes?q=mette", None, 200)],
    "api.mailbox": [("GET", "/api/v1/mailboxes/mette@example.dk", None, 404)],
    "api.login_link": [("POST", "/api/v1/mailboxes/mette@example.dk/login-link", None, 404)],
    "api.report_status": [("GET", "/api/v1/reports/status", None, 403)],
    "api.statistics": [("GET", "/api/v1/stats?domain=example.dk", None, 404)],
    "api.ingest": [("POST", "/api/v1/ingest", b"Subject: x\r\n\r\nx\r\n", 422)],
}


def test_every_api_route_is_covered(app):
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert {e for e in endpoints if e.startswith("api.")} == set(SCOPED_ROUTES)


def test_a_domain_token_gets_nothing_of_another_domain_on_any_route(
    client, database, store, held, smtp_sink
):
    from cleanmail import bulk, lists, search, staff
    from cleanmail.models import BulkJob, Mailbox

    _ours, theirs = held
    with database.session_scope(write=True) as session:
        mette = session.scalar(select(Mailbox).where(Mailbox.address == "mette@example.dk"))
        entry = lists.add(session, ACTOR, "block", "evil.example", mailbox=mette)
        job = bulk.create(
            session,
            staff.OPERATOR,
            audit.Actor("api", "ops"),
            "delete",
            search.Query(ids=(theirs,)),
        )
        ids = {"theirs": theirs, "entry": entry.id, "job": job.id}
    h = {
        **bearer(make_token(database, "no-admin", ["example.no"])),
        "X-Rspamd-Rcpt": "mette@example.dk",
    }
    for endpoint, attempts in SCOPED_ROUTES.items():
        for method, template, payload, expected in attempts:
            path = template.format(**ids)
            kwargs = {"json": payload} if isinstance(payload, dict) else {"data": payload}
            response = client.open(path, method=method, headers=h, **kwargs)
            assert response.status_code == expected, (endpoint, path, response.get_data())
            body = response.get_data(as_text=True)
            if endpoint != "api.openapi":
                # An error may repeat what was asked; no answer carries their data.
                assert '"mette@example.dk"' not in body and "Faktura" not in body, endpoint
    with database.session_scope() as session:
        assert session.get(Message, theirs).status == Status.NEW
        assert session.get(ListEntry, entry.id) is not None
        mine = session.scalars(select(BulkJob).where(BulkJob.actor == "no-admin")).one()
        assert mine.total == 0
    assert smtp_sink.messages == []
