"""The owner's quarantine pages and actions, against both databases and a real SMTP sink."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from cleanmail import audit, mailboxes, reasons
from cleanmail.models import AuditEvent, ListEntry, Message, Status
from cleanmail.store import digest
from cleanmail.web import quarantine as views
from tests.conftest import hold_message, login_as
from tests.messages import message

ACTOR = audit.Actor("operator", "test")
T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
SPAM = [{"code": "SUBJECT_CAPS", "text": "the subject is mostly capital letters", "score": 1.0}]
XSS = "<script>alert(1)</script>"
HOSTILE_HTML = (
    '<p>Hei</p><script>alert(1)</script><img src="x" onerror="alert(2)">'
    '<img src="https://tracker.example/p.gif"><a href="javascript:alert(3)">x</a>'
    '<iframe src="https://evil.example/"></iframe><form><input></form>'
    "<style>@import url(https://evil.example/x.css)</style>"
)


def hold(database, store, mailbox_id, raw, *, at=T0, sender="spam@spam.example", why=SPAM):
    """Hold a raw message for a mailbox the way the filter does; its id."""
    return hold_message(database, store, mailbox_id, raw, at=at, sender=sender, reasons=why)


def other_owner(database):
    with database.session_scope(write=True) as session:
        return mailboxes.add_mailbox(session, ACTOR, "kari@example.no")


def token(client, path="/"):
    """The CSRF token of a rendered page's form."""
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def row(database, message_id):
    with database.session_scope() as session:
        return session.get(Message, message_id)


def subjects(page: str) -> list[str]:
    return re.findall(r'href="/messages/\d+">([^<]*)</a>', page)


@pytest.fixture
def ola(client, owner):
    login_as(client, owner)
    return owner


def test_list_shows_own_new_messages_newest_first(client, ola, database, store):
    kari = other_owner(database)
    for n in range(3):
        hold(database, store, ola.id, message(subject=f"Spam {n}"), at=T0 + timedelta(hours=n))
    hold(database, store, kari.id, message(subject="Kari's spam"))
    released = hold(
        database, store, ola.id, message(subject="Released one"), at=T0 + timedelta(hours=5)
    )
    with database.session_scope(write=True) as session:
        session.get(Message, released).status = Status.RELEASED
    page = client.get("/").get_data(as_text=True)
    assert subjects(page) == ["Spam 2", "Spam 1", "Spam 0"]
    assert "3 new messages are waiting" in page
    assert "kari@example.com" in page
    assert "The subject is mostly capital letters" in page
    assert re.search(r"<td class=\"size\">\d+ B</td>", page)
    shown = client.get("/?released=1").get_data(as_text=True)
    assert subjects(shown)[0] == "Released one"


def test_pages_go_back_and_forth(client, ola, database, store, monkeypatch):
    monkeypatch.setattr(views, "PAGE_SIZE", 2)
    for n in range(5):  # two at the same time: the id breaks the tie
        at = T0 + timedelta(minutes=min(n, 3))
        hold(database, store, ola.id, message(subject=f"M{n}"), at=at)
    first = client.get("/").get_data(as_text=True)
    assert subjects(first) == ["M4", "M3"]
    assert 'rel="prev"' not in first
    older = re.search(r'rel="next" href="([^"]+)"', first).group(1).replace("&amp;", "&")
    second = client.get(older).get_data(as_text=True)
    assert subjects(second) == ["M2", "M1"]
    older = re.search(r'rel="next" href="([^"]+)"', second).group(1).replace("&amp;", "&")
    third = client.get(older).get_data(as_text=True)
    assert subjects(third) == ["M0"]
    assert 'rel="next"' not in third
    newer = re.search(r'rel="prev" href="([^"]+)"', third).group(1).replace("&amp;", "&")
    assert subjects(client.get(newer).get_data(as_text=True)) == ["M2", "M1"]
    assert client.get("/?before=garbage&after=1-x").status_code == 200


