"""``cleanmail engine feedback``: owners' decisions on their way to rspamd and spamd."""

from __future__ import annotations

import click

from cleanmail import feedback
from cleanmail.cli import State, pass_state
from cleanmail.cli.engine import engine_group
from cleanmail.filter import daemon
from cleanmail.models import utcnow


@engine_group.command("feedback")
@click.option(
    "--send", is_flag=True, help="Send the lessons that are due now, as the scheduler does."
)
@click.option("--retry-failed", is_flag=True, help="Try the lessons that were given up on again.")
@pass_state
def feedback_command(state: State, send: bool, retry_failed: bool) -> None:
    """Show how releases and blocks reach the external engines (learned, waiting, failed)."""
    database = state.database()
    now = utcnow()
    if retry_failed:
        click.echo(f"{feedback.retry_failed(database, now)} lessons will be tried again")
    if send:
        learners = daemon.external_engines(state.config)
        if not learners:
            raise click.ClickException("no external engine is configured (CLEANMAIL_ENGINES)")
        try:
            for name, tally in feedback.run(database, state.store, learners, now).items():
                click.echo(
                    f"{name}: sent {tally.learned}, will retry {tally.retrying}, "
                    f"gave up {tally.failed}"
                )
        finally:
            for learner in learners:
                learner.close()
    counts = feedback.summary(database)
    if not counts:
        click.echo("no lessons yet")
    for name, tally in sorted(counts.items()):
        click.echo(
            f"{name}: learned {tally['learned']}, waiting {tally['waiting']}, "
            f"failed {tally['failed']}"
        )
    for name, event_id, error in feedback.failures(database, limit=5):
        click.echo(f"  failed: {name}, learning event {event_id}: {error}")
