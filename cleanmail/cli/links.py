"""Login links that operators hand to a mailbox owner."""

from __future__ import annotations

import click

from cleanmail import audit, mailboxes, tokens
from cleanmail.cli import State, cli, pass_state


@cli.command("login-link")
@click.argument("address")
@pass_state
def login_link(state: State, address: str) -> None:
    """Print a login link for a mailbox (valid 15 days; recorded in the audit log)."""
    with state.database().session_scope(write=True) as session:
        mailbox = mailboxes.get_mailbox(session, address)
        if mailbox.disabled:
            raise mailboxes.MailboxError(f"{mailbox.address} is disabled")
        config = state.config
        url = tokens.login_url(config.base_url, config.secret_keys, mailbox.id, mailbox.key_version)
        audit.record(
            session,
            audit.cli_actor(),
            "login_link.issue",
            mailbox_id=mailbox.id,
            address=mailbox.address,
        )
    click.echo(url)
