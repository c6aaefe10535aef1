"""Shared fixtures: databases on SQLite and PostgreSQL, the store, an SMTP sink, the filter."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql as pgsql

from cleanmail import config as config_module
from cleanmail import db
from cleanmail.filter import daemon, server
from cleanmail.store import Store
from tests.servers import (
    PostfixServer,
    PostgresServer,
    RspamdServer,
    SmtpSink,
    SpamdServer,
    free_port,
)

TEMPLATE_DB = "cleanmail_template"


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, with a migrated template database."""
    with PostgresServer(tmp_path_factory.mktemp("pg")) as pg:
        pg.create_database(TEMPLATE_DB)
        db.upgrade(pg.url(TEMPLATE_DB))
        yield pg


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test copies."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    db.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh migrated database for one test, on each backend in turn."""
    if request.param == "sqlite":
        target = tmp_path / "data" / "cleanmail.db"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(request.getfixturevalue("sqlite_template"), target)
        yield f"sqlite:///{target}"
        return
    pg: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        conn.execute(
            pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                pgsql.Identifier(name), pgsql.Identifier(TEMPLATE_DB)
            )
        )
    yield pg.url(name)
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        conn.execute(
            pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name))
        )


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A real SMTP server that records what the relay hands it."""
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def config(tmp_path: Path, db_url: str, smtp_sink: SmtpSink) -> config_module.Config:
    """A configuration for one test: its own data dir and database, relaying to the sink."""
    return config_module.load(
        {
            "CLEANMAIL_DATA_DIR": str(tmp_path / "data"),
            "CLEANMAIL_DATABASE_URL": db_url,
            "CLEANMAIL_SECRET_KEY": "test-secret",
            "CLEANMAIL_RELAY": f"127.0.0.1:{smtp_sink.port}",
            "CLEANMAIL_FILTER_LISTEN": f"127.0.0.1:{free_port()}",
            "CLEANMAIL_TRUSTED_AUTHSERV_ID": "mx.cleanmail.test",
            "CLEANMAIL_DNS_TIMEOUT": "0.2",
            "CLEANMAIL_DNS_SERVERS": "127.0.0.1",
            "CLEANMAIL_VERDICT_TIMEOUT": "10",
        }
    )


@pytest.fixture
def database(config: config_module.Config) -> Iterator[db.Database]:
    """The test's database."""
    database = db.Database(config.database_url)
    yield database
    database.dispose()


@pytest.fixture
def store(config: config_module.Config) -> Store:
    """The test's raw-message store."""
    return Store(config.store_dir)


