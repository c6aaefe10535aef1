"""Reports delivered by a real Postfix into a maildir, then used in Chromium like an owner would.

The report job sends to Postfix's after-filter smtpd (CLEANMAIL_RELAY), Postfix's
virtual(8) agent writes it into ola@example.no's maildir, and the test reads it there:
valid MIME, the right messages in the owner's language, links that work in a browser.
"""

from __future__ import annotations

import email
import email.policy
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from html import unescape
from pathlib import Path

import pytest
from playwright.sync_api import Page, Route, expect

from cleanmail import reports
from cleanmail.config import Config, Endpoint
from cleanmail.models import Message, utcnow
from cleanmail.relay import Relay
from tests.browser import DEVICES, LiveServer, Watch, hold, mail, on_free_port, served, set_language
from tests.servers import MaildirPostfix

OLA = "ola@example.no"


@pytest.fixture
def postfix_maildir(smtp_sink) -> Iterator[MaildirPostfix]:
    """A private Postfix that delivers ola@example.no into a maildir."""
    with MaildirPostfix(None, smtp_sink.port, [OLA]) as server:
        yield server


@pytest.fixture
def config(config: Config, postfix_maildir: MaildirPostfix) -> Config:
    """Reports and releases go to Postfix's after-filter smtpd; the web app on a real port."""
    return on_free_port(config, relay=Endpoint("127.0.0.1", postfix_maildir.reinject_port))


@pytest.fixture
def server(config: Config, database) -> Iterator[LiveServer]:
    """The web app served in a thread on the configured loopback port."""
    with served(config) as live:
        yield live


@pytest.fixture
def relay(config: Config) -> Iterator[Relay]:
    """The relay the report job uses: Postfix."""
    running = Relay(config.relay, timeout=10)
    yield running
    running.close()


def parse(raw: bytes) -> tuple[EmailMessage, str, str]:
    """A delivered report as MIME: the message, its plain text and its HTML; no defects."""
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    for part in parsed.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    kinds = [part.get_content_type() for part in parsed.iter_parts()]
    assert kinds == ["text/plain", "text/html"]
    text = parsed.get_body(("plain",)).get_content()
    html = parsed.get_body(("html",)).get_content()
    return parsed, text, html


def link(html: str, label: str) -> str:
    """The address of the first link in the HTML whose text is ``label``."""
    found = re.search(rf'<a href="([^"]+)"[^>]*>{re.escape(label)}</a>', html)
    assert found, f"no {label!r} link in the report"
    return unescape(found.group(1))


def run(database, relay, config) -> reports.RunResult:
    """One report run, the way ``cleanmail reports send --now`` does it."""
    return reports.run(database, relay, config, utcnow(), trigger="test", ignore_schedule=True)


def settle(postfix: MaildirPostfix) -> None:
    """Wait until Postfix's queue is empty, so that nothing more is on its way."""
    deadline = time.monotonic() + 20
    while postfix.queue_size():
        assert time.monotonic() < deadline, postfix.maillog()
        time.sleep(0.1)


