"""Commands on the data: domains, mailboxes, lists and the quarantine."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click
from sqlalchemy import func, select

from cleanmail import audit, lists, mailboxes, mime, quarantine
from cleanmail.cli import State, cli, pass_state
from cleanmail.models import Domain, Mailbox, Message, Status

MAX_FILE = 64 * 1024 * 1024


@cli.group("domain")
def domain_group() -> None:
    """Manage the served domains."""


@domain_group.command("add")
@click.argument("name")
@click.option("--threshold", type=float, help="Quarantine threshold for this domain.")
@pass_state
def domain_add(state: State, name: str, threshold: float | None) -> None:
    """Start serving a domain."""
    with state.database().session_scope(write=True) as session:
        domain = mailboxes.add_domain(
            session, audit.cli_actor(), name, quarantine_threshold=threshold
        )
        click.echo(f"serving {domain.name}")


def _threshold(value: str | None, off_word: str) -> float | str | None:
    """A threshold option: a positive number, or ``off_word`` for "none of its own"."""
    if value is None:
        return "unchanged"
    if value.strip().lower() == off_word:
        return None
    try:
        number = float(value)
    except ValueError:
        raise mailboxes.MailboxError(f"{value!r} is not a number or {off_word!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise mailboxes.MailboxError(f"a threshold must be a positive number, not {value!r}")
    return number


@domain_group.command("set")
@click.argument("name")
@click.option("--threshold", help="Quarantine at this score, or 'default' for the global one.")
@click.option("--reject-threshold", help="Refuse mail at this score, or 'never'.")
@pass_state
def domain_set(
    state: State, name: str, threshold: str | None, reject_threshold: str | None
) -> None:
    """Change a domain's thresholds; an option left out keeps its value."""
    quarantine_value = _threshold(threshold, "default")
    reject_value = _threshold(reject_threshold, "never")
    with state.database().session_scope(write=True) as session:
        domain = mailboxes.get_domain(session, name)
        if quarantine_value == "unchanged":
            quarantine_value = domain.quarantine_threshold
        if reject_value == "unchanged":
            reject_value = domain.reject_threshold
        domain = mailboxes.set_thresholds(
            session,
            audit.cli_actor(),
            name,
            quarantine_threshold=quarantine_value,
            reject_threshold=reject_value,
        )
        shown = state.config.quarantine_threshold if quarantine_value is None else quarantine_value
        reject = "never" if reject_value is None else reject_value
        click.echo(f"{domain.name}\tthreshold={shown}\treject={reject}")


@domain_group.command("list")
@pass_state
def domain_list(state: State) -> None:
    """List the served domains."""
    with state.database().session_scope() as session:
        for domain in mailboxes.list_domains(session):
            threshold = domain.quarantine_threshold
            if threshold is None:
                threshold = state.config.quarantine_threshold
            reject = "never" if domain.reject_threshold is None else domain.reject_threshold
            click.echo(f"{domain.name}\tthreshold={threshold}\treject={reject}")


@domain_group.command("remove")
@click.argument("name")
@pass_state
def domain_remove(state: State, name: str) -> None:
    """Stop serving a domain (refused while it holds quarantined mail)."""
    with state.database().session_scope(write=True) as session:
        mailboxes.remove_domain(session, audit.cli_actor(), name)
    click.echo(f"no longer serving {mailboxes.normalize_domain(name)}")


@cli.group("mailbox")
def mailbox_group() -> None:
    """Manage mailboxes."""


@mailbox_group.command("add")
@click.argument("address")
@click.option("--language", type=click.Choice(["nb", "da", "en"]), default="nb")
@pass_state
def mailbox_add(state: State, address: str, language: str) -> None:
    """Create a mailbox in a served domain."""
    with state.database().session_scope(write=True) as session:
        mailbox = mailboxes.add_mailbox(session, audit.cli_actor(), address, language=language)
        click.echo(f"created {mailbox.address}")


@mailbox_group.command("list")
@click.option("--domain", help="Only mailboxes in this domain.")
@pass_state
def mailbox_list(state: State, domain: str | None) -> None:
    """List mailboxes with their count of new quarantined messages."""
    with state.database().session_scope() as session:
        held = (
            select(Message.mailbox_id, func.count().label("n"))
            .where(Message.status == Status.NEW)
            .group_by(Message.mailbox_id)
            .subquery()
        )
        query = (
            select(Mailbox.address, Mailbox.role, func.coalesce(held.c.n, 0))
            .outerjoin(held, held.c.mailbox_id == Mailbox.id)
            .order_by(Mailbox.address)
        )
        if domain:
            query = query.join(Domain, Domain.id == Mailbox.domain_id).where(
                Domain.name == mailboxes.normalize_domain(domain)
            )
        for address, role, count in session.execute(query):
            click.echo(f"{address}\t{role}\tnew={count}")


