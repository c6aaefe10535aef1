"""Helpers for the browser tests: Debian's Chromium, the app on a real port, a page watcher.

Chromium is never downloaded: Playwright drives the one Debian installs (`make test`
puts it there). A missing Chromium makes the tests fail, never skip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

from flask import Flask
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, Playwright
from werkzeug.serving import BaseWSGIServer, make_server

from cleanmail.config import Config, Endpoint
from cleanmail.db import Database
from cleanmail.store import Store
from cleanmail.web import create_app
from tests.conftest import hold_message
from tests.servers import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE: dict[str, Any] = {
    "viewport": {"width": 375, "height": 740},
    "is_mobile": True,
    "has_touch": True,
    "device_scale_factor": 2,
}
DESKTOP: dict[str, Any] = {"viewport": {"width": 1280, "height": 800}}
DEVICES = {"phone": PHONE, "desktop": DESKTOP}

# What a browser says when a response has an error status: expected on error pages only.
_STATUS_ERROR = "Failed to load resource: the server responded with a status of {status}"


def launch(playwright: Playwright) -> Browser:
    """Debian's Chromium, headless; raises when it is not installed."""
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


class LiveServer:
    """The web app served by werkzeug in a thread of the test process, on loopback."""

    def __init__(self, app: Flask, listen: Endpoint) -> None:
        self.app = app
        self.listen = listen
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LiveServer:
        """Listen and serve in a background thread; return self."""
        self._server = make_server(self.listen.host, self.listen.port, self.app, threaded=True)
        # A short poll interval: shutdown() waits for it at the end of every test.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.05)
        self._thread = threading.Thread(target=serve, name="live-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None


def on_free_port(config: Config, **changes: Any) -> Config:
    """The configuration with the web app on a free loopback port and its base URL there."""
    port = free_port()
    listen = Endpoint("127.0.0.1", port)
    return dataclasses.replace(
        config, base_url=f"http://127.0.0.1:{port}", web_listen=listen, **changes
    )


@contextlib.contextmanager
def served(config: Config) -> Iterator[LiveServer]:
    """The web app for ``config`` served in a thread on its loopback port, for a test."""
    app = create_app(config)
    live = LiveServer(app, config.web_listen).start()
    try:
        yield live
    finally:
        live.stop()
        app.extensions["cleanmail.db"].dispose()


@dataclass
class Watch:
    """Records every dialog, console error and uncaught page error of a browser context.

    Error pages (404, 410, ...) make Chromium log "Failed to load resource"; a test
    names the ones it expects with ``allow_status``. Everything else is a problem.
    """

    problems: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    _allowed: list[tuple[str, int]] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        """Listen on one page (and its frames)."""
        page.on("dialog", self._dialog)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))

    def allow_status(self, path: str, status: int) -> None:
        """Expect an error status for URLs ending in ``path``."""
        self._allowed.append((path, status))

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        self.problems.append(f"dialog {dialog.type}: {dialog.message!r} on {dialog.page}")
        dialog.dismiss()

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        url = message.location.get("url", "")
        for path, status in self._allowed:
            if url.endswith(path) and message.text.startswith(_STATUS_ERROR.format(status=status)):
                return
        self.problems.append(f"console error: {message.text!r} at {url}")

    def check(self) -> None:
        """Fail when anything went wrong so far."""
        assert not self.problems, "\n".join(self.problems)


def set_language(database: Database, mailbox_id: int, language: str) -> None:
    """Set a mailbox's language (the tests read the English texts)."""
    from cleanmail.models import Mailbox

    with database.session_scope(write=True) as session:
        mailbox = session.get(Mailbox, mailbox_id)
        assert mailbox is not None
        mailbox.language = language


def set_password(database: Database, mailbox_id: int, password: str) -> None:
    """Give a mailbox a password directly in the database."""
    from cleanmail import passwords
    from cleanmail.models import Mailbox

    with database.session_scope(write=True) as session:
        mailbox = session.get(Mailbox, mailbox_id)
        assert mailbox is not None
        mailbox.password_hash = passwords.hash_password(password)


def hold(
    database: Database,
    store: Store,
    mailbox_id: int,
    raw: bytes,
    *,
    at: datetime | None = None,
    sender: str = "spam@spam.example",
    reasons: Sequence[dict[str, Any]] = (),
) -> int:
    """Put a raw message in a mailbox's quarantine, the way the filter does; its id."""
    return hold_message(
        database, store, mailbox_id, raw, at=at, sender=sender, reasons=list(reasons), score=7.0
    )


def mail(
    *,
    subject: str,
    sender: str,
    text: str,
    html: str | None = None,
    to: str = "ola@example.no",
    attachments: Sequence[tuple[str, bytes, str]] = (),
) -> bytes:
    """A message with a text part, an optional HTML alternative and attachments."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Sun, 22 Nov 2026 10:00:00 +0100"
    msg["Message-ID"] = f"<{abs(hash((subject, text)))}@spam.example>"
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for filename, content, ctype in attachments:
        maintype, _slash, subtype = ctype.partition("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=SMTP)
