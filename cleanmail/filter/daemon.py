"""Builds the filter's parts from the configuration and runs it, in one or more processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable

import uvloop

from cleanmail import db
from cleanmail.config import Config
from cleanmail.filter import auth, learned, rules, server
from cleanmail.filter.engines import Engine, ExternalEngine
from cleanmail.filter.pipeline import Pipeline
from cleanmail.filter.reinject import Reinjector
from cleanmail.filter.rspamd import RspamdEngine
from cleanmail.filter.spamassassin import SpamAssassinEngine
from cleanmail.store import Store

log = logging.getLogger(__name__)


def build_pipeline(config: Config, database: db.Database) -> Pipeline:
    """The verdict pipeline with the configured engines."""
    return Pipeline(
        config,
        database,
        Store(config.store_dir),
        Reinjector(config.relay, timeout=config.relay_timeout, hostname=config.hostname),
        engines(config, database),
        auth.Authenticator(
            config.trusted_authserv_id,
            dns_timeout=config.dns_timeout,
            dns_servers=config.dns_servers,
        ),
        external=external_engines(config),
    )


def engines(config: Config, database: db.Database) -> list[Engine]:
    """The embedded engines: the rules (unless left out of the engines), then the classifier."""
    found: list[Engine] = [rules.RulesEngine()] if "rules" in config.engines else []
    if config.classifier:
        watcher = learned.ModelWatcher(database, every=config.classifier_reload)
        found.append(learned.LearnedEngine(watcher))
    return found


def external_engines(config: Config) -> list[ExternalEngine]:
    """The configured external engines (rspamd, spamd), in the configured order."""
    built: list[ExternalEngine] = []
    for name in config.external_engines:
        if name == "rspamd":
            built.append(
                RspamdEngine(
                    config.rspamd_url,
                    controller_url=config.rspamd_controller_url,
                    password=config.rspamd_password,
                    timeout=config.engine_timeout,
                )
            )
        elif name == "spamassassin":
            built.append(
                SpamAssassinEngine(
                    config.spamd_host,
                    config.spamd_port,
                    timeout=config.engine_timeout,
                    reject_score=config.spamd_reject_score,
                )
            )
    return built


def run(config: Config, *, ready: Callable[[], None] | None = None) -> int:
    """Serve SMTP until told to stop; refuses to start on an unmigrated database."""
    db.check_ready(config.database_url)
    config.store_dir.mkdir(parents=True, exist_ok=True)
    listener = server.bind(config)
    if config.filter_workers == 1:
        serve_one(config, listener, ready=ready)
        return 0
    return _run_workers(config, listener)


def serve_one(
    config: Config, listener: socket.socket, *, ready: Callable[[], None] | None = None
) -> None:
    """One filter process: its own database pool, event loop and worker threads."""
    database = db.Database(config.database_url, pool_size=20)
    pipeline = build_pipeline(config, database)
    try:
        # uvloop's event loop spends about half as much CPU per SMTP command as asyncio's.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(server.serve(config, pipeline, ready=ready, listener=listener))
    finally:
        database.dispose()


def _run_workers(config: Config, listener: socket.socket) -> int:
    """Fork workers that accept on the parent's socket; pass signals on to them."""
    children: list[int] = []
    for _ in range(config.filter_workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                serve_one(config, listener)
            except BaseException:
                log.exception("filter worker failed")
                code = 1
            os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                continue

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = 0
    for child in children:
        _pid, status = os.waitpid(child, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    return 1 if failed else 0