@mailbox_group.command("show")
@click.argument("address")
@pass_state
def mailbox_show(state: State, address: str) -> None:
    """Show a mailbox's settings and quarantine counts."""
    with state.database().session_scope() as session:
        mailbox = mailboxes.get_mailbox(session, address)
        counts = dict(
            session.execute(
                select(Message.status, func.count())
                .where(Message.mailbox_id == mailbox.id)
                .group_by(Message.status)
            ).all()
        )
        for key in (
            "address",
            "role",
            "language",
            "report_frequency",
            "timezone",
            "key_version",
            "disabled",
            "created_at",
            "last_login_at",
            "last_report_at",
        ):
            click.echo(f"{key}: {getattr(mailbox, key)}")
        click.echo(f"password set: {mailbox.password_hash is not None}")
        click.echo("quarantine: " + ", ".join(f"{s}={counts.get(s, 0)}" for s in Status))


def _owner(session: Any, mailbox: str | None, domain: str | None, is_global: bool) -> dict:
    if sum(bool(x) for x in (mailbox, domain, is_global)) != 1:
        raise lists.ListError("give exactly one of --mailbox, --domain or --global")
    if mailbox:
        return {"mailbox": mailboxes.get_mailbox(session, mailbox)}
    if domain:
        return {"domain": mailboxes.get_domain(session, domain)}
    return {}


def _list_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option("--mailbox", help="A mailbox's own lists."),
            click.option("--domain", help="A domain's lists."),
            click.option("--global", "is_global", is_flag=True, help="The global lists."),
        ]
    ):
        func = option(func)
    return func


@cli.group("lists")
def lists_group() -> None:
    """Manage allow (white) and block (black) lists."""


def _change_lists(
    state: State, owner_options: tuple, allow: tuple[str, ...], block: tuple[str, ...], change: Any
) -> None:
    """Apply ``change(session, action, pattern, owner)`` to every pattern given."""
    if not allow and not block:
        raise lists.ListError("give --allow PATTERN or --block PATTERN")
    with state.database().session_scope(write=True) as session:
        owner = _owner(session, *owner_options)
        for action, patterns in (("allow", allow), ("block", block)):
            for pattern in patterns:
                click.echo(change(session, action, pattern, owner))


@lists_group.command("add")
@_list_options
@click.option("--allow", "allow", multiple=True, help="Pattern to allow.")
@click.option("--block", "block", multiple=True, help="Pattern to block.")
@pass_state
def lists_add(
    state: State,
    mailbox: str | None,
    domain: str | None,
    is_global: bool,
    allow: tuple[str, ...],
    block: tuple[str, ...],
) -> None:
    """Add patterns (address, domain, *@domain, *.domain) to a list."""

    def add(session: Any, action: str, pattern: str, owner: dict) -> str:
        entry = lists.add(session, audit.cli_actor(), action, pattern, **owner)
        return f"{entry.action} {entry.pattern}"

    _change_lists(state, (mailbox, domain, is_global), allow, block, add)


@lists_group.command("remove")
@_list_options
@click.option("--allow", "allow", multiple=True, help="Pattern to take off the allow list.")
@click.option("--block", "block", multiple=True, help="Pattern to take off the block list.")
@pass_state
def lists_remove(
    state: State,
    mailbox: str | None,
    domain: str | None,
    is_global: bool,
    allow: tuple[str, ...],
    block: tuple[str, ...],
) -> None:
    """Remove patterns from a list."""

    def remove(session: Any, action: str, pattern: str, owner: dict) -> str:
        entry = lists.remove(session, audit.cli_actor(), pattern, action=action, **owner)
        return f"removed {entry.pattern} from the {action} list"

    _change_lists(state, (mailbox, domain, is_global), allow, block, remove)


@lists_group.command("show")
@_list_options
@pass_state
def lists_show(state: State, mailbox: str | None, domain: str | None, is_global: bool) -> None:
    """Show a list's entries."""
    with state.database().session_scope() as session:
        for entry in lists.owned_by(session, **_owner(session, mailbox, domain, is_global)):
            click.echo(f"{entry.action}\t{entry.pattern}")


@cli.group("quarantine")
def quarantine_group() -> None:
    """Look at and add to the quarantine."""


