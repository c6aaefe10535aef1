"""The operators' console in Debian's Chromium: log in, find, release, bulk release.

Every page is watched as in test_browser.py: a console error (a CSP violation) or an
uncaught script error fails the test. Confirmation dialogs are accepted and recorded.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyotp
import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, expect

from cleanmail import audit, staff
from cleanmail.config import Config
from tests.browser import DEVICES, LiveServer, Watch, on_free_port, served

PASSWORD = "Secret123"
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


class ConsoleWatch(Watch):
    """A watch that accepts confirmation dialogs (the console asks before acting)."""

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        if dialog.type != "confirm":
            self.problems.append(f"dialog {dialog.type}: {dialog.message!r}")
            dialog.dismiss()
            return
        dialog.accept()


@pytest.fixture
def config(config: Config) -> Config:
    """The test's configuration, with the web app on a free loopback port."""
    return on_free_port(config)


@pytest.fixture
def server(config: Config, database) -> Iterator[LiveServer]:
    """The web app on a loopback port."""
    with served(config) as live:
        yield live


@pytest.fixture
def watch() -> ConsoleWatch:
    """Dialogs, console errors and script errors of the test's pages."""
    return ConsoleWatch()


@pytest.fixture
def page(browser: Browser, server: LiveServer, config: Config, watch) -> Iterator[Page]:
    """A desktop browser tab in English, watched."""
    context: BrowserContext = browser.new_context(
        base_url=config.base_url, locale="en-GB", **DEVICES["desktop"]
    )
    context.set_default_timeout(10_000)
    context.on("page", watch.attach)
    yield context.new_page()
    context.close()
    watch.check()


@pytest.fixture
def operator(database, two_domains):
    """An operator with a password and two-step login."""
    with database.session_scope(write=True) as session:
        member = staff.add(
            session,
            audit.Actor("system", "test"),
            "root@provider.example",
            "operator",
            password=PASSWORD,
        )
        member.totp_secret, member.language = SECRET, "en"
        session.flush()
        return member


def log_in(page: Page, address: str) -> None:
    """Password, then the code: the console opens."""
    page.goto("/login")
    page.get_by_label("E-mail address", exact=True).first.fill(address)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Log in", exact=True).click()
    page.get_by_label("Code from your authenticator app").fill(pyotp.TOTP(SECRET).now())
    page.get_by_role("button", name="Log in", exact=True).click()
    expect(page.get_by_role("heading", name="Find messages")).to_be_visible()


def test_operator_finds_a_held_message_by_sender_and_releases_it(
    page, watch, operator, two_domains, smtp_sink
):
    log_in(page, operator.address)
    page.get_by_label("Sender (address or domain)").fill("invoice@supplier.no")
    page.get_by_label("Recipient (address or domain)").fill("mette@other.dk")
    page.get_by_role("button", name="Search", exact=True).click()
    results = page.locator("table.results tbody tr")
    expect(results).to_have_count(1)
    page.get_by_role("link", name="Faktura 2233").click()
    expect(page.get_by_role("heading", name="All headers")).to_be_visible()
    page.get_by_role("button", name="Release to mette@other.dk").click()
    expect(page.locator(".flash.success")).to_have_text(
        "The message was released to mette@other.dk."
    )
    (received,) = smtp_sink.wait_for(1)
    assert received.rcpt_tos == ["mette@other.dk"] and b"Faktura 2233" in received.data
    assert watch.dialogs == ["confirm: Release this message to mette@other.dk?"]


def test_bulk_release_by_search_with_preview_and_progress(
    page, watch, operator, two_domains, smtp_sink
):
    log_in(page, operator.address)
    page.get_by_label("Sender (address or domain)").fill("supplier.no")
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("table.results tbody tr")).to_have_count(3)
    page.get_by_role("link", name="Release all matching…").click()
    expect(page.locator(".preview-count")).to_have_text(
        "3 messages will be released to their mailboxes."
    )
    page.get_by_role("button", name="Yes, release them").click()
    expect(page.get_by_role("heading", name="Bulk job")).to_be_visible()
    expect(page.locator("#job-state")).to_have_text("Finished.")
    expect(page.locator("#job-done")).to_have_text("3")
    assert len(smtp_sink.wait_for(3)) == 3
    # The job can be found again later.
    page.get_by_role("link", name="Bulk jobs", exact=True).click()
    expect(page.locator("tbody tr")).to_have_count(1)


def test_select_two_and_delete(page, watch, operator, two_domains, database):
    log_in(page, operator.address)
    page.get_by_label("Recipient (address or domain)").fill("ola@example.no")
    page.get_by_role("button", name="Search", exact=True).click()
    page.get_by_label("Select all").check()
    page.get_by_role("button", name="Delete selected…").click()
    expect(page.locator(".preview-count")).to_have_text("2 messages will be deleted for good.")
    page.get_by_role("button", name="Yes, delete them").click()
    expect(page.locator("#job-state")).to_have_text("Finished.")
    page.get_by_role("link", name="Search", exact=True).click()
    page.get_by_label("Recipient (address or domain)").fill("ola@example.no")
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.get_by_text("No messages match.")).to_be_visible()