class FilterThread:
    """The filter daemon's server running in a thread of the test process."""

    def __init__(self, config: config_module.Config, database: db.Database) -> None:
        self.config = config
        self.pipeline = daemon.build_pipeline(config, database)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await server.serve(self.config, self.pipeline, ready=self._ready.set, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the test by start()
            self._error = exc
            self._ready.set()

    def start(self) -> FilterThread:
        """Start and wait until it listens."""
        self._thread.start()
        if not self._ready.wait(15) or self._error:
            raise RuntimeError(f"filter did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        """Drain and stop."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def port(self) -> int:
        """Where it listens."""
        return self.config.filter_listen.port


@pytest.fixture
def filter_server(config: config_module.Config, database: db.Database) -> Iterator[FilterThread]:
    """The content filter listening on a free port, relaying to the sink."""
    config.store_dir.mkdir(parents=True, exist_ok=True)
    running = FilterThread(config, database).start()
    yield running
    running.stop()


@pytest.fixture
def postfix() -> Iterator[Callable[[int, int], PostfixServer]]:
    """A factory: ``postfix(filter_port, sink_port)`` starts a private Postfix for this test."""
    started: list[PostfixServer] = []

    def start(filter_port: int, sink_port: int) -> PostfixServer:
        server = PostfixServer(None, filter_port, sink_port)
        started.append(server)
        return server.start()

    yield start
    for running in reversed(started):
        running.stop()


class FilterProcess:
    """``cleanmail filter`` as its own process, the way production runs it."""

    def __init__(self, config: config_module.Config) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        """The CLEANMAIL_* variables that reproduce the test's configuration."""
        c = self.config
        return {
            **os.environ,
            "CLEANMAIL_DATA_DIR": str(c.data_dir),
            "CLEANMAIL_DATABASE_URL": c.database_url,
            "CLEANMAIL_SECRET_KEY": " ".join(c.secret_keys),
            "CLEANMAIL_FILTER_LISTEN": str(c.filter_listen),
            "CLEANMAIL_RELAY": str(c.relay),
            "CLEANMAIL_TRUSTED_AUTHSERV_ID": c.trusted_authserv_id or "",
            "CLEANMAIL_DNS_TIMEOUT": str(c.dns_timeout),
            "CLEANMAIL_DNS_SERVERS": " ".join(c.dns_servers),
            "CLEANMAIL_VERDICT_TIMEOUT": str(c.verdict_timeout),
            "CLEANMAIL_ENGINES": ",".join(c.engines),
            "CLEANMAIL_ENGINE_TIMEOUT": str(c.engine_timeout),
            "CLEANMAIL_ENGINE_FAIL_OPEN": "yes" if c.engine_fail_open else "no",
            "CLEANMAIL_ENGINE_MAX_SIZE": str(c.engine_max_size),
            "CLEANMAIL_RSPAMD_URL": c.rspamd_url,
            "CLEANMAIL_RSPAMD_CONTROLLER_URL": c.rspamd_controller_url,
            "CLEANMAIL_RSPAMD_PASSWORD": c.rspamd_password,
            "CLEANMAIL_SPAMD_HOST": c.spamd_host,
            "CLEANMAIL_SPAMD_PORT": str(c.spamd_port),
        }

    def start(self) -> FilterProcess:
        """Start and wait until the port answers."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cleanmail", "filter"], env=self.environment()
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"filter exited with {self.process.returncode}")
            try:
                socket.create_connection(
                    (self.config.filter_listen.host, self.config.filter_listen.port), 0.5
                ).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("filter did not start listening")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, and the exit code once it has drained."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@pytest.fixture
def app(config: config_module.Config, smtp_sink: SmtpSink):
    """The web app on the test's database, releasing to the sink."""
    from cleanmail.web import create_app

    application = create_app(config)
    application.config.update(TESTING=True)
    yield application
    application.extensions["cleanmail.db"].dispose()


@pytest.fixture
def client(app):
    """A Flask test client whose browser asks for English (the app's default is bokmål)."""
    test_client = app.test_client()
    test_client.environ_base["HTTP_ACCEPT_LANGUAGE"] = "en"
    return test_client


@pytest.fixture
def owner(database: db.Database):
    """A served domain example.no with the mailbox ola@example.no (returned detached)."""
    from cleanmail import audit, mailboxes

    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, audit.Actor("operator", "test"), "example.no")
        return mailboxes.add_mailbox(
            session, audit.Actor("operator", "test"), "ola@example.no", language="en"
        )


def login_as(client, mailbox) -> None:
    """Log a test client in as a mailbox, the way Flask-Login keeps it in the session."""
    with client.session_transaction() as session:
        session["_user_id"] = f"{mailbox.id}.{mailbox.key_version}"
        session["_fresh"] = True
        session["login_method"] = "link"


def hold_message(
    database: db.Database,
    store: Store,
    mailbox_id: int,
    raw: bytes,
    *,
    at=None,
    sender: str = "spam@spam.example",
    reasons: list | None = None,
    score: float = 7.0,
) -> int:
    """Hold a raw message for a mailbox the way the filter does; its id."""
    from cleanmail import mime, quarantine

    why = reasons or [
        {"code": "SUBJECT_CAPS", "text": "the subject is mostly capital letters", "score": score}
    ]
    with database.session_scope(write=True) as session:
        (message_id,) = quarantine.hold(
            session,
            store,
            raw,
            mime.parse(raw),
            quarantine.Origin(sender),
            [quarantine.Hold(mailbox_id, score, why)],
            retention_days=30,
            now=at,
        )
    return message_id


T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def two_domains(database, store):
    """example.no (ola, per) and other.dk (mette), with held mail in each; ids by name."""
    from cleanmail import audit, mailboxes
    from tests.messages import message

    actor = audit.Actor("operator", "test")
    ids: dict[str, int] = {}
    with database.session_scope(write=True) as session:
        for name in ("example.no", "other.dk"):
            mailboxes.add_domain(session, actor, name)
        boxes = {
            a: mailboxes.add_mailbox(session, actor, a, language="en").id
            for a in ("ola@example.no", "per@example.no", "mette@other.dk")
        }
    held = [
        ("invoice", "ola@example.no", "invoice@supplier.no", "Invoice 2231 for October", 6.0, 0),
        ("newsletter", "ola@example.no", "news@shop.example", "Big autumn SALE", 9.5, 1),
        ("per", "per@example.no", "invoice@supplier.no", "Invoice 2232 reminder", 5.5, 2),
        ("mette", "mette@other.dk", "invoice@supplier.no", "Faktura 2233", 12.0, 3),
        ("virus", "mette@other.dk", "x@evil.example", "Your parcel", 20.0, 4),
    ]
    for key, rcpt, sender, subject, score, hours in held:
        raw = message(subject=subject, sender=sender, to=rcpt, body=f"{key}\n")
        reasons = [
            {
                "code": "BLOCKED_ATTACHMENT" if key == "virus" else "SUBJECT_CAPS",
                "text": "t",
                "score": score,
            }
        ]
        ids[key] = hold_message(
            database,
            store,
            boxes[rcpt],
            raw,
            at=T0 + timedelta(hours=hours),
            sender=sender,
            reasons=reasons,
            score=score,
        )
    ids.update({f"box:{a}": i for a, i in boxes.items()})
    return ids


@pytest.fixture(scope="session")
def rspamd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdServer]:
    """One private rspamd for the session (it takes several seconds to load its rules)."""
    with RspamdServer(tmp_path_factory.mktemp("rspamd")) as rspamd:
        yield rspamd


@pytest.fixture(scope="session")
def spamd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpamdServer]:
    """One private spamd for the session, with TELL allowed (it is slow to start)."""
    with SpamdServer(tmp_path_factory.mktemp("spamd")) as spamd:
        yield spamd


@pytest.fixture
def start_filter(database: db.Database) -> Iterator[Callable[..., FilterThread]]:
    """A factory: ``start_filter(config)`` runs a filter in this process; all stop at the end."""
    started: list[FilterThread] = []

    def start(config: config_module.Config) -> FilterThread:
        config.store_dir.mkdir(parents=True, exist_ok=True)
        thread = FilterThread(config, database).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


# Playwright's sync API marks the main thread's asyncio loop as running between its
# calls, so asyncio.run() fails while it is alive: one browser per test module, not
# for the whole session, so that later test modules are not affected.
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium, shared by the tests of one module; fails if it is missing."""
    from playwright.sync_api import sync_playwright

    from tests.browser import launch

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()