def _summary(message: Message, address: str) -> dict[str, Any]:
    return {
        "id": message.id,
        "mailbox": address,
        "sender": message.envelope_sender,
        "from": message.from_header,
        "subject": message.subject,
        "status": message.status,
        "score": message.score,
        "reasons": message.reasons,
        "size": message.size,
        "received_at": message.received_at.isoformat(),
        "expires_at": message.expires_at.isoformat(),
    }


@quarantine_group.command("list")
@click.option("--mailbox", help="Only this mailbox's messages.")
@click.option("--status", type=click.Choice([s.value for s in Status]))
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON array, one object per message.")
@pass_state
def quarantine_list(
    state: State, mailbox: str | None, status: str | None, limit: int, as_json: bool
) -> None:
    """List quarantined messages, newest first."""
    with state.database().session_scope() as session:
        owner = mailboxes.get_mailbox(session, mailbox) if mailbox else None
        found = quarantine.list_messages(session, mailbox=owner, status=status, limit=limit)
        addresses = dict(
            session.execute(
                select(Mailbox.id, Mailbox.address).where(
                    Mailbox.id.in_({m.mailbox_id for m in found})
                )
            ).all()
        )
        rows = [_summary(m, addresses[m.mailbox_id]) for m in found]
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    for row in rows:
        codes = ",".join(r.get("code", "?") for r in row["reasons"])
        click.echo(
            f"{row['id']}\t{row['received_at'][:19]}\t{row['status']}\t{row['mailbox']}\t"
            f"{row['sender'] or '<>'}\t{row['subject'][:60]!s}\t{codes}"
        )


@quarantine_group.command("show")
@click.argument("message_id", type=int)
@click.option("--raw", is_flag=True, help="Print the raw message exactly as received.")
@pass_state
def quarantine_show(state: State, message_id: int, raw: bool) -> None:
    """Show one quarantined message."""
    with state.database().session_scope() as session:
        message = quarantine.get(session, message_id)
        if raw:
            sys.stdout.flush()
            sys.stdout.buffer.write(quarantine.raw(state.store, message))
            return
        row = _summary(message, message.mailbox.address)
    for key, value in row.items():
        if key != "reasons":
            click.echo(f"{key}: {value}")
    click.echo("reasons:")
    for item in row["reasons"]:
        click.echo(f"  {item.get('score', 0):>7.2f}  {item.get('code')}: {item.get('text')}")


@quarantine_group.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rcpt", required=True, help="The mailbox to quarantine it for.")
@click.option("--sender", default="", help="The envelope sender (default: the From address).")
@pass_state
def quarantine_add(state: State, file: Path, rcpt: str, sender: str) -> None:
    """Put a raw message file into a mailbox's quarantine (an mbox From line is dropped)."""
    from cleanmail.filter import pipeline, rules
    from cleanmail.filter.engines import Envelope

    if file.stat().st_size > MAX_FILE:
        raise quarantine.QuarantineError(f"{file} is larger than {MAX_FILE // 2**20} MiB")
    raw = strip_mbox_line(file.read_bytes())
    parsed = mime.parse(raw)
    if not parsed.headers.keys():
        raise quarantine.QuarantineError(f"{file} is not a mail message: it has no headers")
    sender = mailboxes.normalize_address(sender) if sender else parsed.from_address
    address = mailboxes.normalize_address(rcpt)
    envelope = Envelope(sender=sender, recipients=(address,))
    analysis = pipeline.analyze(parsed, envelope, [rules.RulesEngine()])
    with state.database().session_scope(write=True) as session:
        domain = mailboxes.get_domain(session, address.rpartition("@")[2])
        ids_by_address = mailboxes.ensure_mailboxes(session, [address], {domain.name: domain.id})
        mailbox_id = ids_by_address[address]
        manual = pipeline.reason("MANUAL", "added to the quarantine by an operator")
        reasons = [manual, *analysis.reasons()]
        hold = quarantine.Hold(mailbox_id, analysis.result.score, reasons)
        ids = quarantine.hold(
            session,
            state.store,
            raw,
            parsed,
            quarantine.Origin(sender),
            [hold],
            retention_days=state.config.retention_days,
        )
        if not ids:
            raise quarantine.QuarantineError(f"{file} is already in the quarantine of {address}")
        audit.record(
            session, audit.cli_actor(), "message.add", mailbox_id=mailbox_id, message_id=ids[0]
        )
    click.echo(f"quarantined as {ids[0]}")


def strip_mbox_line(raw: bytes) -> bytes:
    """Drop a leading mbox ``From `` line, as in archives of raw mail."""
    if raw.startswith(b"From "):
        end = raw.find(b"\n")
        return raw[end + 1 :] if end >= 0 else b""
    return raw
