"""Commands for scheduled work: the scheduler daemon and a purge by hand."""

from __future__ import annotations

import sys

import click

from cleanmail import purge
from cleanmail.cli import State, cli, pass_state
from cleanmail.models import utcnow


@cli.command("scheduler")
@pass_state
def scheduler_command(state: State) -> None:
    """Run the scheduled jobs (reports, purge, bulk, learning, feedback); one leader."""
    from cleanmail import scheduler

    try:
        code = scheduler.run(state.config)
    except scheduler.SchedulerError as exc:
        click.echo(f"cleanmail: error: {exc}", err=True)
        code = 1
    sys.exit(code)


@cli.command("purge")
@click.option("--dry-run", is_flag=True, help="Count what would go; change nothing.")
@pass_state
def purge_command(state: State, dry_run: bool) -> None:
    """Expire messages past their retention and delete files no message refers to."""
    result = purge.run(state.database(), state.store, utcnow(), dry_run=dry_run)
    verb = "would expire" if dry_run else "expired"
    files = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {result.expired} messages; {files} {result.orphans} unreferenced files")