def test_search_and_filters(client, ola, database, store):
    gtube = [{"code": "GTUBE", "text": "known spam test pattern (GTUBE)", "score": 1000}]
    hold(database, store, ola.id, message(subject="Cheap WATCHES", sender="a@watch.example"))
    hold(database, store, ola.id, message(subject="100% off_now", sender='"Bob" <bob@x.example>'))
    hold(database, store, ola.id, message(subject="Test", sender="t@t.example"), why=gtube)
    hold(database, store, ola.id, message(subject="Old one"), at=T0 - timedelta(days=10))

    def found(query):
        return sorted(subjects(client.get("/?" + query).get_data(as_text=True)))

    assert found("q=watches") == ["Cheap WATCHES"]
    assert found("q=BOB") == ["100% off_now"]
    assert found("q=WATCH.EXAMPLE") == ["Cheap WATCHES"]
    assert found("q=100%25") == ["100% off_now"]
    assert found("q=%25") == ["100% off_now"]
    assert found("q=_") == ["100% off_now"]
    assert found("reason=GTUBE") == ["Test"]
    assert found("reason=GTUBE&q=watches") == []
    assert found("until=2026-11-15") == ["Old one"]
    assert found("since=2026-11-20&until=2026-11-22") == ["100% off_now", "Cheap WATCHES", "Test"]
    page = client.get("/?since=not-a-date").get_data(as_text=True)
    assert "was not understood" in page
    assert len(subjects(page)) == 4


def test_another_owners_message_is_not_found_anywhere(client, ola, database, store, smtp_sink):
    kari = other_owner(database)
    theirs = hold(database, store, kari.id, message(subject="Private"))
    csrf = token(client)
    for path in (f"/messages/{theirs}", f"/messages/{theirs}/preview"):
        assert client.get(path).status_code == 404
    for action in ("release", "delete", "block"):
        response = client.post(f"/messages/{theirs}/{action}", data={"csrf_token": csrf})
        assert response.status_code == 404
    mine = hold(database, store, ola.id, message(subject="Mine"))
    response = client.post(
        "/messages/bulk",
        data={"csrf_token": csrf, "action": "release", "ids": [str(mine), str(theirs)]},
    )
    assert response.status_code == 404
    assert row(database, theirs).status == Status.NEW
    assert row(database, mine).status == Status.NEW
    assert smtp_sink.messages == []
    with database.session_scope() as session:
        assert session.scalars(select(ListEntry)).all() == []


def test_release_delivers_the_original_once(client, ola, database, store, smtp_sink):
    raw = message(subject="Wanted")
    message_id = hold(database, store, ola.id, raw, sender="kari@example.com")
    csrf = token(client, f"/messages/{message_id}")
    response = client.post(f"/messages/{message_id}/release", data={"csrf_token": csrf})
    assert response.status_code == 302
    (received,) = smtp_sink.wait_for(1)
    assert received.mail_from == "kari@example.com"
    assert received.rcpt_tos == ["ola@example.no"]
    header, _sep, rest = received.data.partition(b"\r\n")
    assert header.startswith(b"X-Cleanmail-Released: by owner at ")
    release_id, _sep, rest = rest.partition(b"\r\n")
    assert release_id.startswith(f"X-Cleanmail-Release-ID: <{message_id}.".encode())
    assert rest == raw
    assert "1 message released" in client.get("/").get_data(as_text=True)
    client.post(f"/messages/{message_id}/release", data={"csrf_token": csrf})
    assert "already released" in client.get("/").get_data(as_text=True)
    assert len(smtp_sink.messages) == 1
    assert row(database, message_id).status == Status.RELEASED
    assert "Released to your inbox" in client.get(f"/messages/{message_id}").get_data(as_text=True)
    with database.session_scope() as session:
        events = session.scalars(select(AuditEvent.action)).all()
    assert events.count("message.release") == 1


def test_refused_release_stays_and_can_be_retried(client, ola, database, store, smtp_sink):
    message_id = hold(database, store, ola.id, message(subject="Busy"))
    csrf = token(client, f"/messages/{message_id}")
    smtp_sink.refuse = "451 4.3.0 busy"
    response = client.post(f"/messages/{message_id}/release", data={"csrf_token": csrf})
    assert response.headers["Location"].endswith(f"/messages/{message_id}")
    page = client.get(f"/messages/{message_id}").get_data(as_text=True)
    assert "did not accept 1 message." in page
    assert "Technical details" in page and "451 4.3.0 busy" in page
    assert "Try the release again" in page
    held = row(database, message_id)
    assert (held.status, held.release_error, held.release_attempts) == (
        Status.NEW,
        "451 4.3.0 busy",
        1,
    )
    assert "Release failed" in client.get("/").get_data(as_text=True)
    smtp_sink.refuse = None
    client.post(f"/messages/{message_id}/release", data={"csrf_token": csrf})
    assert len(smtp_sink.wait_for(1)) == 1
    assert row(database, message_id).status == Status.RELEASED
    assert row(database, message_id).release_error is None


