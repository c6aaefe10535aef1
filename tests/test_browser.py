"""The flows a mailbox owner walks, in Debian's Chromium against the app on a real port.

Every page of every test is watched: a dialog, a console error (CSP violations are
console errors) or an uncaught script error fails the test.
"""

from __future__ import annotations

import email
import email.policy
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pyotp
import pytest
from argon2 import PasswordHasher
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from playwright.sync_api import Browser, BrowserContext, Page, expect

from cleanmail import audit, mailboxes, passwords
from cleanmail.config import Config
from cleanmail.tokens import LOGIN_LINK_DAYS
from cleanmail.web import auth
from cleanmail.web.auth import login_url
from tests.browser import (
    DEVICES,
    LiveServer,
    Watch,
    hold,
    mail,
    on_free_port,
    served,
    set_language,
    set_password,
)

PASSWORD = "Sommer2026"
MET = re.compile(r"\bmet\b")

# Hostile spam: every field the owner sees carries a payload.
SUBJECT = "<script>alert(1)</script><img src=x onerror=alert(2)>"
SENDER_NAME = "<img src=x onerror=alert(3)>"
TEXT = 'Klikk <a href="javascript:alert(4)">her</a> <svg onload=alert(5)> <script>alert(6)</script>'
HTML = (
    "<p>Hei Ola, du har vunnet!</p><script>alert(7)</script>"
    "<img src=x onerror=alert(8)><svg onload=alert(9)><circle r=5></circle></svg>"
    '<a href="javascript:alert(10)">hent premien</a>'
    '<a href="https://example.com/" onclick="alert(11)">example.com</a>'
    '<iframe src="javascript:alert(12)"></iframe><body onload=alert(13)>'
    '<form action="https://evil.example/"><input name=x></form>'
)
ATTACHMENTS = [
    ("<svg onload=alert(14)>.txt", b"hello", "text/plain"),
    ('"><img src=x onerror=alert(15)>.pdf', b"%PDF-1.4\n", "application/pdf"),
    ("javascript:alert(16).exe", b"MZ not really", "application/octet-stream"),
]
BLOCKED = "The attachment javascript:alert(16).exe has a blocked file type"


@pytest.fixture
def config(config: Config) -> Config:
    """The test's configuration, with the web app on a free loopback port."""
    return on_free_port(config)


@pytest.fixture
def server(config: Config, database) -> Iterator[LiveServer]:
    """The web app served by werkzeug in a thread, on the configured loopback port."""
    with served(config) as live:
        yield live


@pytest.fixture
def device() -> str:
    """The screen the browser pretends to have; a phone unless a test says otherwise."""
    return "phone"


@pytest.fixture
def watch() -> Watch:
    """Dialogs, console errors and script errors of the test's pages."""
    return Watch()


@pytest.fixture
def context(
    browser: Browser, server: LiveServer, config: Config, device: str, watch: Watch
) -> Iterator[BrowserContext]:
    """A fresh browser profile per test, in English, every page watched."""
    ctx = browser.new_context(base_url=config.base_url, locale="en-GB", **DEVICES[device])
    ctx.set_default_timeout(10_000)
    ctx.on("page", watch.attach)
    yield ctx
    ctx.close()
    watch.check()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    """The test's first tab."""
    return context.new_page()


@pytest.fixture
def ola(owner, database):
    """The owner ola@example.no, reading Cleanmail in English."""
    set_language(database, owner.id, "en")
    return owner


def url(config: Config, path: str) -> str:
    """An absolute address on the test's server."""
    return f"{config.base_url}{path}"


def open_link(page: Page, config: Config, mailbox) -> None:
    """Log in from a report link; it lands on the quarantine, the token gone from the URL."""
    page.goto(login_url(mailbox, config))
    expect(page).to_have_url(url(config, "/"))
    expect(page.get_by_role("heading", name="Quarantine", level=1)).to_be_visible()


def log_out(page: Page, config: Config) -> None:
    """Press "Log out" in the page header."""
    page.get_by_role("button", name="Log out", exact=True).click()
    expect(page).to_have_url(url(config, "/login"))
    expect(page.locator(".flash.success")).to_have_text("You have logged out.")


