"""Quarantine reports from the command line: send what is due now, and see how sending goes."""

from __future__ import annotations

import sys
from typing import Any

import click

from cleanmail import mailboxes, reports
from cleanmail.cli import State, cli, pass_state
from cleanmail.models import utcnow
from cleanmail.relay import Relay


@cli.group("reports")
def reports_group() -> None:
    """Quarantine reports to mailbox owners."""


class _Progress:
    """A click progress bar over the reports being sent, shown only in a terminal."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label="Sending reports", file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@reports_group.command("send")
@click.option("--now", "ignore_schedule", is_flag=True, help="Ignore the due time.")
@click.option("--mailbox", "address", metavar="ADDR", help="Only this mailbox.")
@click.option("--dry-run", is_flag=True, help="Show who would get a report; change nothing.")
@pass_state
def send(state: State, ignore_schedule: bool, address: str | None, dry_run: bool) -> None:
    """Send the reports that are due (with --now: report everything new)."""
    config = state.config
    database = state.database()
    if address is not None:
        with database.sessions() as session:
            address = mailboxes.get_mailbox(session, address).address
    if dry_run:
        result = reports.run(
            database,
            None,  # a dry run sends nothing
            config,
            utcnow(),
            trigger="cli",
            mailbox=address,
            dry_run=True,
            ignore_schedule=ignore_schedule,
            on_mailbox=lambda addr, count: click.echo(f"{addr}\t{count}"),
        )
        click.echo(f"{result.prepared} reports would be sent (dry run: nothing changed)")
        return
    relay = Relay(config.relay, timeout=config.relay_timeout, hostname=config.hostname)
    progress = _Progress() if sys.stdout.isatty() else None
    try:
        result = reports.run(
            database,
            relay,
            config,
            utcnow(),
            trigger="cli",
            mailbox=address,
            ignore_schedule=ignore_schedule,
            progress=progress,
        )
    finally:
        if progress is not None:
            progress.close()
        relay.close()
    click.echo(f"prepared {result.prepared}, sent {result.sent}, failed {result.failed}")
    if result.failed:
        sys.exit(1)


@reports_group.command("status")
@pass_state
def status(state: State) -> None:
    """Show the last run and the reports waiting to be sent."""
    with state.database().sessions() as session:
        info = reports.status(session)
    last = info["last_run"]
    if last is None:
        click.echo("last run: never")
    else:
        click.echo(
            f"last run: {last['started_at']:%Y-%m-%d %H:%M:%S} UTC ({last['trigger']}), "
            f"finished {last['finished_at'] or 'no'}, sent {last['sent']}, failed {last['failed']}"
        )
    click.echo(f"sent: {info['sent']}")
    click.echo(f"pending: {info['pending']} (retrying: {info['retrying']})")
    click.echo(f"failed: {info['failed']}")
    for row in info["retries"]:
        click.echo(
            f"  report {row['id']}: {row['attempts']} attempts, next {row['next_attempt_at']}, "
            f"{row['last_error']}"
        )
