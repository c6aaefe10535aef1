"""Login links that operators hand to a mailbox owner."""

from __future__ import annotations

import click

from cleanmail import audit, mailboxes
from cleanmail.cli import State, cli, pass_state


@cli.command("login-link")
@click.argument("address")
@pass_state
def login_link(state: State, address: str) -> None:
    """Print a login link for a mailbox (valid 15 days; recorded in the audit log)."""
    from cleanmail.web import auth  # the web package is heavy; only this command needs it

    with state.database().session_scope(write=True) as session:
        mailbox = mailboxes.get_mailbox(session, address)
        if mailbox.disabled:
            raise mailboxes.MailboxError(f"{mailbox.address} is disabled")
        url = auth.login_url(mailbox, state.config)
        audit.record(
            session,
            audit.cli_actor(),
            "login_link.issue",
            mailbox_id=mailbox.id,
            address=mailbox.address,
        )
    click.echo(url)
