"""Domains that Cleanmail serves and the mailboxes in them."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cleanmail import audit, sql
from cleanmail.models import Domain, Mailbox, Message, Status

_ADDRESS = re.compile(
    r"^[^\s\x00-\x1f\x7f@<>()\[\],;:\"\\]{1,64}@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
    r"[a-z0-9-]{2,63}$"
)
_DOMAIN = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")


class MailboxError(ValueError):
    """A domain or mailbox request is not acceptable; the message says why."""


DEFAULT_ZONE = "Europe/Oslo"


def time_zone(name: str | None) -> ZoneInfo:
    """A mailbox's time zone, Oslo when it is unset or unknown."""
    try:
        return ZoneInfo(name or DEFAULT_ZONE)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo(DEFAULT_ZONE)


def normalize_address(text: str) -> str:
    """A mailbox address in canonical form (lower case, IDNA domain), or MailboxError."""
    address = text.strip().strip("<>").strip().lower()
    local, _at, domain = address.rpartition("@")
    try:
        domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        raise MailboxError(f"{text.strip()!r} is not a valid mail address") from None
    address = f"{local}@{domain.rstrip('.')}"
    if len(address) > 320 or not _ADDRESS.match(address):
        raise MailboxError(f"{text.strip()!r} is not a valid mail address")
    return address


def normalize_domain(text: str) -> str:
    """A domain name in canonical form, or MailboxError."""
    name = text.strip().lower().rstrip(".")
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise MailboxError(f"{text.strip()!r} is not a valid domain") from None
    if len(name) > 253 or not _DOMAIN.match(name):
        raise MailboxError(f"{text.strip()!r} is not a valid domain")
    return name


def get_domain(session: Session, name: str) -> Domain:
    """A served domain by name, or MailboxError."""
    domain = session.scalar(select(Domain).where(Domain.name == normalize_domain(name)))
    if domain is None:
        raise MailboxError(f"{name.strip()} is not a served domain")
    return domain


def add_domain(
    session: Session, actor: audit.Actor, name: str, *, quarantine_threshold: float | None = None
) -> Domain:
    """Start serving a domain."""
    name = normalize_domain(name)
    if session.scalar(select(Domain.id).where(Domain.name == name)) is not None:
        raise MailboxError(f"{name} is already served")
    domain = Domain(name=name, quarantine_threshold=quarantine_threshold)
    session.add(domain)
    session.flush()
    audit.record(session, actor, "domain.add", domain=name)
    return domain


def set_thresholds(
    session: Session,
    actor: audit.Actor,
    name: str,
    *,
    quarantine_threshold: float | None,
    reject_threshold: float | None,
) -> Domain:
    """Set a domain's own quarantine and reject thresholds (None: the global default, no reject)."""
    domain = get_domain(session, name)
    for value in (quarantine_threshold, reject_threshold):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise MailboxError(f"a threshold must be a positive number, not {value}")
    if reject_threshold is not None and reject_threshold < (quarantine_threshold or 0):
        raise MailboxError("the reject threshold must not be below the quarantine threshold")
    before = (domain.quarantine_threshold, domain.reject_threshold)
    domain.quarantine_threshold, domain.reject_threshold = quarantine_threshold, reject_threshold
    audit.record(
        session,
        actor,
        "domain.thresholds",
        domain=domain.name,
        before=list(before),
        after=[quarantine_threshold, reject_threshold],
    )
    return domain


def remove_domain(session: Session, actor: audit.Actor, name: str) -> None:
    """Stop serving a domain; refused while its mailboxes still hold quarantined mail."""
    domain = get_domain(session, name)
    held = session.scalar(
        select(func.count(Message.id))
        .join(Mailbox, Message.mailbox_id == Mailbox.id)
        .where(Mailbox.domain_id == domain.id, Message.status == Status.NEW)
    )
    if held:
        raise MailboxError(f"{domain.name} still holds {held} quarantined messages")
    session.delete(domain)
    audit.record(session, actor, "domain.remove", domain=domain.name)
    session.flush()


def list_domains(session: Session) -> list[Domain]:
    """Every served domain, by name."""
    return list(session.scalars(select(Domain).order_by(Domain.name)))


def get_mailbox(session: Session, address: str) -> Mailbox:
    """A mailbox by address, or MailboxError."""
    mailbox = session.scalar(select(Mailbox).where(Mailbox.address == normalize_address(address)))
    if mailbox is None:
        raise MailboxError(f"no mailbox {address.strip()}")
    return mailbox


def add_mailbox(session: Session, actor: audit.Actor, address: str, **settings: object) -> Mailbox:
    """Create a mailbox in a served domain."""
    address = normalize_address(address)
    domain = get_domain(session, address.rpartition("@")[2])
    if session.scalar(select(Mailbox.id).where(Mailbox.address == address)) is not None:
        raise MailboxError(f"{address} already exists")
    mailbox = Mailbox(address=address, domain_id=domain.id, **settings)
    session.add(mailbox)
    session.flush()
    audit.record(session, actor, "mailbox.add", mailbox_id=mailbox.id, address=address)
    return mailbox


def ensure_mailboxes(
    session: Session, addresses: Iterable[str], domain_ids: dict[str, int]
) -> dict[str, int]:
    """Mailbox ids for served addresses, creating the rows for addresses seen the first time."""
    wanted = sorted(set(addresses))
    if not wanted:
        return {}
    query = select(Mailbox.address, Mailbox.id).where(Mailbox.address.in_(wanted))
    found = dict(session.execute(query).all())
    missing = [address for address in wanted if address not in found]
    if missing:
        rows = [{"address": a, "domain_id": domain_ids[a.rpartition("@")[2]]} for a in missing]
        statement = (
            sql.insert(session, Mailbox)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["address"])
        )
        session.execute(statement)
        found.update(session.execute(query).all())
    return found
