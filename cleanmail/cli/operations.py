"""Operator commands: release and delete in bulk, API tokens, statistics, the audit log."""

from __future__ import annotations

import json
import sys
import threading
from datetime import UTC, datetime
from typing import Any

import click

from cleanmail import apitokens, audit, auditlog, bulk, search, staff, stats
from cleanmail.cli import State, cli, pass_state
from cleanmail.models import BulkJob, BulkStatus, Message
from cleanmail.relay import Relay


def parse_time(value: str | None, option: str) -> datetime | None:
    """``YYYY-MM-DD`` or an ISO time (UTC unless it says otherwise), for --since/--until."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"expected a date like 2026-11-01 or a time like 2026-11-01T08:00, got {value!r}",
            param_hint=option,
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@cli.group("token")
def token_group() -> None:
    """API tokens for the REST API."""


@token_group.command("create")
@click.argument("name")
@click.option(
    "--domain",
    "domains",
    multiple=True,
    metavar="DOMAIN",
    help="Limit the token to this domain (repeat for more). Without it: operator scope.",
)
@pass_state
def token_create(state: State, name: str, domains: tuple[str, ...]) -> None:
    """Create a token and print its secret (shown only this once)."""
    with state.database().session_scope(write=True) as session:
        try:
            created = apitokens.create(session, audit.cli_actor(), name, domains)
        except apitokens.TokenError as exc:
            raise click.ClickException(str(exc)) from None
        scope = ", ".join(created.token.domains) or "operator (every domain)"
    click.echo(f"token {name} created, scope: {scope}", err=True)
    click.echo("Keep the secret now; it cannot be shown again:", err=True)
    click.echo(created.secret)


@token_group.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@click.option("--json", "as_json", is_flag=True, help="A JSON array.")
@pass_state
def token_list(state: State, include_revoked: bool, as_json: bool) -> None:
    """List the tokens (never their secrets)."""
    with state.database().sessions() as session:
        rows = [
            {
                "name": t.name,
                "prefix": t.prefix,
                "scope": t.domains or ["*"],
                "created_at": t.created_at.isoformat(timespec="seconds"),
                "created_by": t.created_by,
                "last_used_at": t.last_used_at and t.last_used_at.isoformat(timespec="seconds"),
                "revoked_at": t.revoked_at and t.revoked_at.isoformat(timespec="seconds"),
            }
            for t in apitokens.list_tokens(session, include_revoked=include_revoked)
        ]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for row in rows:
        state_word = "revoked" if row["revoked_at"] else "active"
        click.echo(
            f"{row['name']}\t{row['prefix']}…\t{','.join(row['scope'])}\t{state_word}"
            f"\tlast used {row['last_used_at'] or 'never'}"
        )
    if not rows:
        click.echo("no tokens", err=True)


@token_group.command("revoke")
@click.argument("name")
@pass_state
def token_revoke(state: State, name: str) -> None:
    """Revoke a token: it stops working at once."""
    with state.database().session_scope(write=True) as session:
        try:
            apitokens.revoke(session, audit.cli_actor(), name)
        except apitokens.TokenError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"token {name} revoked")


@cli.command("stats")
@click.option("--days", default=14, show_default=True, type=click.IntRange(1, 366))
@click.option("--domain", "domains", multiple=True, metavar="DOMAIN", help="Only this domain.")
@click.option("--json", "as_json", is_flag=True, help="Everything as one JSON object.")
@pass_state
def stats_command(state: State, days: int, domains: tuple[str, ...], as_json: bool) -> None:
    """Messages scanned, passed, held and released per day; top reasons and senders."""
    wanted = [d.strip().lower() for d in domains] or None
    with state.database().sessions() as session:
        summary = stats.summary(session, days, wanted)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=1))
        return
    names = stats.DAILY
    click.echo("day         " + " ".join(f"{n:>14}" for n in names))
    for row in summary.days:
        click.echo(f"{row['day']}  " + " ".join(f"{row[n]:>14}" for n in names))
    click.echo("total       " + " ".join(f"{summary.totals[n]:>14}" for n in names))
    click.echo("")
    click.echo(
        f"held since {summary.since}: {summary.held}, released: {summary.released}"
        f" ({summary.release_rate:.1%})"
    )
    click.echo("top reasons:")
    for code, count in summary.top_reasons:
        click.echo(f"  {count:>8}  {code}")
    click.echo("top sending domains held:")
    for domain, count in summary.top_sender_domains:
        click.echo(f"  {count:>8}  {domain}")


@cli.command("audit")
@click.option("--mailbox", default="", help="Events about mailboxes whose address contains this.")
@click.option("--actor", default="", help="Events by an actor whose name or type contains this.")
@click.option("--action", default="", help="Events whose action starts with this.")
@click.option("--since", default=None, help="From this date or time (UTC).")
@click.option("--until", default=None, help="Before this date or time (UTC).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, None))
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header line (no limit).")
@pass_state
def audit_command(
    state: State,
    mailbox: str,
    actor: str,
    action: str,
    since: str | None,
    until: str | None,
    limit: int,
    as_csv: bool,
) -> None:
    """Show the audit log, newest first."""
    criteria = auditlog.Filter(
        mailbox, actor, action, parse_time(since, "--since"), parse_time(until, "--until")
    )
    with state.database().sessions() as session:
        if as_csv:
            for piece in auditlog.to_csv(auditlog.iterate(session, criteria)):
                sys.stdout.write(piece)
            return
        rows = auditlog.search(session, criteria, limit=limit)
    for row in rows:
        detail = json.dumps(row["detail"], ensure_ascii=False, sort_keys=True)
        click.echo(
            f"{row['at'][:19]}  {row['actor_type']}:{row['actor']}  {row['action']}"
            f"  {row['mailbox'] or '-'}  {row['message_id'] or '-'}  {detail}"
        )
    if not rows:
        click.echo("no matching events", err=True)


SHOWN = 20  # matches listed by a dry run


def _bulk_options(func: Any) -> Any:
    for option in reversed(
        [
            click.argument("ids", nargs=-1, type=click.IntRange(1, 2**63 - 1)),
            click.option(
                "--sender", default="", help="From address or envelope sender, or a domain."
            ),
            click.option("--mailbox", default="", help="Recipient mailbox, or a whole domain."),
            click.option("--subject", default="", help="Words that must all be in the subject."),
            click.option("--reason", default="", help="A reason code, e.g. GTUBE."),
            click.option("--since", default=None, help="Held from this date or time (UTC)."),
            click.option("--until", default=None, help="Held before this date or time (UTC)."),
            click.option(
                "--dry-run", is_flag=True, help="Show how many and which; change nothing."
            ),
            click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts)."),
        ]
    ):
        func = option(func)
    return func


def _line(message: Message, recipient: str) -> str:
    sender = message.from_address or message.envelope_sender
    when = f"{message.received_at:%Y-%m-%d %H:%M}"
    return f"{message.id}\t{when}\t{recipient}\t{sender}\t{message.subject[:60]}"


def _bulk(state: State, action: str, options: dict[str, Any]) -> None:
    """Release or delete by id or by search: preview, confirm, then work with progress."""
    statuses = ("new",) if action == "release" else ("new", "released")
    query = search.Query(
        recipient=options["mailbox"],
        sender=options["sender"],
        subject=options["subject"],
        reason=options["reason"],
        since=parse_time(options["since"], "--since"),
        until=parse_time(options["until"], "--until"),
        statuses=statuses,
        ids=tuple(options["ids"]),
    )
    if query.is_empty():
        raise click.UsageError("give message ids or at least one of --sender, --mailbox, ...")
    database = state.database()
    with database.sessions() as session:
        total = search.count(session, staff.OPERATOR, query)
        shown = search.page(session, staff.OPERATOR, query, limit=SHOWN).rows
        lines = [_line(row.message, row.recipient) for row in shown]
    verb = "released" if action == "release" else "deleted"
    click.echo(f"{total} messages match")
    for line in lines:
        click.echo(line)
    if total > len(lines):
        click.echo(f"... and {total - len(lines)} more")
    if options["dry_run"]:
        click.echo(f"dry run: nothing was {verb}")
        return
    if total == 0:
        return
    if not options["yes"]:
        if not sys.stdin.isatty():
            raise click.UsageError("not a terminal: add --yes to confirm")
        click.confirm(f"{action.capitalize()} {total} messages?", abort=True)
    config = state.config
    with database.session_scope(write=True) as session:
        job = bulk.create(session, staff.OPERATOR, audit.cli_actor(), action, query)
    relay = Relay(config.relay, timeout=config.relay_timeout, hostname=config.hostname)
    lock = threading.Lock()  # outcomes come from the job's threads
    with click.progressbar(length=job.total, label=action.capitalize(), file=sys.stderr) as bar:

        def step(_outcome: str) -> None:
            with lock:
                bar.update(1)

        bulk.run(database, state.store, relay, job.id, progress=step)
    with database.sessions() as session:
        current = session.get(BulkJob, job.id)
        assert current is not None
    click.echo(
        f"{current.done} {verb}, {current.failed} failed, {current.skipped} skipped"
        + (f" (last error: {current.last_error})" if current.failed else "")
    )
    if current.failed or current.status != BulkStatus.DONE:
        sys.exit(1)


@cli.command("release")
@_bulk_options
@pass_state
def release_command(state: State, **options: Any) -> None:
    """Release held messages by id or by search (asks first; --yes for scripts)."""
    _bulk(state, "release", options)


@cli.command("delete")
@_bulk_options
@pass_state
def delete_command(state: State, **options: Any) -> None:
    """Delete messages by id or by search (asks first; --yes for scripts)."""
    _bulk(state, "delete", options)