def log_in(page: Page, address: str, password: str) -> int:
    """Fill in and send the login form; the status of the answer."""
    page.get_by_label("E-mail address", exact=True).first.fill(address)
    page.get_by_label("Password", exact=True).fill(password)
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.get_by_role("button", name="Log in", exact=True).click()
    page.wait_for_load_state()
    return answer.value.status


def scroll_width(page: Page) -> int:
    """How wide the page's content is; wider than the window means sideways scrolling."""
    return page.evaluate("document.documentElement.scrollWidth")


def png_width(path: Path) -> int:
    """The pixel width of a PNG file, from its IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


class PastSigner(TimestampSigner):
    """Signs as if the clock stood one day beyond a login link's lifetime back."""

    def get_timestamp(self) -> int:
        return int(time.time()) - (LOGIN_LINK_DAYS + 1) * 86400


def expired_link(mailbox, config: Config) -> str:
    """A report link signed 16 days ago, with the keys and salt of cleanmail.tokens."""
    serializer = URLSafeTimedSerializer(
        list(config.secret_keys), salt="cleanmail.login", signer=PastSigner
    )
    token = serializer.dumps({"m": mailbox.id, "v": mailbox.key_version})
    return url(config, f"/l/{token}")


def tampered(link: str) -> str:
    """A link with one character of its signature changed."""
    head, _dot, signature = link.rpartition(".")
    index = len(signature) // 2  # not the last character: its low bits may be padding
    swapped = "A" if signature[index] != "A" else "B"
    return f"{head}.{signature[:index]}{swapped}{signature[index + 1 :]}"


@pytest.mark.parametrize("device", ["phone", "desktop"])
def test_release_from_a_login_link(
    page, watch, ola, database, store, smtp_sink, config, device, tmp_path
):
    raw = mail(
        subject="Faktura for november",
        sender="Kari Nordmann <kari@example.com>",
        text="Hei Ola,\n\nher er fakturaen.\n",
        html="<p>Hei Ola,</p><p>her er <b>fakturaen</b>.</p>",
    )
    message_id = hold(database, store, ola.id, raw, sender="kari@example.com")

    open_link(page, config, ola)
    expect(page.locator("p.count")).to_have_text("1 new message is waiting in your quarantine.")
    subject = page.get_by_role("link", name="Faktura for november")
    expect(subject).to_be_visible()
    expect(page.get_by_text("Kari Nordmann", exact=True)).to_be_visible()
    if device == "phone":
        assert scroll_width(page) <= 375
        expect(page.locator("table.messages thead")).to_be_hidden()  # rows become cards
        card = page.locator("table.messages tbody tr").first.bounding_box()
        assert card is not None and card["x"] >= 0 and card["x"] + card["width"] <= 375
        shot = tmp_path / "quarantine-375.png"
        page.screenshot(path=shot, full_page=True)
        assert png_width(shot) == 375 * DEVICES["phone"]["device_scale_factor"]

    subject.click()
    expect(page).to_have_url(url(config, f"/messages/{message_id}"))
    expect(page.locator("h1.subject")).to_have_text("Faktura for november")
    preview = page.locator("iframe.preview")
    expect(preview).to_be_visible()
    expect(page.frame_locator("iframe.preview").get_by_text("fakturaen")).to_be_visible()
    if device == "desktop":
        assert scroll_width(page) <= 1280
        box = preview.bounding_box()
        assert box is not None and box["width"] >= 600 and box["height"] >= 400
        shot = tmp_path / "message-1280.png"
        page.screenshot(path=shot, full_page=True)
        assert png_width(shot) == 1280
    else:
        assert scroll_width(page) <= 375

    # The same message open in a second tab, whose Release button is now stale.
    stale = page.context.new_page()
    stale.goto(f"/messages/{message_id}")

    page.get_by_role("button", name="Release", exact=True).click()
    expect(page).to_have_url(url(config, "/"))
    expect(page.locator(".flash.success")).to_have_text("1 message released to your inbox.")
    expect(page.get_by_text("Your quarantine is empty.")).to_be_visible()
    (delivered,) = smtp_sink.wait_for(1)
    assert delivered.rcpt_tos == ["ola@example.no"]
    assert delivered.mail_from == "kari@example.com"
    assert delivered.data.startswith(b"X-Cleanmail-Released: by ")
    assert delivered.data.endswith(raw)

    stale.get_by_role("button", name="Release", exact=True).click()
    expect(stale.locator(".flash.info")).to_have_text("1 message was already released.")
    assert len(smtp_sink.messages) == 1

    page.goto(f"/messages/{message_id}")
    expect(page.locator("dl.headers")).to_contain_text("Released to your inbox")
    expect(page.get_by_role("button", name="Release", exact=True)).to_have_count(0)