@pytest.mark.parametrize(
    ("allow", "pattern"), [("sender", "kari@news.example"), ("domain", "news.example")]
)
def test_release_and_allow(client, ola, database, store, smtp_sink, allow, pattern):
    raw = message(subject="Newsletter", sender="Kari <Kari@News.example>")
    message_id = hold(database, store, ola.id, raw, sender="bounce-123@mailer.example")
    csrf = token(client, f"/messages/{message_id}")
    client.post(f"/messages/{message_id}/release", data={"csrf_token": csrf, "allow": allow})
    assert len(smtp_sink.wait_for(1)) == 1
    with database.session_scope() as session:
        (entry,) = session.scalars(select(ListEntry)).all()
    assert (entry.action, entry.pattern, entry.mailbox_id) == ("allow", pattern, ola.id)
    assert f"Added to your whitelist: {pattern}" in client.get("/").get_data(as_text=True)


def test_allow_falls_back_to_the_envelope_sender(client, ola, database, store, smtp_sink):
    raw = b"Subject: no from\r\nTo: ola@example.no\r\n\r\nhi\r\n"
    message_id = hold(database, store, ola.id, raw, sender="Env@Sender.example")
    csrf = token(client, f"/messages/{message_id}")
    client.post(f"/messages/{message_id}/release", data={"csrf_token": csrf, "allow": "sender"})
    with database.session_scope() as session:
        assert session.scalars(select(ListEntry.pattern)).all() == ["env@sender.example"]


def test_delete_and_block(client, ola, database, store):
    raw = message(subject="Go away", sender="pest@spam.example")
    message_id = hold(database, store, ola.id, raw)
    csrf = token(client, f"/messages/{message_id}")
    response = client.post(f"/messages/{message_id}/block", data={"csrf_token": csrf})
    assert response.headers["Location"].endswith(f"/messages/{message_id}")
    assert row(database, message_id).status == Status.NEW
    with database.session_scope() as session:
        (entry,) = session.scalars(select(ListEntry)).all()
        assert (entry.action, entry.pattern) == ("block", "pest@spam.example")
    assert "Added to your blacklist" in client.get("/").get_data(as_text=True)
    client.post(f"/messages/{message_id}/delete", data={"csrf_token": csrf})
    assert row(database, message_id).status == Status.DELETED
    assert not store.exists(digest(raw))
    page = client.get("/").get_data(as_text=True)
    assert "1 message deleted" in page
    assert "Go away" not in page
    assert "no longer stored" in client.get(f"/messages/{message_id}").get_data(as_text=True)


def test_bulk_actions(client, ola, database, store, smtp_sink):
    ids = [hold(database, store, ola.id, message(subject=f"B{n}")) for n in range(4)]
    csrf = token(client)
    response = client.post(
        "/messages/bulk",
        data={"csrf_token": csrf, "action": "release", "ids": [str(i) for i in ids[:2]],
              "next": "/?q=B"},
    )  # fmt: skip
    assert response.headers["Location"] == "/?q=B"
    assert len(smtp_sink.wait_for(2)) == 2
    response = client.post(
        "/messages/bulk",
        data={"csrf_token": csrf, "action": "delete", "ids": [str(i) for i in ids[2:]],
              "next": "https://evil.example/"},
    )  # fmt: skip
    assert response.headers["Location"] == "/"
    statuses = [row(database, i).status for i in ids]
    assert statuses == [Status.RELEASED] * 2 + [Status.DELETED] * 2
    response = client.post("/messages/bulk", data={"csrf_token": csrf, "action": "release"})
    assert response.status_code == 302
    assert "Select at least one" in client.get("/").get_data(as_text=True)
    bad = client.post("/messages/bulk", data={"csrf_token": csrf, "action": "x", "ids": "1"})
    assert bad.status_code == 400


