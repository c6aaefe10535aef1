"""Staff: operators and domain admins, and the one place that limits what each may see.

An operator sees every mailbox; a domain admin only the mailboxes of the domains
assigned to them. Every console query (and the API's) takes its conditions from
``Access``, so that a domain admin can never reach another domain's mail.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, false, select, true
from sqlalchemy.orm import Session

from cleanmail import audit, mailboxes, passwords
from cleanmail.models import Domain, DomainAdmin, Mailbox, Message, Role

STAFF_ROLES = (Role.OPERATOR, Role.DOMAIN_ADMIN)


class StaffError(ValueError):
    """A staff change that cannot be made; the message says why."""


@dataclass(frozen=True)
class Access:
    """What one member of staff may see: every domain (operator), or the domains listed."""

    role: str
    staff_id: int | None = None
    domain_ids: frozenset[int] | None = None  # None: every domain

    @property
    def operator(self) -> bool:
        """True for an operator, who sees everything (the raw message included)."""
        return self.domain_ids is None

    def mailbox_conditions(self) -> list[Any]:
        """WHERE conditions on ``Mailbox`` for the mailboxes this member may see."""
        if self.domain_ids is None:
            return []
        if not self.domain_ids:
            return [false()]
        return [Mailbox.domain_id.in_(sorted(self.domain_ids))]

    def message_conditions(self) -> list[Any]:
        """WHERE conditions on ``Message`` for the messages this member may see."""
        if self.domain_ids is None:
            return []
        if not self.domain_ids:
            return [false()]
        visible = select(Mailbox.id).where(*self.mailbox_conditions())
        return [Message.mailbox_id.in_(visible)]

    def domain_conditions(self) -> list[Any]:
        """WHERE conditions on ``Domain`` for the domains this member may see."""
        if self.domain_ids is None:
            return [true()]
        if not self.domain_ids:
            return [false()]
        return [Domain.id.in_(sorted(self.domain_ids))]

    def allows_domain(self, domain_id: int | None) -> bool:
        """True when this member may act on a domain (and its lists)."""
        return self.domain_ids is None or (domain_id is not None and domain_id in self.domain_ids)

    def allows_mailbox(self, mailbox: Mailbox) -> bool:
        """True when this member may see and act on a mailbox."""
        return self.allows_domain(mailbox.domain_id)

    def to_json(self) -> list[int] | None:
        """The domain ids to keep with a background job (None: every domain)."""
        return None if self.domain_ids is None else sorted(self.domain_ids)


OPERATOR = Access(Role.OPERATOR)  # the command line, the scheduler: everything


def access_for(session: Session, mailbox: Mailbox) -> Access | None:
    """The access of a mailbox row, or None when it is not staff (or is disabled)."""
    if mailbox.disabled or mailbox.role not in STAFF_ROLES:
        return None
    if mailbox.role == Role.OPERATOR:
        return Access(Role.OPERATOR, mailbox.id)
    return Access(Role.DOMAIN_ADMIN, mailbox.id, frozenset(assigned_domain_ids(session, mailbox)))


def access_from_json(role: str, staff_id: int | None, domain_ids: Sequence[int] | None) -> Access:
    """An access kept with a background job, rebuilt."""
    ids = None if domain_ids is None else frozenset(int(i) for i in domain_ids)
    return Access(role, staff_id, ids)


def assigned_domain_ids(session: Session, mailbox: Mailbox) -> list[int]:
    """The ids of the domains assigned to a domain admin."""
    query = select(DomainAdmin.domain_id).where(DomainAdmin.mailbox_id == mailbox.id)
    return list(session.scalars(query.order_by(DomainAdmin.domain_id)))


def assigned_domains(session: Session, mailbox: Mailbox) -> list[Domain]:
    """The domains assigned to a domain admin, by name."""
    query = select(Domain).join(DomainAdmin, DomainAdmin.domain_id == Domain.id)
    query = query.where(DomainAdmin.mailbox_id == mailbox.id).order_by(Domain.name)
    return list(session.scalars(query))


def list_staff(session: Session) -> list[Mailbox]:
    """Every operator and domain admin, by address."""
    query = select(Mailbox).where(Mailbox.role.in_(list(STAFF_ROLES)))
    return list(session.scalars(query.order_by(Mailbox.address)))


def _role(role: str) -> Role:
    try:
        value = Role(role)
    except ValueError:
        value = None
    if value not in STAFF_ROLES:
        raise StaffError(f"unknown role {role!r}: use operator or domain_admin")
    return value  # type: ignore[return-value]


def add(
    session: Session,
    actor: audit.Actor,
    address: str,
    role: str,
    *,
    password: str | None = None,
    domains: Iterable[str] = (),
) -> Mailbox:
    """Make a mailbox (existing, or a new one outside the served domains) a member of staff."""
    role_value = _role(role)
    address = mailboxes.normalize_address(address)
    mailbox = session.scalar(select(Mailbox).where(Mailbox.address == address))
    if mailbox is not None and mailbox.role in STAFF_ROLES:
        raise StaffError(f"{address} is already {mailbox.role}")
    if password is not None:
        if passwords.unmet_rules(password):
            raise StaffError(
                "the password needs at least 8 characters, with a lower-case letter,"
                " an upper-case letter and a digit"
            )
    if mailbox is None:
        # Staff often sit at the provider's own domain, which Cleanmail need not serve.
        domain = session.scalar(select(Domain).where(Domain.name == address.rpartition("@")[2]))
        mailbox = Mailbox(address=address, domain_id=domain.id if domain else None, language="nb")
        session.add(mailbox)
        session.flush()
    mailbox.role = role_value
    if password is not None:
        mailbox.password_hash = passwords.hash_password(password)
    audit.record(session, actor, "staff.add", mailbox_id=mailbox.id, address=address, role=role)
    if role_value == Role.DOMAIN_ADMIN:
        assign(session, actor, mailbox, domains)
    elif domains:
        raise StaffError("only a domain admin is given domains")
    return mailbox


def get(session: Session, address: str) -> Mailbox:
    """A member of staff by address, or StaffError."""
    mailbox = session.scalar(
        select(Mailbox).where(Mailbox.address == mailboxes.normalize_address(address))
    )
    if mailbox is None or mailbox.role not in STAFF_ROLES:
        raise StaffError(f"{address.strip()} is not staff")
    return mailbox


def set_role(session: Session, actor: audit.Actor, address: str, role: str) -> Mailbox:
    """Change a member's role; an operator made a domain admin starts with no domains."""
    mailbox = get(session, address)
    role_value = _role(role)
    if mailbox.role == role_value:
        return mailbox
    if role_value == Role.OPERATOR:
        session.execute(delete(DomainAdmin).where(DomainAdmin.mailbox_id == mailbox.id))
    old, mailbox.role = mailbox.role, role_value
    mailbox.key_version += 1  # sessions started under the old role end
    audit.record(
        session, actor, "staff.set_role", mailbox_id=mailbox.id, old=old, role=role_value.value
    )
    session.flush()
    return mailbox


