"""Getting in and out: report links, fresh links by mail, password and two-step login."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import flask
from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_babel import force_locale
from flask_babel import gettext as _
from flask_login import current_user, logout_user
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from cleanmail import (
    audit,
    logins,
    mailboxes,
    mailer,
    mime,
    passwords,
    ratelimit,
    staff,
    tokens,
    totp,
    web,
)
from cleanmail.config import Config
from cleanmail.models import Mailbox
from cleanmail.relay import Relay, RelayError
from cleanmail.tokens import LOGIN_LINK_DAYS, TokenExpired, TokenInvalid
from cleanmail.web import users
from cleanmail.web.errors import render_error

log = logging.getLogger(__name__)
bp = Blueprint("auth", __name__)

FAILURE_DELAY = 0.75  # seconds each failed attempt waits, to slow guessing; tests set 0
TOTP_PENDING_SECONDS = 300  # between a right password and the code
LINK_RETRY_DELAYS = (10.0, 60.0, 300.0)  # seconds before each new try of a refused link mail


@dataclass(frozen=True)
class Limit:
    """At most ``count`` attempts per ``window``."""

    count: int
    window: timedelta


LINKS_PER_ADDRESS = Limit(3, timedelta(hours=1))
LINKS_PER_CLIENT = Limit(20, timedelta(hours=1))
LINKS_OVERALL = Limit(1000, timedelta(hours=1))  # caps the mail an attacker can make us send
FAILURES_PER_ADDRESS = Limit(10, timedelta(minutes=15))
FAILURES_PER_CLIENT = Limit(50, timedelta(minutes=15))
CODE_FAILURES_PER_MAILBOX = Limit(5, timedelta(minutes=15))

Check = tuple[str, Limit]


def login_url(mailbox: Mailbox, config: Config | None = None) -> str:
    """An absolute report link that logs a mailbox in (valid 15 days, revocable)."""
    config = config or web.config()
    return tokens.login_url(config.base_url, config.secret_keys, mailbox.id, mailbox.key_version)


@bp.context_processor
def _template_values() -> dict[str, Any]:
    return {"link_days": LOGIN_LINK_DAYS}


def _client() -> str:
    """The client to count attempts under; an IPv6 client is its /64, which it can't leave."""
    address = request.remote_addr or "unknown"
    if ":" in address:
        try:
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        except ValueError:
            return address
    return address


def _address(text: str) -> str | None:
    try:
        return mailboxes.normalize_address(text)
    except mailboxes.MailboxError:
        return None


def _over(db: Session, checks: list[Check]) -> bool:
    return any(ratelimit.exceeded(db, k, limit=lim.count, window=lim.window) for k, lim in checks)


def _count(db: Session, checks: list[Check]) -> bool:
    """Count an attempt under every key; False when any of them is over its limit."""
    results = [ratelimit.hit(db, k, limit=lim.count, window=lim.window) for k, lim in checks]
    return all(results)


def _link_mailbox(db: Session, payload: Any, *, current: bool = True) -> Mailbox | None:
    """The enabled mailbox a link's payload names (with its current key version if asked)."""
    if not isinstance(payload, dict):
        return None
    mailbox_id, version = payload.get("m"), payload.get("v")
    if not isinstance(mailbox_id, int) or not isinstance(version, int):
        return None
    mailbox = db.get(Mailbox, mailbox_id)
    if mailbox is None or mailbox.disabled:
        return None
    if current and mailbox.key_version != version:
        return None
    return mailbox


def _invalid_link() -> tuple[str, int]:
    return render_template("auth/link_invalid.html"), 400


@bp.get("/l/<token>")
def link(token: str) -> Response | tuple[str, int]:
    """Log in from a report link, then leave the URL so the token is not kept around."""
    db = web.session(write=True)
    try:
        payload = web.tokens().load("login", token)
    except TokenExpired as exc:
        # Its signature held, so the mailbox it names is genuine: offer that owner a new link.
        mailbox = _link_mailbox(db, exc.payload, current=False)
        if mailbox is None:
            return _invalid_link()
        with force_locale(mailbox.language):
            return render_template("auth/link_expired.html", token=token), 410
    except TokenInvalid:
        return _invalid_link()
    mailbox = _link_mailbox(db, payload)
    if mailbox is None:  # revoked by a key version bump, or the mailbox is disabled
        return _invalid_link()
    # The password lockout is not consulted: the link proves control of the mailbox.
    return _finish_login(db, mailbox, "link", None)