def test_a_report_reaches_the_maildir_and_its_links_work(
    browser, server, config, database, store, owner, relay, postfix_maildir, smtp_sink
):
    set_language(database, owner.id, "nb")
    subjects = ["Billige klokker", "Du har vunnet", "Faktura 1234"]
    raws = {}
    for minutes, subject in enumerate(subjects):
        raws[subject] = mail(subject=subject, sender="kari@spam.example", text=f"{subject}\n")
        at = utcnow() - timedelta(minutes=30 - minutes)
        hold(database, store, owner.id, raws[subject], at=at, sender="kari@spam.example")

    result = run(database, relay, config)
    assert (result.prepared, result.sent, result.failed) == (1, 1, 0)
    (delivered,) = postfix_maildir.wait_for_mail(OLA, 1)
    report, text, html = parse(delivered)
    assert report["Subject"] == "Karantenerapport: 3 nye meldinger"
    assert report["Return-Path"] == "<>"  # the envelope sender was empty
    assert report["Auto-Submitted"] == "auto-generated" and report["Message-ID"]
    for body in (text, html):
        assert "Se oversikt" in body and "Slipp ut og tillat avsenderen" in body
        assert "Meldinger blir liggende i karantenen i 30 dager" in body
        positions = [body.index(subject) for subject in subjects]
        assert positions == sorted(positions, reverse=True)  # newest first
    assert "See overview" not in text and "<script" not in html
    assert smtp_sink.messages == []  # delivered locally, not relayed on

    context = browser.new_context(locale="nb-NO", **DEVICES["phone"])
    context.set_default_timeout(10_000)
    watch = Watch()
    context.on("page", watch.attach)
    page = context.new_page()
    try:
        # "Se oversikt" logs the owner in, straight onto the quarantine.
        page.goto(link(html, "Se oversikt"))
        expect(page).to_have_url(f"{config.base_url}/")
        for subject in subjects:
            expect(page.get_by_role("link", name=subject)).to_be_visible()

        # A release link opens a question; the GET released nothing.
        released = "Du har vunnet"
        release_url = text.split(f"Emne: {released}", 1)[1].split("Slipp ut: ", 1)[1].split()[0]
        page.goto(release_url)
        question = page.get_by_text("Vil du slippe ut denne meldingen til innboksen din?")
        expect(question).to_be_visible()
        assert message_status(database, released) == "new"
        settle(postfix_maildir)
        assert len(postfix_maildir.delivered(OLA)) == 1

        page.get_by_role("button", name="Ja, slipp den ut", exact=True).click()
        arrived = postfix_maildir.wait_for_mail(OLA, 2)[1]
        assert message_status(database, released) == "released"
        original = email.message_from_bytes(arrived, policy=email.policy.default)
        assert original["Subject"] == released and original["X-Cleanmail-Released"]
        assert arrived.replace(b"\n", b"\r\n").endswith(raws[released])
        watch.check()
    finally:
        context.close()

    # Nothing new: no report.
    assert run(database, relay, config).prepared == 0
    settle(postfix_maildir)
    assert len(postfix_maildir.delivered(OLA)) == 2

    # New mail: a report with only the new message.
    fresh = mail(subject="Helt ny spam", sender="per@spam.example", text="ny\n")
    hold(database, store, owner.id, fresh, sender="per@spam.example")
    assert run(database, relay, config).sent == 1
    third = postfix_maildir.wait_for_mail(OLA, 3)[2]
    report, text, html = parse(third)
    assert report["Subject"] == "Karantenerapport: 1 ny melding"
    for body in (text, html):
        assert "Helt ny spam" in body
        assert not any(subject in body for subject in subjects)


def message_status(database, subject: str) -> str:
    """The status of the held message with this subject."""
    from sqlalchemy import select

    with database.session_scope() as session:
        return session.scalars(select(Message.status).where(Message.subject == subject)).one()


def test_the_report_fits_a_phone_and_loads_nothing(
    browser, config, database, store, owner, tmp_path, monkeypatch
):
    monkeypatch.setattr(reports, "REPORT_ROWS", 10)
    set_language(database, owner.id, "nb")
    long_sender = "a-very-long-local-part-without-any-break-at-all@" + "sub." * 12 + "example"
    for number in range(12):
        subject = f"Tilbud {number}: " + "SuperLangtOrdUtenMellomrom" * 4
        raw = mail(subject=subject, sender=long_sender, text="x\n")
        hold(database, store, owner.id, raw, sender=long_sender)
    hold(
        database,
        store,
        owner.id,
        mail(subject='<img src="http://tracker.test/p.gif">', sender="x@y.example", text="x\n"),
    )
    with database.session_scope(write=True) as session:
        report = reports.prepare(session, owner.id, None, utcnow())
        raw = reports.render_report(session, report, config)
    _parsed, _text, html = parse(raw)

    page_url = "http://report.invalid/report.html"
    remote: list[str] = []

    def serve(route: Route) -> None:
        if route.request.url == page_url:
            route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html)
        else:
            remote.append(route.request.url)
            route.abort()

    context = browser.new_context(**DEVICES["phone"])
    try:
        context.route("**/*", serve)
        page: Page = context.new_page()
        page.goto(page_url)
        page.wait_for_load_state("networkidle")
        assert remote == []
        width = DEVICES["phone"]["viewport"]["width"]
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        button = page.get_by_role("link", name="Se oversikt", exact=True)
        expect(button).to_be_visible()
        box = button.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
        assert box["height"] >= 40  # a thumb-sized target
        expect(page.get_by_text("…og 3 meldinger til.", exact=False)).to_be_visible()
        shot = tmp_path / "report-375.png"
        page.screenshot(path=shot, full_page=True)
    finally:
        context.close()
    data = Path(shot).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
