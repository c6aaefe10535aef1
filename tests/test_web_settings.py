"""The owner's settings: password, language, reports, time zone, two-step login, log out."""

from __future__ import annotations

import re
import time

import pyotp
import pytest
from sqlalchemy import select

from cleanmail import passwords
from cleanmail.models import AuditEvent, Mailbox, RecoveryCode
from tests.conftest import login_as


def csrf(page: bytes) -> str:
    """The CSRF token of the first form on a rendered page."""
    found = re.search(rb'name="csrf_token" value="([^"]+)"', page)
    assert found, "no CSRF token on the page"
    return found.group(1).decode()


def post(client, path: str, page: str | None = None, **form: str):
    """Post a form with a token taken from the page that shows it."""
    token = csrf(client.get(page or path).data)
    return client.post(path, data={"csrf_token": token, **form})


def mailbox(database, mailbox_id: int) -> Mailbox:
    """A fresh copy of a mailbox row."""
    with database.session_scope() as session:
        return session.get(Mailbox, mailbox_id)


def events(database, mailbox_id: int, action: str) -> list[dict]:
    """The details of a mailbox's audit events of one kind, oldest first."""
    with database.session_scope() as session:
        rows = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.mailbox_id == mailbox_id, AuditEvent.action == action)
            .order_by(AuditEvent.id)
        )
        return [row.detail for row in rows]


def test_password_page_checks_the_rules_in_the_browser(client, owner) -> None:
    login_as(client, owner)
    text = client.get("/settings/password").data.decode()
    assert '<label for="password">Password</label>' in text
    assert '<label for="confirm">Confirm password</label>' in text
    assert text.count('autocomplete="new-password"') == 2 and 'minlength="8"' in text
    assert 'data-password-rules="password-rules"' in text
    assert re.findall(r'data-rule="(\w+)"', text) == ["length", "lower", "upper", "digit"]
    assert "<script>" not in text and "style=" not in text


@pytest.mark.parametrize(
    "password, message",
    [
        ("Short1a", "at least 8 characters"),
        ("ALLUPPER123", "at least one lower-case letter"),
        ("alllower123", "at least one upper-case letter"),
        ("NoDigitsHere", "at least one digit"),
        ("Aa1" + "x" * 1030, "at most 1024 characters"),
    ],
)
def test_each_unmet_password_rule_has_its_message(
    client, database, owner, password: str, message: str
) -> None:
    login_as(client, owner)
    response = post(client, "/settings/password", password=password, confirm=password)
    assert response.status_code == 400
    errors = re.search(r'<ul class="errors".*?</ul>', response.data.decode(), re.S).group(0)
    assert errors.count("<li>") == 1 and message in errors
    assert mailbox(database, owner.id).password_hash is None


def test_several_unmet_rules_and_a_mismatch_are_all_named(client, database, owner) -> None:
    login_as(client, owner)
    response = post(client, "/settings/password", password="abc", confirm="abd")
    text = response.data.decode()
    for message in ("8 characters", "upper-case", "digit", "The passwords do not match."):
        assert message in text
    assert "lower-case letter." not in text
    mismatch = post(client, "/settings/password", password="Passw0rdOK", confirm="Passw0rdNo")
    assert mismatch.status_code == 400 and "The passwords do not match." in mismatch.data.decode()
    assert mailbox(database, owner.id).password_hash is None


def test_a_good_password_is_stored_hashed(client, database, owner) -> None:
    login_as(client, owner)
    response = post(client, "/settings/password", password="Sommer2026", confirm="Sommer2026")
    assert response.status_code == 302 and response.headers["Location"].endswith("/settings/")
    stored = mailbox(database, owner.id).password_hash
    assert stored.startswith("$argon2id$") and "Sommer2026" not in stored
    assert passwords.verify(stored, "Sommer2026")
    assert not passwords.verify(stored, "Sommer2027")
    assert events(database, owner.id, "password.set") == [{"replaced": False}]
    post(client, "/settings/password", password="Vinter2026", confirm="Vinter2026")
    assert passwords.verify(mailbox(database, owner.id).password_hash, "Vinter2026")
    assert events(database, owner.id, "password.set")[-1] == {"replaced": True}


def speaks_bokmal(database, owner) -> None:
    """Make the owner's language Norwegian bokmål, the platform's default."""
    with database.session_scope(write=True) as session:
        session.get(Mailbox, owner.id).language = "nb"


def test_settings_change_language_at_once(client, database, owner) -> None:
    speaks_bokmal(database, owner)
    login_as(client, owner)
    page = client.get("/settings/").data.decode()
    assert '<html lang="nb">' in page
    assert ">Norsk bokmål<" in page and ">Dansk<" in page and ">English<" in page
    zones = re.findall(r'<option value="([^"]+/[^"]+)"', page)
    assert zones[:2] == ["Europe/Oslo", "Europe/Copenhagen"] and "America/New_York" in zones
    form = {"language": "da", "report_frequency": "weekly", "timezone": "Europe/Copenhagen"}
    response = post(client, "/settings/", **form)
    assert response.status_code == 302
    assert '<html lang="da">' in client.get(response.headers["Location"]).data.decode()
    row = mailbox(database, owner.id)
    assert (row.language, row.report_frequency, row.timezone) == (
        "da",
        "weekly",
        "Europe/Copenhagen",
    )
    assert events(database, owner.id, "settings.change") == [
        {
            "language": ["nb", "da"],
            "report_frequency": ["daily", "weekly"],
            "timezone": ["Europe/Oslo", "Europe/Copenhagen"],
        }
    ]
    post(client, "/settings/", **{**form, "report_frequency": "never"})
    assert events(database, owner.id, "settings.change")[-1] == {
        "report_frequency": ["weekly", "never"]
    }


