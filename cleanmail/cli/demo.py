"""``cleanmail demo``: a mailbox with sample mail and a link into it, for a first look."""

from __future__ import annotations

import click

from cleanmail import demo, tokens
from cleanmail.cli import State, cli, pass_state


@cli.command("demo")
@pass_state
def demo_command(state: State) -> None:
    """Create the demo mailbox with a few held messages and print a login link to it."""
    config = state.config
    with state.database().session_scope(write=True) as session:
        mailbox = demo.create(session, state.store, retention_days=config.retention_days)
        url = tokens.login_url(config.base_url, config.secret_keys, mailbox.id, mailbox.key_version)
    click.echo(f"Demo mailbox {mailbox.address}: open this link to see its quarantine")
    click.echo(url)