def test_set_a_password_log_out_and_log_in_with_it(page, watch, ola, config):
    open_link(page, config, ola)
    page.get_by_role("link", name="Settings").click()
    page.get_by_role("link", name="Your password").click()
    expect(page.get_by_role("heading", name="Your password", level=1)).to_be_visible()

    field = page.get_by_label("Password", exact=True)
    rule = {
        code: page.locator(f"#password-rules li[data-rule={code}]")
        for code in ("length", "lower", "upper", "digit")
    }
    expect(page.locator("#password-rules li.met")).to_have_count(0)
    field.press_sequentially("som")
    expect(rule["lower"]).to_have_class(MET)
    for code in ("length", "upper", "digit"):
        expect(rule[code]).not_to_have_class(MET)
    field.press_sequentially("merferie")
    expect(rule["length"]).to_have_class(MET)
    expect(rule["upper"]).not_to_have_class(MET)

    # The server checks the rules too, with a message per unmet rule.
    watch.allow_status("/settings/password", 400)
    page.get_by_label("Confirm password").fill("sommerferie")
    page.get_by_role("button", name="Save password").click()
    expect(page.locator("#password-errors li")).to_have_text(
        [
            "The password must have at least one upper-case letter.",
            "The password must have at least one digit.",
        ]
    )

    field.fill("")
    field.press_sequentially(PASSWORD)
    expect(page.locator("#password-rules li.met")).to_have_count(4)
    page.get_by_label("Confirm password").fill(PASSWORD)
    page.get_by_role("button", name="Save password").click()
    expect(page.locator(".flash.success")).to_have_text(
        "Your password is saved. You can now log in with it."
    )

    log_out(page, config)
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login\b"))  # logged out for real
    page.goto("/login")
    log_in(page, "Ola@Example.no", PASSWORD)
    expect(page).to_have_url(url(config, "/"))
    expect(page.get_by_role("heading", name="Quarantine", level=1)).to_be_visible()
    expect(page.locator(".who")).to_have_text("ola@example.no")


