"""The owner's whitelist and blacklist pages."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from cleanmail import audit, lists, mailboxes
from cleanmail.models import AuditEvent, ListEntry
from tests.conftest import login_as

OPERATOR = audit.Actor("operator", "test")


def csrf(page: bytes) -> str:
    """The CSRF token of the first form on a rendered page."""
    found = re.search(rb'name="csrf_token" value="([^"]+)"', page)
    assert found, "no CSRF token on the page"
    return found.group(1).decode()


def post(client, kind: str, action: str, **form: str):
    """Post one of the list forms with a token from the list page."""
    token = csrf(client.get(f"/lists/{kind}").data)
    return client.post(f"/lists/{kind}/{action}", data={"csrf_token": token, **form})


def entries(database, mailbox_id: int) -> dict[str, str]:
    """A mailbox's list entries: pattern -> action."""
    with database.session_scope() as session:
        rows = session.scalars(select(ListEntry).where(ListEntry.mailbox_id == mailbox_id))
        return {row.pattern: row.action for row in rows}


def events(database, mailbox_id: int) -> list[tuple[str, dict]]:
    """The audit events about a mailbox's lists, oldest first."""
    with database.session_scope() as session:
        rows = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.mailbox_id == mailbox_id, AuditEvent.action.like("list.%"))
            .order_by(AuditEvent.id)
        )
        return [(row.action, row.detail) for row in rows]


@pytest.mark.parametrize("kind, other", [("allow", "block"), ("block", "allow")])
def test_add_move_and_remove(client, database, owner, kind: str, other: str) -> None:
    login_as(client, owner)
    page = client.get(f"/lists/{kind}")
    assert page.status_code == 200
    assert b"news-*@example.com" in page.data  # the forms accepted are explained

    forms = "Ola@Example.COM, example.org *@shop.test\n*.spam.test news-*@paper.test"
    response = post(client, kind, "add", patterns=forms)
    assert response.status_code == 302
    assert response.headers["Location"].endswith(f"/lists/{kind}")
    expected = {"ola@example.com", "example.org", "shop.test", "*.spam.test", "news-*@paper.test"}
    assert entries(database, owner.id) == dict.fromkeys(expected, kind)
    page = client.get(f"/lists/{kind}")
    assert b"ola@example.com" in page.data and b"flash success" in page.data

    assert post(client, kind, "move", pattern="example.org").status_code == 302
    assert entries(database, owner.id)["example.org"] == other
    assert b"example.org" in client.get(f"/lists/{other}").data
    assert b"<code>example.org</code>" not in client.get(f"/lists/{kind}").data

    assert post(client, kind, "remove", pattern="ola@example.com").status_code == 302
    assert "ola@example.com" not in entries(database, owner.id)

    actions = [action for action, _detail in events(database, owner.id)]
    assert actions == [f"list.{kind}"] * 5 + [f"list.{other}", "list.remove"]
    assert events(database, owner.id)[5][1]["moved"] is True


def test_adding_to_the_other_list_moves_and_says_so(client, database, owner) -> None:
    login_as(client, owner)
    post(client, "allow", "add", patterns="friend@example.com")
    response = post(client, "block", "add", patterns="FRIEND@example.com")
    assert response.status_code == 302
    assert entries(database, owner.id) == {"friend@example.com": "block"}
    page = client.get("/lists/block").data.decode()
    assert "Moved from the whitelist to the blacklist: friend@example.com" in page
    assert "friend@example.com" not in client.get("/lists/allow").data.decode()


def test_adding_twice_keeps_one_entry(client, database, owner) -> None:
    login_as(client, owner)
    post(client, "allow", "add", patterns="a@example.com")
    post(client, "allow", "add", patterns="a@example.com A@EXAMPLE.COM")
    assert entries(database, owner.id) == {"a@example.com": "allow"}
    assert "Already on the whitelist: a@example.com" in client.get("/lists/allow").data.decode()
    assert len(events(database, owner.id)) == 1


@pytest.mark.parametrize(
    "bad",
    ["not an address", "ola@", "@@example.com", "example", "a@-bad-.com", "x" * 321],
)
def test_invalid_entries_change_nothing(client, database, owner, bad: str) -> None:
    login_as(client, owner)
    response = post(client, "block", "add", patterns=f"good@example.com {bad}")
    assert response.status_code == 400
    text = response.data.decode()
    assert 'class="errors"' in text and 'aria-invalid="true"' in text
    assert "is not an e-mail address or a domain" in text or "longer than 320" in text
    assert entries(database, owner.id) == {}
    assert events(database, owner.id) == []


def test_each_invalid_entry_gets_its_own_message(client, database, owner) -> None:
    login_as(client, owner)
    response = post(client, "allow", "add", patterns="bad1 ok@example.com bad2")
    text = response.data.decode()
    assert "“bad1” is not an e-mail address or a domain." in text
    assert "“bad2” is not an e-mail address or a domain." in text
    assert "ok@example.com" in text  # the input is kept for correcting
    empty = post(client, "allow", "add", patterns="   ")
    assert empty.status_code == 400 and entries(database, owner.id) == {}


def test_entries_are_escaped(client, database, owner) -> None:
    login_as(client, owner)
    response = post(client, "allow", "add", patterns="<script>alert(1)</script>")
    assert response.status_code == 400
    assert b"<script>alert" not in response.data


def test_an_owner_sees_and_changes_only_their_own_lists(client, database, owner) -> None:
    with database.session_scope(write=True) as session:
        kari = mailboxes.add_mailbox(session, OPERATOR, "kari@example.no")
        lists.add(session, OPERATOR, "allow", "secret-friend@example.com", mailbox=kari)
    login_as(client, owner)
    assert b"secret-friend" not in client.get("/lists/allow").data
    assert post(client, "allow", "remove", pattern="secret-friend@example.com").status_code == 404
    assert post(client, "allow", "move", pattern="secret-friend@example.com").status_code == 404
    assert entries(database, kari.id) == {"secret-friend@example.com": "allow"}
    # The owner's own copy of the same pattern is theirs alone.
    post(client, "block", "add", patterns="secret-friend@example.com")
    assert entries(database, kari.id) == {"secret-friend@example.com": "allow"}
    assert entries(database, owner.id) == {"secret-friend@example.com": "block"}


def test_remove_from_the_wrong_list_is_refused(client, database, owner) -> None:
    login_as(client, owner)
    post(client, "allow", "add", patterns="a@example.com")
    assert post(client, "block", "remove", pattern="a@example.com").status_code == 404
    assert post(client, "block", "remove", pattern="not valid").status_code == 404
    assert entries(database, owner.id) == {"a@example.com": "allow"}


def test_lists_need_login_and_csrf(client, owner) -> None:
    assert client.get("/lists/allow").status_code == 302
    login_as(client, owner)
    response = client.post("/lists/allow/add", data={"patterns": "a@example.com"})
    assert response.status_code == 400
    assert client.get("/lists/other").status_code == 404
