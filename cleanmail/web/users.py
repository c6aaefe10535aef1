"""Who is logged in: Flask-Login over mailbox rows.

A mailbox's key version ends all its sessions at once; logging out ends one, copies of
its cookie included (``cleanmail.logins``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Flask, session
from flask_babel import lazy_gettext as _l
from flask_login import LoginManager, UserMixin, login_user
from sqlalchemy import bindparam, exists, func, select

from cleanmail import logins, web
from cleanmail.models import EndedSession, Mailbox, MailboxVersion

login_manager = LoginManager()
# Every request of a logged-in owner reads these few columns, built once (not the ORM row:
# its loading cost a tenth of a small page).
_BY_ID = (
    select(
        Mailbox.id,
        Mailbox.address,
        Mailbox.language,
        Mailbox.role,
        Mailbox.key_version,
        Mailbox.timezone,
        Mailbox.disabled,
        func.coalesce(MailboxVersion.version, 0).label("version"),
        exists().where(EndedSession.sid == bindparam("sid")).label("ended"),
    )
    .outerjoin(MailboxVersion, MailboxVersion.mailbox_id == Mailbox.id)
    .where(Mailbox.id == bindparam("id"))
)


class User(UserMixin):
    """The logged-in mailbox, detached from the database session."""

    def __init__(self, mailbox: Mailbox | Any) -> None:
        """Copy what requests need from a mailbox row (an ORM object or a selected row)."""
        self.mailbox_id = mailbox.id
        self.address = mailbox.address
        self.language = mailbox.language
        self.role = mailbox.role
        self.key_version = mailbox.key_version
        self.timezone = mailbox.timezone
        # The version of the mailbox's messages as this request began (read with the
        # user, before anything the page shows); None when not read.
        self.version: int | None = getattr(mailbox, "version", None)

    def get_id(self) -> str:
        """Id and key version: bumping the version ends every session at once."""
        return f"{self.mailbox_id}.{self.key_version}"


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    """The user of a session cookie, if the mailbox still exists and its key is current."""
    mailbox_id, _dot, version = user_id.partition(".")
    if not (mailbox_id.isdigit() and version.isdigit()):
        return None
    # Sessions from before session ids have none ("" is never recorded as ended).
    sid = str(session.get("sid", ""))
    mailbox = (
        web.session().connection().execute(_BY_ID, {"id": int(mailbox_id), "sid": sid}).first()
    )
    if mailbox is None or mailbox.disabled or mailbox.key_version != int(version):
        return None
    if mailbox.ended:  # logged out: this is a copy of an ended session's cookie
        return None
    return User(mailbox)


def log_in(mailbox: Mailbox, method: str) -> None:
    """Start a session for a mailbox ("link", "password" or "totp")."""
    session.clear()  # a fresh session id: nothing from before the login carries over
    session.permanent = True
    login_user(User(mailbox))
    session["login_method"] = method
    session["sid"] = logins.new_id()
    mailbox.last_login_at = datetime.now(UTC)


def init_app(app: Flask) -> None:
    """Attach the login manager."""
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    login_manager.login_message = _l("Please log in to see your quarantine.")
    login_manager.session_protection = "basic"  # phones change address often