@pytest.mark.parametrize(
    "field, value",
    [
        ("timezone", "Mars/Olympus_Mons"),
        ("timezone", "../../etc/passwd"),
        ("language", "sv"),
        ("report_frequency", "hourly"),
        ("report_frequency", ""),
    ],
)
def test_invalid_settings_are_refused(client, database, owner, field: str, value: str) -> None:
    speaks_bokmal(database, owner)
    login_as(client, owner)
    form = {"language": "en", "report_frequency": "weekly", "timezone": "Europe/Oslo", field: value}
    response = post(client, "/settings/", **form)
    assert response.status_code == 400 and 'class="errors"' in response.data.decode()
    row = mailbox(database, owner.id)
    assert (row.language, row.report_frequency, row.timezone) == ("nb", "daily", "Europe/Oslo")
    assert events(database, owner.id, "settings.change") == []


def enrol(client) -> tuple[str, list[str]]:
    """Turn two-step login on through the pages; the secret and the recovery codes."""
    page = client.get("/settings/two-step").data.decode()
    assert 'src="data:image/svg+xml' in page
    secret = re.search(r'<code id="totp-secret">([A-Z2-7 ]+)</code>', page).group(1)
    secret = secret.replace(" ", "")
    response = post(
        client, "/settings/two-step/enable", "/settings/two-step", code=pyotp.TOTP(secret).now()
    )
    assert response.status_code == 200
    codes = re.findall(r"<li><code>([^<]+)</code></li>", response.data.decode())
    return secret, codes


def next_code(secret: str) -> str:
    """The code of the next time step: accepted, and not the one enrolment already used."""
    return pyotp.TOTP(secret).at(time.time() + 30)


def wrong_code(secret: str) -> str:
    """A six-digit code that the secret does not give now."""
    right = {pyotp.TOTP(secret).at(time.time() + 30 * step) for step in range(-2, 3)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in right)


def test_totp_enrolment(client, database, owner) -> None:
    login_as(client, owner)
    page = client.get("/settings/two-step").data.decode()
    secret = (
        re.search(r'<code id="totp-secret">([A-Z2-7 ]+)</code>', page).group(1).replace(" ", "")
    )
    assert client.get("/settings/two-step").data.decode().count(secret[:4]) >= 1  # stays pending
    wrong = post(client, "/settings/two-step/enable", "/settings/two-step", code=wrong_code(secret))
    assert wrong.status_code == 400 and 'class="errors"' in wrong.data.decode()
    assert mailbox(database, owner.id).totp_secret is None

    again, codes = enrol(client)
    assert again == secret
    assert len(codes) == 10 and len(set(codes)) == 10
    assert mailbox(database, owner.id).totp_secret == secret
    with database.session_scope() as session:
        hashes = list(session.scalars(select(RecoveryCode.code_hash)))
    assert len(hashes) == 10 and not set(hashes) & set(codes)
    assert not any(code.replace("-", "") in h for code in codes for h in hashes)
    later = client.get("/settings/two-step").data.decode()
    assert not any(code in later for code in codes) and secret[:8] not in later.replace(" ", "")
    assert len(events(database, owner.id, "totp.enable")) == 1


def test_totp_disable_needs_a_right_code(client, database, owner) -> None:
    login_as(client, owner)
    secret, _codes = enrol(client)
    refused = post(
        client, "/settings/two-step/disable", "/settings/two-step", code=wrong_code(secret)
    )
    assert refused.status_code == 400
    assert mailbox(database, owner.id).totp_secret == secret
    done = post(client, "/settings/two-step/disable", "/settings/two-step", code=next_code(secret))
    assert done.status_code == 302
    assert mailbox(database, owner.id).totp_secret is None
    with database.session_scope() as session:
        assert session.scalars(select(RecoveryCode)).first() is None
    assert len(events(database, owner.id, "totp.disable")) == 1


def test_totp_disable_and_new_codes_with_a_recovery_code(client, database, owner) -> None:
    login_as(client, owner)
    _secret, codes = enrol(client)
    response = post(
        client, "/settings/two-step/recovery-codes", "/settings/two-step", code=codes[0]
    )
    assert response.status_code == 200
    fresh = re.findall(r"<li><code>([^<]+)</code></li>", response.data.decode())
    assert len(fresh) == 10 and not set(fresh) & set(codes)
    refused = post(client, "/settings/two-step/disable", "/settings/two-step", code=codes[1])
    assert refused.status_code == 400  # the old codes were replaced
    done = post(client, "/settings/two-step/disable", "/settings/two-step", code=fresh[0])
    assert done.status_code == 302 and mailbox(database, owner.id).totp_secret is None


def test_log_out_everywhere(app, client, database, owner) -> None:
    login_as(client, owner)
    elsewhere = app.test_client()
    login_as(elsewhere, owner)
    assert elsewhere.get("/settings/").status_code == 200
    response = post(client, "/settings/logout-everywhere", "/settings/")
    assert response.status_code == 302 and response.headers["Location"].endswith("/login")
    assert mailbox(database, owner.id).key_version == owner.key_version + 1
    assert len(events(database, owner.id, "logout.everywhere")) == 1
    for browser in (client, elsewhere):
        again = browser.get("/settings/")
        assert again.status_code == 302 and "/login" in again.headers["Location"]


def test_settings_need_login_and_csrf(client, owner) -> None:
    for path in ("/settings/", "/settings/password", "/settings/two-step"):
        assert client.get(path).status_code == 302
    login_as(client, owner)
    assert client.post("/settings/logout-everywhere").status_code == 400
    assert client.post("/settings/password", data={"password": "Aa345678"}).status_code == 400