def test_wrong_passwords_until_the_limit(page, watch, ola, database, config, monkeypatch):
    monkeypatch.setattr(auth, "FAILURE_DELAY", 0)
    # Eleven argon2 checks at the real cost take seconds; the lockout is what is tested.
    monkeypatch.setattr(
        passwords, "_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    )
    set_password(database, ola.id, PASSWORD)
    page.goto("/login")
    for attempt in range(auth.FAILURES_PER_ADDRESS.count):
        assert log_in(page, "ola@example.no", f"Vinter{attempt}") == 200
        expect(page.locator(".flash.error")).to_have_text("The address or the password is wrong.")

    watch.allow_status("/login", 429)
    assert log_in(page, "ola@example.no", PASSWORD) == 429  # even the right password, now
    expect(page.locator(".flash.error")).to_have_text(
        "Too many failed attempts. Wait 15 minutes, or ask for a login link below."
    )
    expect(page.get_by_role("button", name="Log out", exact=True)).to_have_count(0)

    # The lockout never keeps the owner out of report-link login.
    open_link(page, config, ola)


def test_enrol_two_step_login_and_log_in_with_a_code(page, watch, ola, database, config):
    set_password(database, ola.id, PASSWORD)
    open_link(page, config, ola)
    page.get_by_role("link", name="Settings").click()
    page.get_by_role("link", name="Two-step login").click()
    expect(page.get_by_role("img", name="QR code for your authenticator app")).to_be_visible()
    secret = page.locator("#totp-secret").inner_text().replace(" ", "")
    app = pyotp.TOTP(secret)

    watch.allow_status("/settings/two-step/enable", 400)
    page.get_by_label("Code", exact=True).fill("000000" if app.now() != "000000" else "111111")
    page.get_by_role("button", name="Turn on two-step login").click()
    expect(page.get_by_role("alert")).to_contain_text("That code is not right.")
    page.get_by_label("Code", exact=True).fill(app.now())
    page.get_by_role("button", name="Turn on two-step login").click()
    expect(page.get_by_role("heading", name="Your recovery codes")).to_be_visible()
    expect(page.locator(".flash.success")).to_have_text("Two-step login is on.")
    expect(page.locator(".recovery-codes li")).to_have_count(10)
    page.get_by_role("link", name="I have saved the codes").click()
    expect(page.get_by_role("listitem").filter(has_text="Two-step login")).to_contain_text("on")

    log_out(page, config)
    log_in(page, "ola@example.no", PASSWORD)
    expect(page).to_have_url(url(config, "/login/totp"))
    # The enrolment used the current step's code, and a code works once: the next one.
    page.get_by_label("Code from your authenticator app").fill(app.at(time.time() + 30))
    page.get_by_role("button", name="Log in", exact=True).click()
    expect(page).to_have_url(url(config, "/"))
    expect(page.get_by_role("heading", name="Quarantine", level=1)).to_be_visible()


@pytest.mark.parametrize(
    ("kind", "typed", "stored"),
    [("Whitelist", "Kari@Example.com", "kari@example.com"), ("Blacklist", "*.spam.example", None)],
)
def test_add_and_remove_list_entries(page, watch, ola, config, kind, typed, stored):
    stored = stored or typed
    name = kind.lower()
    open_link(page, config, ola)
    page.get_by_role("navigation").get_by_role("link", name=kind).click()
    expect(page.get_by_role("heading", name=kind, level=1)).to_be_visible()
    expect(page.get_by_text(f"Your {name} is empty.")).to_be_visible()

    field = page.get_by_label("Address or domain")
    watch.allow_status(f"/lists/{'allow' if kind == 'Whitelist' else 'block'}/add", 400)
    field.fill("@@")
    page.get_by_role("button", name="Add", exact=True).click()
    expect(page.locator("#patterns-errors li")).to_have_text(
        "“@@” is not an e-mail address or a domain."
    )

    field.fill(typed)
    page.get_by_role("button", name="Add", exact=True).click()
    expect(page.locator(".flash.success")).to_have_text(f"Added to the {name}: {stored}.")
    expect(page.locator("table.entries code")).to_have_text([stored])

    page.get_by_role("button", name=f"Remove {stored}").click()
    expect(page.locator(".flash.success")).to_have_text(f"Removed from the {name}: {stored}.")
    expect(page.get_by_text(f"Your {name} is empty.")).to_be_visible()
    expect(page.locator("table.entries")).to_have_count(0)


def test_expired_and_tampered_links(page, watch, ola, config, smtp_sink):
    bad = tampered(login_url(ola, config))
    watch.allow_status(urlsplit(bad).path, 400)
    page.goto(bad)
    expect(page.get_by_role("heading", name="This link is not valid")).to_be_visible()
    expect(page.get_by_role("button", name="Log out", exact=True)).to_have_count(0)

    old = expired_link(ola, config)
    watch.allow_status(urlsplit(old).path, 410)
    page.goto(old)
    expect(page.get_by_role("heading", name="This link has expired")).to_be_visible()
    expect(page.get_by_role("button", name="Log out", exact=True)).to_have_count(0)
    page.get_by_role("button", name="Send me a new link").click()
    expect(page.get_by_role("heading", name="Check your mail")).to_be_visible()

    (sent,) = smtp_sink.wait_for(1)
    assert sent.rcpt_tos == ["ola@example.no"]
    letter = email.message_from_bytes(sent.data, policy=email.policy.default)
    body = letter.get_body(("plain",)).get_content()
    fresh = re.search(re.escape(config.base_url) + r"/l/\S+", body)
    assert fresh, body
    page.goto(fresh.group(0))
    expect(page).to_have_url(url(config, "/"))
    expect(page.get_by_role("heading", name="Quarantine", level=1)).to_be_visible()


def test_hostile_spam_never_runs_a_script(page, watch, ola, database, store, config):
    raw = mail(
        subject=SUBJECT,
        sender=f'"{SENDER_NAME}" <spam@spam.example>',
        text=TEXT,
        html=HTML,
        attachments=ATTACHMENTS,
    )
    reasons = [
        {
            "code": "BLOCKED_ATTACHMENT",
            "text": "blocked attachment javascript:alert(16).exe: blocked file name .exe",
            "score": 100.0,
        },
        {"code": "X_UNKNOWN", "text": "<b onmouseover=alert(17)>unknown</b>", "score": 1.0},
    ]
    message_id = hold(database, store, ola.id, raw, reasons=reasons)

    open_link(page, config, ola)
    expect(page.get_by_role("link", name=SUBJECT)).to_be_visible()
    expect(page.get_by_text(SUBJECT, exact=True).first).to_be_visible()
    expect(page.get_by_text(SENDER_NAME, exact=True)).to_be_visible()
    expect(page.get_by_text(BLOCKED, exact=True)).to_be_visible()
    assert scroll_width(page) <= 375

    page.get_by_role("link", name=SUBJECT).click()
    expect(page).to_have_url(url(config, f"/messages/{message_id}"))
    page.wait_for_load_state("load")
    expect(page.locator("h1.subject")).to_have_text(SUBJECT)
    expect(page).to_have_title(re.compile("^" + re.escape(SUBJECT)))
    expect(page.get_by_text(f"{SENDER_NAME} <spam@spam.example>", exact=True)).to_be_visible()
    for name, _content, _type in ATTACHMENTS:
        expect(page.get_by_role("cell", name=name, exact=True)).to_be_visible()
    reasons_shown = page.locator("ul.reasons li")
    expect(reasons_shown.first).to_contain_text(BLOCKED)
    expect(reasons_shown.nth(1)).to_contain_text("<b onmouseover=alert(17)>unknown</b>")
    # Nothing of the message became markup on our page.
    expect(page.locator("main script, main svg, main img[src=x], main [onerror]")).to_have_count(0)
    assert scroll_width(page) <= 375

    frame = page.frame_locator("iframe.preview")
    expect(frame.get_by_text("Hei Ola, du har vunnet!")).to_be_visible()
    expect(
        frame.locator("script, svg, iframe, form, [onerror], [onload], [onclick]")
    ).to_have_count(0)
    expect(frame.locator("a[href^='javascript']")).to_have_count(0)
    expect(frame.get_by_role("link", name="example.com")).to_have_attribute(
        "href", "https://example.com/"
    )

    page.get_by_role("link", name="Show as plain text").click()
    expect(page.locator("pre.text")).to_have_text(TEXT)

    # The preview document opened on its own: its policy still forbids every script.
    page.goto(f"/messages/{message_id}/preview")
    expect(page.get_by_text("Hei Ola, du har vunnet!")).to_be_visible()
    page.wait_for_timeout(200)  # time for any handler that slipped through to fire
    assert watch.dialogs == []
    watch.check()


def test_another_owners_message_is_not_found(page, watch, ola, database, store, smtp_sink, config):
    with database.session_scope(write=True) as session:
        kari = mailboxes.add_mailbox(
            session, audit.Actor("operator", "test"), "kari@example.no", language="en"
        )
    raw = mail(
        subject="Karis hemmelighet", sender="x@spam.example", text="hemmelig", html="<p>h</p>"
    )
    theirs = hold(database, store, kari.id, raw)
    hold(database, store, ola.id, mail(subject="Olas spam", sender="y@spam.example", text="spam"))

    open_link(page, config, ola)
    expect(page.get_by_role("link", name="Olas spam")).to_be_visible()
    expect(page.get_by_text("Karis hemmelighet")).to_have_count(0)
    csrf = page.locator("input[name=csrf_token]").first.get_attribute("value")

    for path in (f"/messages/{theirs}", f"/messages/{theirs}/preview"):
        watch.allow_status(path, 404)
        response = page.goto(path)
        assert response is not None and response.status == 404
        expect(page.get_by_text("The page or message was not found.")).to_be_visible()
        expect(page.get_by_text("Karis hemmelighet")).to_have_count(0)

    # Nor can a forged form release it.
    response = page.request.post(
        f"/messages/{theirs}/release", form={"csrf_token": csrf or ""}, max_redirects=0
    )
    assert response.status == 404
    assert smtp_sink.messages == []