@bp.get("/r/<token>")
def release_link(token: str) -> Response | tuple[str, int]:
    """A report's per-message link: log in, then ask before releasing (a GET never acts).

    Mail clients and link scanners open every link in a message, so this only shows
    the message with a confirmation; the release itself is the page's POST.
    """
    db = web.session(write=True)
    try:
        payload = web.tokens().load("release", token)
    except (TokenExpired, TokenInvalid):
        return _invalid_link()
    mailbox = _link_mailbox(db, payload)
    message_id = payload.get("id") if isinstance(payload, dict) else None
    if mailbox is None or not isinstance(message_id, int):
        return _invalid_link()
    confirm = "sender" if request.args.get("allow") else "release"
    target = url_for("quarantine.message", message_id=message_id, confirm=confirm)
    return _finish_login(db, mailbox, "link", target)


@bp.post("/link")
def request_link() -> tuple[str, int]:
    """Mail a fresh login link; the same answer whether or not the address has a mailbox."""
    db = web.session()
    language = None
    token = request.form.get("token", "")
    if token:  # the button on the page of an expired link
        mailbox = _expired_link_mailbox(db, token)
        if mailbox is None:
            return _invalid_link()
        address, language = mailbox.address, mailbox.language
    else:
        found = _address(request.form.get("address", ""))
        if found is None:
            error = _("Enter a valid e-mail address.")
            return render_template("auth/login.html", link_error=error), 400
        address = found
        mailbox = db.scalar(select(Mailbox).where(Mailbox.address == address))
    checks = [
        (f"link:address:{address}", LINKS_PER_ADDRESS),
        (f"link:client:{_client()}", LINKS_PER_CLIENT),
        ("link:all", LINKS_OVERALL),
    ]
    # The overall cap counts only requests within their own limits, so that one client
    # cannot use up everyone's links.
    if _over(db, checks[:2]) or not _count(db, checks):
        db.commit()
        return render_error(429, _("Too many login links were asked for. Try again in an hour."))
    mailbox_id = mailbox.id if mailbox else None
    sent = mailbox is not None and not mailbox.disabled
    actor = web.actor()
    audit.record(db, actor, "login_link.request", mailbox_id=mailbox_id, address=address, sent=sent)
    db.commit()
    if mailbox is not None and sent:
        _send_link_later(mailbox)
    with force_locale(language) if language else contextlib.nullcontext():
        return render_template("auth/link_sent.html"), 200


def _expired_link_mailbox(db: Session, token: str) -> Mailbox | None:
    try:
        payload = web.tokens().load("login", token)
    except TokenExpired as exc:
        payload = exc.payload
    except TokenInvalid:
        return None
    return _link_mailbox(db, payload, current=False)


def _send_link_later(mailbox: Mailbox) -> None:
    """Send in a thread, so the answer comes as fast for a known address as an unknown one."""
    config = web.config()
    args = (config, web.relay(), mailbox.address, mailbox.language, login_url(mailbox, config))
    # A daemon: a worker that stops gives up the retries (the owner can ask again).
    threading.Thread(target=send_login_link, args=args, name="login-link", daemon=True).start()


def send_login_link(config: Config, relay: Relay, address: str, language: str, url: str) -> None:
    """Mail a login link, trying again after a temporary refusal; failures are logged."""
    try:
        rendered = mailer.render(
            "login_link", language, url=url, address=address, days=LOGIN_LINK_DAYS, lang=language
        )
        raw = mailer.build(rendered, sender=config.mail_from, to=address, domain=config.hostname)
        for delay in (*LINK_RETRY_DELAYS, None):
            try:
                mailer.send(relay, raw, address)
                break
            except RelayError as exc:  # expected when the mail server is down: one line each
                if not exc.temporary or delay is None:
                    raise
                log.warning("login link to %s: %s; trying again in %gs", address, exc, delay)
                relay.close()
                time.sleep(delay)
        log.info("login link mailed to %s", address)
    except RelayError as exc:
        log.error("mailing a login link to %s failed: %s", address, exc)
    except Exception:
        log.exception("mailing a login link to %s failed", address)
    finally:
        relay.close()  # this thread's connection; the thread ends here


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response | tuple[str, int] | str:
    """The login page: address and password, and a form to ask for a login link."""
    next_path = web.safe_next(request.values.get("next"))
    if request.method == "GET":
        if current_user.is_authenticated:
            return redirect(next_path or url_for("quarantine.index"))
        return render_template("auth/login.html", next=next_path)
    text = request.form.get("address", "")
    password = request.form.get("password", "")
    # An unknown or malformed address is still counted; as a key it must be storable text.
    address = _address(text) or mime.clean_text(text.strip().lower(), 320)
    checks = [
        (f"login-failed:address:{address}", FAILURES_PER_ADDRESS),
        (f"login-failed:client:{_client()}", FAILURES_PER_CLIENT),
    ]
    page = {"next": next_path, "address": text.strip()[:320]}
    db = web.session()
    # Counted before the password is checked, so parallel guesses cannot outrun the limit;
    # a login that succeeds takes its count back.
    if _over(db, checks) or not _count(db, checks):
        db.commit()
        error = _("Too many failed attempts. Wait 15 minutes, or ask for a login link below.")
        return render_template("auth/login.html", error=error, **page), 429
    mailbox = db.scalar(select(Mailbox).where(Mailbox.address == address))
    db.commit()  # no database lock held during the deliberately slow hash check
    right = passwords.verify(mailbox.password_hash if mailbox else None, password)
    if mailbox is None or not right or mailbox.disabled:
        _fail(db, checks, mailbox, address, "password")
        error = _("The address or the password is wrong.")
        return render_template("auth/login.html", error=error, **page), 200
    # Rehash before the next statement opens a transaction: hashing is slow on purpose.
    if mailbox.password_hash and passwords.needs_rehash(mailbox.password_hash):
        mailbox.password_hash = passwords.hash_password(password)
    ratelimit.reset(db, checks[0][0])
    ratelimit.refund(db, checks[1][0])
    if not mailbox.totp_secret:
        return _finish_login(db, mailbox, "password", next_path)
    db.commit()
    flask.session.clear()  # not logged in yet: only the pending step is kept
    flask.session["totp_pending"] = {
        "m": mailbox.id,
        "v": mailbox.key_version,
        "at": time.time(),
        "next": next_path,
    }
    return redirect(url_for("auth.login_totp"), 303)


