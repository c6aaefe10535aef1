"""Getting in: report links, fresh links by mail, password and two-step login, logout."""

from __future__ import annotations

import email
import email.policy
import re
import time
from datetime import timedelta
from urllib.parse import urlsplit

import argon2
import pyotp
import pytest
from click.testing import CliRunner
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import select

from cleanmail import logins, passwords, quarantine, scheduler, totp
from cleanmail.cli import cli, links  # noqa: F401 - registers the command
from cleanmail.models import AuditEvent, EndedSession, Mailbox, RateLimit
from cleanmail.web import auth
from tests.conftest import FilterProcess

PASSWORD = "Hemmelig42"
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


@pytest.fixture(autouse=True)
def no_slowdown(monkeypatch):
    """Failed attempts normally wait most of a second; not in tests."""
    monkeypatch.setattr(auth, "FAILURE_DELAY", 0)


def change(database, mailbox_id: int, **values) -> None:
    """Set columns of a mailbox directly, as an operator or another page would."""
    with database.session_scope(write=True) as session:
        mailbox = session.get(Mailbox, mailbox_id)
        for name, value in values.items():
            setattr(mailbox, name, value)


def link_path(app, mailbox) -> str:
    """The path of a fresh report link for a mailbox."""
    with app.app_context():
        url = auth.login_url(mailbox)
    assert url.startswith(app.config["CLEANMAIL"].base_url + "/l/")
    return urlsplit(url).path


def csrf(client, page: str = "/login") -> str:
    """The CSRF token of the form on a page, as a browser would submit it."""
    html = client.get(page).get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def post(client, path: str, page: str = "/login", **form):
    """Submit a form taken from a page."""
    return client.post(path, data={"csrf_token": csrf(client, page), **form})


def logged_in(client) -> bool:
    """Whether the client's session reaches the quarantine (else it is sent to log in)."""
    response = client.get("/")
    assert response.status_code in (200, 302), response.status_code
    return response.status_code == 200


def actions(database) -> list[tuple[str, dict]]:
    """The audit log, oldest first."""
    with database.session_scope() as session:
        return [(e.action, e.detail) for e in session.scalars(select(AuditEvent).order_by("id"))]


def mailed_link(message) -> str:
    """The path of the login link in a mail that Cleanmail sent."""
    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    text = parsed.get_body(("plain",)).get_content()
    return urlsplit(re.search(r"http\S+/l/\S+", text).group(0)).path


class PastSigner(TimestampSigner):
    """A signer whose clock stands 16 days back."""

    def get_timestamp(self) -> int:
        return int(time.time()) - 16 * 86400


def expired_path(app, mailbox) -> str:
    """A report link signed 16 days ago."""
    keys = app.config["CLEANMAIL"].secret_keys
    serializer = URLSafeTimedSerializer(keys, salt="cleanmail.login", signer=PastSigner)
    return "/l/" + serializer.dumps({"m": mailbox.id, "v": mailbox.key_version})


