"""Builds the filter's parts from the configuration and runs it in this process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cleanmail import db
from cleanmail.config import Config
from cleanmail.filter import auth, rules, server
from cleanmail.filter.pipeline import Pipeline
from cleanmail.relay import Relay
from cleanmail.store import Store


def build_pipeline(config: Config, database: db.Database) -> Pipeline:
    """The verdict pipeline with the configured engines."""
    return Pipeline(
        config,
        database,
        Store(config.store_dir),
        Relay(config.relay, timeout=config.relay_timeout, hostname=config.hostname),
        [rules.RulesEngine()],
        auth.Authenticator(
            config.trusted_authserv_id,
            dns_timeout=config.dns_timeout,
            dns_servers=config.dns_servers,
        ),
    )


def run(config: Config, *, ready: Callable[[], None] | None = None) -> None:
    """Serve SMTP until told to stop; refuses to start on an unmigrated database."""
    database = db.Database(config.database_url, pool_size=20)
    db.check_migrated(database)
    try:
        asyncio.run(server.serve(config, build_pipeline(config, database), ready=ready))
    finally:
        database.dispose()
