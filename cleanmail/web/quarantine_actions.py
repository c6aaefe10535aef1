"""What the owner's buttons do to held messages: release, allow, delete, block, with a flash.

The domain functions audit each change; this module commits after every release, so
that a message the mail server took is marked released even if a later one fails.
"""

from __future__ import annotations

from collections.abc import Sequence

from flask import flash
from flask_babel import gettext as _
from flask_babel import ngettext
from sqlalchemy.orm import Session

from cleanmail import learning, lists, mime, quarantine, web
from cleanmail.models import Label, ListAction, Mailbox, Message

MAX_SELECTED = 200
ACTIONS = ("release", "release_allow_sender", "release_allow_domain", "delete", "block")
# The release form's "allow" field: nothing, the sender, or the sender's domain.
RELEASES = {"": "release", "sender": "release_allow_sender", "domain": "release_allow_domain"}


def sender_pattern(message: Message, *, domain: bool) -> str:
    """What to put on a list for a message's sender: its address, or its domain."""
    address = message.from_address or message.envelope_sender.strip().lower()
    if domain:
        return message.sender_domain or mime.address_domain(address)
    return address


def apply(session: Session, mailbox: Mailbox, messages: Sequence[Message], action: str) -> bool:
    """Carry out one action on some of the owner's messages and flash the outcome.

    Returns False when a release did not go through (the messages stay held).
    """
    if action == "delete":
        for message in messages:
            quarantine.delete(session, web.store(), message, web.actor())
        session.commit()
        count = len(messages)
        flash(ngettext("%(num)d message deleted.", "%(num)d messages deleted.", count), "success")
        return True
    if action == "block":
        add_senders(session, mailbox, messages, ListAction.BLOCK, domain=False)
        for message in messages:  # blocking the sender says this message was spam
            learning.record(
                session, message, Label.SPAM, web.actor(), source="block", store=web.store()
            )
        session.commit()
        return True
    if action in ("release_allow_sender", "release_allow_domain"):
        domain = action == "release_allow_domain"
        add_senders(session, mailbox, messages, ListAction.ALLOW, domain=domain)
        session.commit()
    return release(session, messages)


def add_senders(
    session: Session,
    mailbox: Mailbox,
    messages: Sequence[Message],
    action: ListAction,
    *,
    domain: bool,
) -> None:
    """Put the messages' senders (or their domains) on the owner's allow or block list."""
    patterns = dict.fromkeys(sender_pattern(message, domain=domain) for message in messages)
    added, refused = [], []
    for pattern in patterns:
        try:
            if not pattern:
                raise lists.ListError("no sender")
            added.append(lists.add(session, web.actor(), action, pattern, mailbox=mailbox).pattern)
        except lists.ListError:
            refused.append(pattern or _("(no sender address)"))
    if added and action == ListAction.ALLOW:
        flash(_("Added to your whitelist: %(patterns)s", patterns=", ".join(added)), "success")
    elif added:
        flash(_("Added to your blacklist: %(patterns)s", patterns=", ".join(added)), "success")
    if refused:
        flash(
            _("This sender cannot be put on a list: %(patterns)s", patterns=", ".join(refused)),
            "error",
        )


def release(session: Session, messages: Sequence[Message]) -> bool:
    """Release each message once, committing after each; flash what happened."""
    released = already = gone = 0
    errors: list[str] = []
    for message in messages:
        try:
            delivered = quarantine.release(session, web.store(), web.relay(), message, web.actor())
        except quarantine.ReleaseFailed as exc:
            session.commit()  # the error and the attempt are kept, for the owner to see
            errors.append(str(exc))
            continue
        except quarantine.QuarantineError:
            session.rollback()
            gone += 1
            continue
        session.commit()
        released += int(delivered)
        already += int(not delivered)
    _flash_releases(released, already, gone, errors)
    return not errors and not gone


def _flash_releases(released: int, already: int, gone: int, errors: list[str]) -> None:
    if released:
        flash(
            ngettext(
                "%(num)d message released to your inbox.",
                "%(num)d messages released to your inbox.",
                released,
            ),
            "success",
        )
    if already:
        flash(
            ngettext(
                "%(num)d message was already released.",
                "%(num)d messages were already released.",
                already,
            ),
            "info",
        )
    if gone:
        flash(
            ngettext(
                "%(num)d message could not be released: it was deleted or has expired.",
                "%(num)d messages could not be released: they were deleted or have expired.",
                gone,
            ),
            "error",
        )
    if errors:
        flash(
            ngettext(
                "The mail server did not accept %(num)d message. "
                "It stays in the quarantine; try again later.",
                "The mail server did not accept %(num)d messages. "
                "They stay in the quarantine; try again later.",
                len(errors),
            ),
            "error",
        )