def remove(session: Session, actor: audit.Actor, address: str) -> Mailbox:
    """Take a member off the staff: the mailbox stays, as an owner, and their sessions end."""
    mailbox = get(session, address)
    session.execute(delete(DomainAdmin).where(DomainAdmin.mailbox_id == mailbox.id))
    old, mailbox.role = mailbox.role, Role.OWNER
    mailbox.key_version += 1
    audit.record(session, actor, "staff.remove", mailbox_id=mailbox.id, old=old)
    session.flush()
    return mailbox


def assign(
    session: Session, actor: audit.Actor, mailbox: Mailbox, domains: Iterable[str]
) -> list[Domain]:
    """Give a domain admin more domains (served domains only)."""
    if mailbox.role != Role.DOMAIN_ADMIN:
        raise StaffError(f"{mailbox.address} is not a domain admin")
    have = set(assigned_domain_ids(session, mailbox))
    added = []
    for name in domains:
        domain = mailboxes.get_domain(session, name)
        if domain.id in have:
            continue
        session.add(DomainAdmin(mailbox_id=mailbox.id, domain_id=domain.id))
        have.add(domain.id)
        added.append(domain)
        audit.record(session, actor, "staff.assign", mailbox_id=mailbox.id, domain=domain.name)
    session.flush()
    return added


def unassign(
    session: Session, actor: audit.Actor, mailbox: Mailbox, domains: Iterable[str]
) -> None:
    """Take domains away from a domain admin."""
    for name in domains:
        domain = mailboxes.get_domain(session, name)
        gone = session.execute(
            delete(DomainAdmin).where(
                DomainAdmin.mailbox_id == mailbox.id, DomainAdmin.domain_id == domain.id
            )
        )
        if gone.rowcount:  # type: ignore[attr-defined]
            audit.record(
                session, actor, "staff.unassign", mailbox_id=mailbox.id, domain=domain.name
            )
    session.flush()
