"""The ``cleanmail`` command."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from cleanmail import config as config_module
from cleanmail import db, learning, lists, logs, mailboxes, quarantine, store
from cleanmail.bulk import BulkError
from cleanmail.filter import classifier
from cleanmail.search import SearchError
from cleanmail.staff import StaffError

# Errors that mean "bad input or setup": one clear line and a non-zero exit, no traceback.
CLEAR_ERRORS = (
    config_module.ConfigError,
    db.DatabaseError,
    mailboxes.MailboxError,
    lists.ListError,
    quarantine.QuarantineError,
    store.StoreError,
    StaffError,
    SearchError,
    BulkError,
    learning.LearningError,
    classifier.ModelError,
)


class Group(click.Group):
    """A command group that turns our own errors into one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command, reporting known errors without a traceback."""
        try:
            return super().invoke(ctx)
        except CLEAR_ERRORS as exc:
            click.echo(f"cleanmail: error: {exc}", err=True)
            sys.exit(2 if isinstance(exc, config_module.ConfigError) else 1)


class State:
    """The configuration and database, made on first use by a command."""

    def __init__(self) -> None:
        self._config: config_module.Config | None = None
        self._database: db.Database | None = None

    @property
    def config(self) -> config_module.Config:
        """The loaded configuration."""
        if self._config is None:
            self._config = config_module.load()
        return self._config

    def database(self, *, check: bool = True) -> db.Database:
        """The database, checked to be migrated unless told otherwise."""
        if self._database is None:
            self._database = db.Database(self.config.database_url)
            if check:
                db.check_migrated(self._database)
        return self._database

    @property
    def store(self) -> store.Store:
        """The raw-message store."""
        return store.Store(self.config.store_dir)


pass_state = click.make_pass_decorator(State, ensure=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debugging detail.")
@click.version_option(package_name="cleanmail")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Cleanmail: the quarantine manager of an internet provider's mail platform."""
    ctx.ensure_object(State)
    state = ctx.find_object(State)
    try:
        level, fmt = state.config.log_level, state.config.log_format
    except config_module.ConfigError:
        level, fmt = "INFO", "text"  # the command itself reports the bad setting
    logs.configure("DEBUG" if verbose else level, fmt)
    # Alembic narrates every step at INFO; the commands say what matters themselves.
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # aiosmtpd logs every command at INFO: that costs more than our checks of a message.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # APScheduler's executor logs two lines per job run, a dozen a minute: only trouble.
    logging.getLogger("apscheduler.executors").setLevel(
        logging.DEBUG if verbose else logging.WARNING
    )


def main() -> None:
    """Entry point of the console script."""
    from cleanmail.cli import (  # noqa: F401 - registers the commands
        daemons,
        data,
        demo,
        engine,
        feedback,
        links,
        operations,
        reports,
        scheduler,
        staff,
    )

    try:
        cli.main(prog_name="cleanmail", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("cleanmail: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        # Click's own usage errors, made one line like ours.
        click.echo(f"cleanmail: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
