"""Allow and block lists: parsing, validation, matching, and the decision they give.

Patterns are addresses, domains and ``*`` wildcards: ``user@example.com``,
``news-*@example.com``, ``example.com`` (the whole domain, also written
``*@example.com``), ``*.example.com`` (the domain and every subdomain).
They match case-insensitively against the envelope sender and the From address.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from cleanmail import audit
from cleanmail.models import Domain, ListAction, ListEntry, Mailbox, Scope

_LOCAL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
SCOPE_RANK = {Scope.MAILBOX: 3, Scope.DOMAIN: 2, Scope.GLOBAL: 1}


class ListError(ValueError):
    """A list pattern or change is not acceptable; the message says why."""


def normalize(text: str) -> str:
    """Validate a pattern and return its canonical form, or raise ListError."""
    pattern = text.strip().strip("<>").strip().lower()
    if not pattern:
        raise ListError("the pattern is empty")
    if len(pattern) > 320:
        raise ListError("the pattern is longer than 320 characters")
    pattern = re.sub(r"\*{2,}", "*", pattern)  # "**" means what "*" means
    if pattern.startswith("*@"):
        pattern = pattern[2:]
    local, at, domain = pattern.rpartition("@")
    if at and not _LOCAL.match(local):
        raise ListError(f"{text.strip()!r} is not a valid address")
    domain = _normalize_domain(domain, text)
    if at and local.strip("*") == "":
        return domain
    return f"{local}@{domain}" if at else domain


def _normalize_domain(domain: str, original: str) -> str:
    wildcard = domain.startswith("*.")
    name = domain[2:] if wildcard else domain
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise ListError(f"{original.strip()!r} has an invalid domain") from None
    labels = name.rstrip(".").split(".")
    if not all(_LABEL.match(label) for label in labels) or (len(labels) < 2 and not wildcard):
        raise ListError(f"{original.strip()!r} is not an address or a domain")
    return ("*." if wildcard else "") + ".".join(labels)


def specificity(pattern: str) -> int:
    """How narrowly a pattern matches: an exact address beats a wildcard, beats a domain."""
    if "@" in pattern:
        return 3 if "*" not in pattern else 2
    return 1 if not pattern.startswith("*.") else 0


def matches(pattern: str, address: str) -> bool:
    """True when an address falls under a (normalized) pattern.

    Matching takes time linear in the address: a pattern like ``a*a*a*a*@x`` turned into
    a regular expression would backtrack exponentially on a hostile sender address.
    """
    local, at, domain = address.lower().rpartition("@")
    if not at:
        return False
    domain = domain.rstrip(".")
    local_pattern, pattern_at, domain_pattern = pattern.rpartition("@")
    if domain_pattern.startswith("*."):
        base = domain_pattern[2:]
        if domain != base and not domain.endswith("." + base):
            return False
    elif domain != domain_pattern:
        return False
    return not pattern_at or _glob(local_pattern, local)


def _glob(pattern: str, text: str) -> bool:
    """Whether text matches a pattern whose only wildcard is ``*``, in linear time.

    The pieces between stars must appear in order; taking each at its leftmost place
    never loses a match, so no backtracking is needed.
    """
    first, *middle, last = pattern.split("*") if "*" in pattern else (pattern, pattern)
    if "*" not in pattern:
        return pattern == text
    if len(first) + len(last) > len(text) or not text.startswith(first):
        return False
    if not text.endswith(last):
        return False
    position, end = len(first), len(text) - len(last)
    for piece in middle:
        found = text.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


@dataclass(frozen=True)
class Match:
    """The list entry that decides for one recipient, and which sender it matched."""

    entry_id: int
    scope: str
    action: str
    pattern: str
    via: str  # "envelope" or "from"
    address: str


@dataclass(frozen=True)
class Rule:
    """A list entry as the filter sees it (detached from the session)."""

    id: int
    scope: str
    action: str
    pattern: str
    mailbox_id: int | None
    domain_id: int | None


def decide(rules: Iterable[Rule], senders: Sequence[tuple[str, str]]) -> list[Match]:
    """Every matching entry, the one that decides first.

    The mailbox's own lists beat the domain's, which beat the global ones; within one
    owner a narrower pattern wins, and block wins a tie. ``senders`` pairs a label
    ("envelope", "from") with an address.
    """
    found: list[tuple[tuple[int, int, int], Match]] = []
    for rule in rules:
        for via, address in senders:
            if matches(rule.pattern, address):
                rank = (
                    SCOPE_RANK[Scope(rule.scope)],
                    specificity(rule.pattern),
                    1 if rule.action == ListAction.BLOCK else 0,
                )
                found.append(
                    (rank, Match(rule.id, rule.scope, rule.action, rule.pattern, via, address))
                )
    found.sort(key=lambda pair: pair[0], reverse=True)
    return [match for _rank, match in found]


def shared_rules(session: Session) -> list[Rule]:
    """The global entries and every domain's entries (few, and cached by the filter)."""
    table = ListEntry.__table__
    query = select(
        table.c.id,
        table.c.scope,
        table.c.action,
        table.c.pattern,
        table.c.mailbox_id,
        table.c.domain_id,
    ).where(table.c.scope.in_([Scope.GLOBAL, Scope.DOMAIN]))
    return [Rule(*row) for row in session.execute(query)]