def test_preview_is_sandboxed_and_cleaned(client, ola, database, store):
    raw = (
        b"From: a@b.example\r\nTo: ola@example.no\r\nSubject: Offer\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n" + HOSTILE_HTML.encode() + b"\r\n"
    )
    message_id = hold(database, store, ola.id, raw)
    page = client.get(f"/messages/{message_id}").get_data(as_text=True)
    (iframe,) = re.findall(r"<iframe[^>]*>", page)
    sandbox = re.search(r'sandbox="([^"]*)"', iframe).group(1)
    assert "allow-scripts" not in sandbox and "allow-same-origin" not in sandbox
    assert f'src="/messages/{message_id}/preview"' in iframe
    assert "alert" not in page
    response = client.get(f"/messages/{message_id}/preview")
    csp = response.headers["Content-Security-Policy"]
    assert csp.startswith(
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'"
    )
    assert response.headers["X-Frame-Options"] == "SAMEORIGIN"
    body = response.get_data(as_text=True)
    assert "<p>Hei</p>" in body
    for bad in ("<script", "onerror", "javascript:", "<iframe", "<form", "@import", "tracker"):
        assert bad not in body
    assert "Show images" in page
    shown = client.get(f"/messages/{message_id}?images=1").get_data(as_text=True)
    assert f'src="/messages/{message_id}/preview?images=1"' in shown
    with_images = client.get(f"/messages/{message_id}/preview?images=1")
    assert "img-src https: http: data:" in with_images.headers["Content-Security-Policy"]
    assert "https://tracker.example/p.gif" in with_images.get_data(as_text=True)
    assert client.get("/").headers["X-Frame-Options"] == "DENY"


def test_message_data_is_always_escaped(client, ola, database, store):
    raw = message(
        subject=f"Win {XSS}",
        sender=f'"{XSS}" <evil@evil.example>',
        body=f"Body {XSS}",
        attachments=[(f"{XSS}.pdf", b"%PDF-1.4\n", "application/pdf")],
    )
    message_id = hold(database, store, ola.id, raw, sender="evil@evil.example")
    for path in ("/", f"/messages/{message_id}", f"/messages/{message_id}?view=text"):
        page = client.get(path).get_data(as_text=True)
        assert XSS not in page, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path
    page = client.get(f"/messages/{message_id}").get_data(as_text=True)
    assert '<pre class="text">Body &lt;script&gt;' in page
    assert "PDF document" in page
    assert client.get(f"/messages/{message_id}/preview").status_code == 404  # no HTML part


def test_posts_need_the_csrf_token(client, ola, database, store, smtp_sink):
    message_id = hold(database, store, ola.id, message(subject="Protected"))
    for path in (f"/messages/{message_id}/release", f"/messages/{message_id}/delete"):
        assert client.post(path).status_code == 400
    response = client.post("/messages/bulk", data={"action": "delete", "ids": str(message_id)})
    assert response.status_code == 400
    assert row(database, message_id).status == Status.NEW
    assert smtp_sink.messages == []


def test_pages_need_a_login(client, owner):
    assert client.get("/").status_code == 302
    assert client.get("/messages/1").status_code == 302


def test_reasons_are_described_by_code():
    assert reasons.describe({"code": "GTUBE", "text": "x"}) == "Known spam test pattern (GTUBE)"
    blocked = {"code": "LIST_BLOCK_MAILBOX", "text": "sender blocked by you: *@x.example"}
    assert reasons.describe(blocked) == "The sender is on your blacklist (*@x.example)"
    attachment = {
        "code": "BLOCKED_ATTACHMENT",
        "text": "blocked attachment a: b.exe: blocked file name .exe",
    }
    assert reasons.describe(attachment) == "The attachment a: b.exe has a blocked file type"
    assert reasons.describe({"code": "NEW_ENGINE", "text": "new words"}) == "new words"
    ordered = reasons.top(
        [{"code": "A", "score": 1}, {"code": "B", "score": 3}, {"code": "MANUAL", "score": 0}]
    )
    assert [r["code"] for r in ordered] == ["MANUAL", "B"]


def test_a_from_header_of_nested_comments_does_not_break_the_list(client, owner, database, store):
    # The email package's address parser recurses once per "(": 1,500 of them is a
    # RecursionError, which took down the owner's whole quarantine list with a 500.
    raw = b"From: " + b"(" * 1500 + b"a@evil.example\r\nSubject: comments\r\n\r\nhi\r\n"
    message_id = hold_message(database, store, owner.id, raw, sender="env@evil.example")
    login_as(client, owner)
    listing = client.get("/")
    assert listing.status_code == 200
    assert "env@evil.example" in listing.get_data(as_text=True)
    page = client.get(f"/messages/{message_id}")
    assert page.status_code == 200
    assert "env@evil.example" in page.get_data(as_text=True)
