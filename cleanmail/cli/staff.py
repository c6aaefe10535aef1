"""Staff on the command line: operators and domain admins, the first operator included."""

from __future__ import annotations

import sys

import click

from cleanmail import audit, staff, totp
from cleanmail.cli import State, cli, pass_state
from cleanmail.models import Role


@cli.group("staff")
def staff_group() -> None:
    """Manage operators and domain admins."""


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


@staff_group.command("add")
@click.argument("address")
@click.option(
    "--role",
    type=click.Choice([Role.OPERATOR.value, Role.DOMAIN_ADMIN.value]),
    default=Role.OPERATOR.value,
    show_default=True,
)
@click.option("--domain", "domains", multiple=True, help="A domain a domain admin looks after.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@pass_state
def staff_add(
    state: State, address: str, role: str, domains: tuple[str, ...], password_stdin: bool
) -> None:
    """Make ADDRESS staff with a password; two-step login is set up at the first login."""
    password = _password(password_stdin)
    with state.database().session_scope(write=True) as session:
        member = staff.add(
            session, audit.cli_actor(), address, role, password=password, domains=domains
        )
        click.echo(f"{member.address}\t{member.role}\t{' '.join(sorted(domains))}".rstrip())


@staff_group.command("list")
@pass_state
def staff_list(state: State) -> None:
    """Every member of staff: address, role, two-step login, domains."""
    with state.database().session_scope() as session:
        for member in staff.list_staff(session):
            names = " ".join(d.name for d in staff.assigned_domains(session, member))
            two_step = "totp" if member.totp_secret else "no-totp"
            state_word = "disabled" if member.disabled else "active"
            line = f"{member.address}\t{member.role}\t{two_step}\t{state_word}\t{names}"
            click.echo(line.rstrip())


@staff_group.command("remove")
@click.argument("address")
@pass_state
def staff_remove(state: State, address: str) -> None:
    """Take ADDRESS off the staff (its mailbox stays) and end its sessions."""
    with state.database().session_scope(write=True) as session:
        member = staff.remove(session, audit.cli_actor(), address)
        click.echo(f"{member.address} is no longer staff")


@staff_group.command("set-role")
@click.argument("address")
@click.argument("role", type=click.Choice([Role.OPERATOR.value, Role.DOMAIN_ADMIN.value]))
@pass_state
def staff_set_role(state: State, address: str, role: str) -> None:
    """Change the role of a member of staff (their sessions end)."""
    with state.database().session_scope(write=True) as session:
        member = staff.set_role(session, audit.cli_actor(), address, role)
        click.echo(f"{member.address}\t{member.role}")


@staff_group.command("domains")
@click.argument("address")
@click.option("--add", "added", multiple=True, help="A domain to give.")
@click.option("--remove", "removed", multiple=True, help="A domain to take away.")
@pass_state
def staff_domains(
    state: State, address: str, added: tuple[str, ...], removed: tuple[str, ...]
) -> None:
    """Show, give or take away the domains of a domain admin."""
    with state.database().session_scope(write=True) as session:
        member = staff.get(session, address)
        actor = audit.cli_actor()
        if added:
            staff.assign(session, actor, member, added)
        if removed:
            staff.unassign(session, actor, member, removed)
        for domain in staff.assigned_domains(session, member):
            click.echo(domain.name)


@staff_group.command("reset-totp")
@click.argument("address")
@pass_state
def staff_reset_totp(state: State, address: str) -> None:
    """Forget a member's authenticator (a lost phone): they set it up again at login."""
    with state.database().session_scope(write=True) as session:
        member = staff.get(session, address)
        totp.disable(session, audit.cli_actor(), member)
        member.key_version += 1
        click.echo(f"{member.address} sets up two-step login again at the next login")