def mailbox_rules(
    connection: Connection, addresses: Iterable[str]
) -> tuple[dict[str, int], list[Rule]]:
    """Mailbox ids by address and those mailboxes' own entries, in one query."""
    return read_mailbox_rules(connection.connection, connection.dialect.paramstyle, addresses)


def read_mailbox_rules(
    dbapi_connection: Any, paramstyle: str, addresses: Iterable[str]
) -> tuple[dict[str, int], list[Rule]]:
    """The same on the driver's own connection (``paramstyle``: the driver's).

    The filter runs this for every message, so it is plain SQL on a driver cursor:
    building it through the ORM cost five times the query itself, and even a Core
    connection's set-up cost more than the query.
    """
    wanted = sorted(set(addresses))
    marker = "?" if paramstyle == "qmark" else "%s"
    placeholders = ", ".join([marker] * len(wanted))  # markers only, never values
    query = (
        "SELECT m.address, m.id, e.id, e.action, e.pattern FROM mailboxes m"  # noqa: S608
        " LEFT OUTER JOIN list_entries e ON e.mailbox_id = m.id AND e.scope = 'mailbox'"
        " WHERE m.address IN (" + placeholders + ")"
    )
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(query, tuple(wanted))
        found = cursor.fetchall()
    finally:
        cursor.close()
    ids: dict[str, int] = {}
    rules: list[Rule] = []
    for address, mailbox_id, entry_id, action, pattern in found:
        ids[address] = mailbox_id
        if entry_id is not None:
            rules.append(Rule(entry_id, Scope.MAILBOX, action, pattern, mailbox_id, None))
    return ids, rules


def owned_by(
    session: Session, *, mailbox: Mailbox | None = None, domain: Domain | None = None
) -> list[ListEntry]:
    """The entries of one owner (a mailbox, a domain, or global when neither is given)."""
    query = select(ListEntry).where(*_owner_filter(mailbox, domain))
    return list(session.scalars(query.order_by(ListEntry.action, ListEntry.pattern)))


def _owner_filter(mailbox: Mailbox | None, domain: Domain | None) -> list:
    if mailbox is not None:
        return [ListEntry.scope == Scope.MAILBOX, ListEntry.mailbox_id == mailbox.id]
    if domain is not None:
        return [ListEntry.scope == Scope.DOMAIN, ListEntry.domain_id == domain.id]
    return [ListEntry.scope == Scope.GLOBAL]


def add(
    session: Session,
    actor: audit.Actor,
    action: str,
    pattern: str,
    *,
    mailbox: Mailbox | None = None,
    domain: Domain | None = None,
    comment: str = "",
) -> ListEntry:
    """Put a pattern on an owner's allow or block list, moving it off the other list."""
    action = ListAction(action)
    canonical = normalize(pattern)
    scope = Scope.MAILBOX if mailbox else Scope.DOMAIN if domain else Scope.GLOBAL
    existing = session.scalars(
        select(ListEntry).where(*_owner_filter(mailbox, domain), ListEntry.pattern == canonical)
    ).first()
    if existing is not None and existing.action == action:
        return existing
    if existing is not None:
        existing.action = action
        entry = existing
    else:
        entry = ListEntry(
            scope=scope,
            action=action,
            pattern=canonical,
            mailbox_id=mailbox.id if mailbox else None,
            domain_id=domain.id if domain else None,
            comment=comment[:255],
        )
        session.add(entry)
    session.flush()
    audit.record(
        session,
        actor,
        f"list.{action.value}",
        mailbox_id=mailbox.id if mailbox else None,
        scope=scope.value,
        pattern=canonical,
        domain=domain.name if domain else None,
        moved=existing is not None,
    )
    return entry


def remove(
    session: Session,
    actor: audit.Actor,
    pattern: str,
    *,
    action: str | None = None,
    mailbox: Mailbox | None = None,
    domain: Domain | None = None,
) -> ListEntry:
    """Take a pattern off an owner's lists (off one list when ``action`` is given)."""
    canonical = normalize(pattern)
    entry = session.scalars(
        select(ListEntry).where(*_owner_filter(mailbox, domain), ListEntry.pattern == canonical)
    ).first()
    if entry is None or (action is not None and entry.action != action):
        raise ListError(f"{canonical} is not on the {action or 'allow or block'} list")
    session.delete(entry)
    audit.record(
        session,
        actor,
        "list.remove",
        mailbox_id=mailbox.id if mailbox else None,
        scope=entry.scope,
        pattern=canonical,
        action=entry.action,
        domain=domain.name if domain else None,
    )
    session.flush()
    return entry