def _fail(
    db: Session, checks: list[Check], mailbox: Mailbox | None, address: str, step: str
) -> None:
    """Record and slow down a failed attempt (already counted)."""
    mailbox_id = mailbox.id if mailbox else None
    audit.record(db, web.actor(), "login.failed", mailbox_id=mailbox_id, address=address, step=step)
    db.commit()  # before sleeping: the slowdown must not hold a database lock
    time.sleep(FAILURE_DELAY)


def _finish_login(
    db: Session, mailbox: Mailbox, method: str, next_path: str | None, notice: str = ""
) -> Response:
    users.log_in(mailbox, method)
    audit.record(db, web.actor(), "login", mailbox_id=mailbox.id, method=method)
    db.commit()
    if notice:
        flash(notice, "success")
    # Staff logging in with their password go to the console; everyone else to their mail.
    staff_login = mailbox.role in staff.STAFF_ROLES and method != "link"
    home = url_for("console.index") if staff_login else url_for("quarantine.index")
    # 303, so the browser fetches the target with GET and the link's URL is left behind.
    return redirect(next_path or home, 303)


def _pending_mailbox(db: Session) -> Mailbox | None:
    """The mailbox whose password was right, if its second step is still open."""
    pending = flask.session.get("totp_pending")
    if not isinstance(pending, dict) or not isinstance(pending.get("at"), float | int):
        return None
    if time.time() - pending["at"] > TOTP_PENDING_SECONDS:
        return None
    mailbox = _link_mailbox(db, pending)
    return mailbox if mailbox is not None and mailbox.totp_secret else None


@bp.route("/login/totp", methods=["GET", "POST"])
def login_totp() -> Response | tuple[str, int] | str:
    """The second step: a code from the authenticator app, or a recovery code."""
    db = web.session()
    mailbox = _pending_mailbox(db)
    if mailbox is None:
        flask.session.pop("totp_pending", None)
        flash(_("Please log in again."), "error")
        return redirect(url_for("auth.login"), 303)
    if request.method == "GET":
        return render_template("auth/totp.html")
    checks = [
        (f"login-failed:code:{mailbox.id}", CODE_FAILURES_PER_MAILBOX),
        (f"login-failed:client:{_client()}", FAILURES_PER_CLIENT),
    ]
    if _over(db, checks) or not _count(db, checks):
        db.commit()
        error = _("Too many wrong codes. Wait 15 minutes and try again.")
        return render_template("auth/totp.html", error=error), 429
    recovery = request.form.get("recovery", "")
    if recovery:
        right = totp.use_recovery_code(db, mailbox, recovery[:64])
    else:
        right = totp.verify_code(db, mailbox, request.form.get("code", "")[:64])
    if not right:
        _fail(db, checks, mailbox, mailbox.address, "recovery" if recovery else "totp")
        error = _("That code is not right, or was already used. Try the newest one.")
        return render_template("auth/totp.html", error=error), 200
    ratelimit.reset(db, checks[0][0])
    ratelimit.refund(db, checks[1][0])
    notice = ""
    if recovery:
        left = totp.recovery_codes_left(db, mailbox)
        notice = _("You used a recovery code; %(left)d are left.", left=left)
    next_path = web.safe_next(flask.session["totp_pending"].get("next"))
    return _finish_login(db, mailbox, "totp", next_path, notice)


@bp.post("/logout")
def logout() -> Response:
    """Log out of this browser."""
    message = _("You have logged out.")  # in the owner's language, while still known
    if sid := flask.session.get("sid"):
        logins.end(web.session(), str(sid))  # a copy of this cookie ends here too
        web.session().commit()
    logout_user()
    flask.session.clear()
    flash(message, "success")
    return redirect(url_for("auth.login"), 303)