def test_link_logs_in_reusably_and_leaves_the_url(app, client, owner, database):
    path = link_path(app, owner)
    response = client.get(path, headers={"Accept-Language": "en"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/" and "/l/" not in response.headers["Location"]
    assert logged_in(client)
    other = app.test_client()
    assert other.get(path).status_code == 303 and logged_in(other)  # used again
    logins = [d for a, d in actions(database) if a == "login"]
    assert logins == [{"method": "link"}, {"method": "link"}]
    with database.session_scope() as session:
        assert session.get(Mailbox, owner.id).last_login_at is not None


def test_expired_link_mails_a_fresh_one(app, client, database, owner, smtp_sink):
    with database.session_scope(write=True) as session:
        session.get(Mailbox, owner.id).language = "da"
    response = client.get(expired_path(app, owner), headers={"Accept-Language": "en"})
    page = response.get_data(as_text=True)
    assert response.status_code == 410 and "udløbet" in page
    assert '<html lang="da">' in page  # the owner's language, not the browser's
    assert owner.address not in page
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    hidden = re.search(r'name="token" value="([^"]+)"', page).group(1)
    sent = client.post("/link", data={"csrf_token": token, "token": hidden})
    assert sent.status_code == 200 and '<html lang="da">' in sent.get_data(as_text=True)
    (message,) = smtp_sink.wait_for(1)
    assert message.mail_from in ("", "<>") and message.rcpt_tos == [owner.address]
    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed.get_content_type() == "multipart/alternative"
    assert client.get(mailed_link(message)).status_code == 303 and logged_in(client)


def test_tampered_link(app, client, owner):
    path = link_path(app, owner)
    for bad in (path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB"), "/l/garbage"):
        response = client.get(bad)
        page = response.get_data(as_text=True)
        assert response.status_code == 400 and "not valid" in page
        assert 'name="address"' in page and owner.address not in page
        assert not logged_in(client)


def test_revoked_and_disabled_links(app, client, owner, database):
    path = link_path(app, owner)
    change(database, owner.id, key_version=owner.key_version + 1)
    assert client.get(path).status_code == 400 and not logged_in(client)
    owner.key_version += 1
    path = link_path(app, owner)
    assert client.get(path).status_code == 303
    change(database, owner.id, disabled=True)
    assert not logged_in(client)  # the session ends with the mailbox
    assert client.get(path).status_code == 400 and not logged_in(client)


def test_new_link_same_answer_mail_only_for_known(app, client, owner, smtp_sink, database):
    unknown = post(client, "/link", address="nobody@example.no")
    known = post(client, "/link", address="  OLA@Example.no ")
    assert unknown.status_code == known.status_code == 200
    assert unknown.get_data() == known.get_data()
    (message,) = smtp_sink.wait_for(1)
    time.sleep(0.2)
    assert len(smtp_sink.messages) == 1 and message.rcpt_tos == ["ola@example.no"]
    invalid = post(client, "/link", address="not an address")
    assert invalid.status_code == 400 and "valid e-mail address" in invalid.get_data(as_text=True)
    assert client.get(mailed_link(message)).status_code == 303 and logged_in(client)
    requests = [d for a, d in actions(database) if a == "login_link.request"]
    assert [(d["address"], d["sent"]) for d in requests] == [
        ("nobody@example.no", False),
        ("ola@example.no", True),
    ]


def test_refused_link_mail_is_logged_same_answer(client, owner, smtp_sink, caplog):
    smtp_sink.refuse = "550 5.7.1 no thanks"
    response = post(client, "/link", address=owner.address)
    assert response.status_code == 200 and "on its way" in response.get_data(as_text=True)
    deadline = time.monotonic() + 10
    while "mailing a login link" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "mailing a login link to ola@example.no failed" in caplog.text


def test_link_mail_is_tried_again_while_the_relay_is_down(client, owner, smtp_sink, monkeypatch):
    monkeypatch.setattr(auth, "LINK_RETRY_DELAYS", (0.3, 0.3, 0.3))
    smtp_sink.refuse = "451 4.3.0 try later"
    response = post(client, "/link", address=owner.address)
    assert response.status_code == 200 and "on its way" in response.get_data(as_text=True)
    time.sleep(0.4)  # the first try, and maybe the second, are refused
    assert smtp_sink.messages == []
    smtp_sink.refuse = None
    (message,) = smtp_sink.wait_for(1)
    assert message.rcpt_tos == ["ola@example.no"]
    assert client.get(mailed_link(message)).status_code == 303 and logged_in(client)


def test_link_requests_are_rate_limited(client, owner, monkeypatch):
    for _ in range(3):
        assert post(client, "/link", address="nobody@example.no").status_code == 200
    limited = post(client, "/link", address="nobody@example.no")
    assert limited.status_code == 429 and "Try again" in limited.get_data(as_text=True)
    # A refused request counts towards nothing, so the client has used 3 of its 5.
    monkeypatch.setattr(auth, "LINKS_PER_CLIENT", auth.Limit(5, timedelta(hours=1)))
    assert post(client, "/link", address="a@example.no").status_code == 200
    assert post(client, "/link", address="b@example.no").status_code == 200
    assert post(client, "/link", address="c@example.no").status_code == 429


def test_one_client_cannot_use_up_everyones_links(client, owner, monkeypatch):
    monkeypatch.setattr(auth, "LINKS_PER_CLIENT", auth.Limit(2, timedelta(hours=1)))
    monkeypatch.setattr(auth, "LINKS_OVERALL", auth.Limit(5, timedelta(hours=1)))
    for n in range(10):  # one greedy client: 2 taken, 8 refused without counting overall
        post(client, "/link", address=f"x{n}@example.no")
    other = client.application.test_client()
    other.environ_base.update(REMOTE_ADDR="192.0.2.99", HTTP_ACCEPT_LANGUAGE="en")
    assert post(other, "/link", address=owner.address).status_code == 200


def test_password_login(app, client, owner, database):
    change(database, owner.id, password_hash=passwords.hash_password(PASSWORD))
    wrong = post(client, "/login", address=owner.address, password="Wrong1234")
    assert wrong.status_code == 200 and "wrong" in wrong.get_data(as_text=True)
    assert not logged_in(client)
    right = post(client, "/login", address="Ola@Example.no", password=PASSWORD)
    assert right.status_code == 303 and right.headers["Location"] == "/"
    assert logged_in(client)
    events = actions(database)
    assert ("login.failed", {"address": owner.address, "step": "password"}) in events
    assert events[-1] == ("login", {"method": "password"})
    with database.session_scope() as session:  # success forgets the address's failures
        keys = set(session.scalars(select(RateLimit.key)))
    assert f"login-failed:address:{owner.address}" not in keys


def test_old_hash_is_upgraded_on_login(client, owner, database):
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    change(database, owner.id, password_hash=weak)
    assert post(client, "/login", address=owner.address, password=PASSWORD).status_code == 303
    with database.session_scope() as session:
        stored = session.get(Mailbox, owner.id).password_hash
    assert stored != weak and not passwords.needs_rehash(stored)
    assert passwords.verify(stored, PASSWORD)


def test_unknown_disabled_and_passwordless_cannot_log_in(client, owner, database):
    assert post(client, "/login", address=owner.address, password=PASSWORD).status_code == 200
    assert post(client, "/login", address="x@example.no", password=PASSWORD).status_code == 200
    change(database, owner.id, password_hash=passwords.hash_password(PASSWORD), disabled=True)
    assert post(client, "/login", address=owner.address, password=PASSWORD).status_code == 200
    assert not logged_in(client)


def test_lockout_spares_link_login(app, client, owner, database, monkeypatch):
    change(database, owner.id, password_hash=passwords.hash_password(PASSWORD))
    for _ in range(10):
        assert (
            post(client, "/login", address=owner.address, password="Guess1234").status_code == 200
        )
    locked = post(client, "/login", address=owner.address, password=PASSWORD)
    assert locked.status_code == 429 and "Too many" in locked.get_data(as_text=True)
    assert not logged_in(client)
    owners_phone = app.test_client()
    assert owners_phone.get(link_path(app, owner)).status_code == 303 and logged_in(owners_phone)
    # Per client too: one address after another from the same place.
    monkeypatch.setattr(auth, "FAILURES_PER_CLIENT", auth.Limit(11, timedelta(minutes=15)))
    assert post(client, "/login", address="a@example.no", password="x").status_code == 200
    assert post(client, "/login", address="b@example.no", password="x").status_code == 429


def test_totp_step(app, client, owner, database, monkeypatch):
    change(database, owner.id, password_hash=passwords.hash_password(PASSWORD), totp_secret=SECRET)
    first = post(client, "/login", address=owner.address, password=PASSWORD, next="/settings/")
    assert first.status_code == 303 and first.headers["Location"] == "/login/totp"
    assert not logged_in(client)
    wrong = post(client, "/login/totp", "/login/totp", code="000000")
    assert wrong.status_code == 200 and "not right" in wrong.get_data(as_text=True)
    code = pyotp.TOTP(SECRET).now()
    right = post(client, "/login/totp", "/login/totp", code=code)
    assert right.status_code == 303 and right.headers["Location"] == "/settings/"
    assert logged_in(client)
    post(client, "/logout", "/l/x")
    post(client, "/login", address=owner.address, password=PASSWORD)
    replay = post(client, "/login/totp", "/login/totp", code=code)
    assert replay.status_code == 200 and not logged_in(client)
    assert actions(database)[-1] == ("login.failed", {"address": owner.address, "step": "totp"})
    monkeypatch.setattr(auth, "TOTP_PENDING_SECONDS", -1)
    gone = client.get("/login/totp")
    assert gone.status_code == 303 and gone.headers["Location"] == "/login"


def test_recovery_code_works_once(app, client, owner, database):
    change(database, owner.id, password_hash=passwords.hash_password(PASSWORD), totp_secret=SECRET)
    with database.session_scope(write=True) as session:
        codes = totp.new_recovery_codes(session, session.get(Mailbox, owner.id))
    post(client, "/login", address=owner.address, password=PASSWORD)
    used = post(client, "/login/totp", "/login/totp", recovery=codes[0])
    assert used.status_code == 303
    assert "9 are left" in client.get(used.headers["Location"]).get_data(as_text=True)
    assert logged_in(client)
    post(client, "/logout", "/l/x")
    post(client, "/login", address=owner.address, password=PASSWORD)
    again = post(client, "/login/totp", "/login/totp", recovery=codes[0])
    assert again.status_code == 200 and not logged_in(client)


def test_wrong_codes_are_rate_limited(client, owner, database):
    change(database, owner.id, password_hash=passwords.hash_password(PASSWORD), totp_secret=SECRET)
    post(client, "/login", address=owner.address, password=PASSWORD)
    for _ in range(5):
        post(client, "/login/totp", "/login/totp", recovery="wrong-guess")
    limited = post(client, "/login/totp", "/login/totp", code=pyotp.TOTP(SECRET).now())
    assert limited.status_code == 429 and not logged_in(client)


EVIL_NEXT = [
    "//evil.example/",
    "https://evil.example/",
    "/\\evil.example",
    "\\\\evil.example",
    "javascript:alert(1)",
    "/\t/evil.example",
    "http:/evil.example",
]


def test_next_never_leaves_the_site(app, client, owner, database):
    change(database, owner.id, password_hash=passwords.hash_password(PASSWORD))
    for target in EVIL_NEXT[:2]:
        response = post(client, "/login", address=owner.address, password=PASSWORD, next=target)
        assert response.status_code == 303 and response.headers["Location"] == "/"
        assert 'name="next"' not in client.get("/login?next=" + target).get_data(as_text=True)
        post(client, "/logout", "/l/x")
    client.get(link_path(app, owner))
    for target in EVIL_NEXT:  # the same check guards the redirect of a logged-in visitor
        assert client.get("/login", query_string={"next": target}).headers["Location"] == "/"


def test_next_within_the_site_is_followed(client, owner, database):
    change(database, owner.id, password_hash=passwords.hash_password(PASSWORD))
    page = client.get("/login?next=/settings/%3Fx%3D1").get_data(as_text=True)
    assert 'name="next" value="/settings/?x=1"' in page
    response = post(
        client, "/login", address=owner.address, password=PASSWORD, next="/settings/?x=1"
    )
    assert response.headers["Location"] == "/settings/?x=1"


def test_csrf_is_enforced(app, client, owner, database):
    assert app.config.get("WTF_CSRF_ENABLED", True)
    change(database, owner.id, password_hash=passwords.hash_password(PASSWORD))
    response = client.post("/login", data={"address": owner.address, "password": PASSWORD})
    assert response.status_code == 400 and not logged_in(client)
    assert client.post("/link", data={"address": owner.address}).status_code == 400
    client.get(link_path(app, owner))
    assert client.post("/logout").status_code == 400 and logged_in(client)


def test_logout(app, client, owner):
    client.get(link_path(app, owner))
    response = post(client, "/logout", "/l/x")
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert "logged out" in client.get("/login").get_data(as_text=True)
    assert not logged_in(client)


def test_logout_ends_a_copied_cookie_but_not_other_sessions(app, client, owner, database):
    client.get(link_path(app, owner))
    copied = client.get_cookie("cleanmail_session").value
    other = app.test_client()  # the owner's other browser
    other.get(link_path(app, owner))
    assert logged_in(client) and logged_in(other)
    post(client, "/logout", "/l/x")
    thief = app.test_client()
    thief.set_cookie("cleanmail_session", copied)
    assert not logged_in(thief)
    assert logged_in(other)
    with database.session_scope() as session:
        assert len(session.scalars(select(EndedSession)).all()) == 1


def test_the_purge_job_forgets_old_ended_sessions_and_rate_limits(config, database, monkeypatch):
    now = quarantine.utcnow()
    with database.session_scope(write=True) as session:
        logins.end(session, "long-expired")
        logins.end(session, "still-valid")
        session.flush()
        old = session.get(EndedSession, "long-expired")
        old.ended_at = now - logins.LIFETIME - timedelta(hours=2)
        session.add(RateLimit(key="old", window_start=now - timedelta(days=2), count=3))
        session.add(RateLimit(key="current", window_start=now, count=1))
    monkeypatch.setattr(scheduler, "_runtime", scheduler.Runtime(config, database))
    scheduler.purge_job()
    with database.session_scope() as session:
        assert session.scalars(select(EndedSession.sid)).all() == ["still-valid"]
        assert session.scalars(select(RateLimit.key)).all() == ["current"]


def test_pages_are_accessible_forms(client):
    page = client.get("/login").get_data(as_text=True)
    for field in ('for="address"', 'for="password"', 'for="link-address"'):
        assert field in page
    assert 'autocomplete="username"' in page and 'autocomplete="current-password"' in page
    assert "<script>" not in page and "style=" not in page


def test_cli_login_link(app, client, owner, config, database):
    env = FilterProcess(config).environment()
    result = CliRunner().invoke(cli, ["login-link", "OLA@example.no"], env=env)
    assert result.exit_code == 0, result.output
    url = result.output.strip()
    assert url.startswith(config.base_url + "/l/") and "\n" not in url
    assert client.get(urlsplit(url).path).status_code == 303 and logged_in(client)
    assert ("login_link.issue", {"address": owner.address}) in actions(database)
    for bad in ("nobody@example.no", "not an address"):
        failed = CliRunner().invoke(cli, ["login-link", bad], env=env)
        assert failed.exit_code == 1 and failed.output.count("\n") == 1
