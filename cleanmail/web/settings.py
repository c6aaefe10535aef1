"""The owner's settings: language, reports, time zone, password, two-step login, log out."""

from __future__ import annotations

import zoneinfo
from datetime import timedelta
from functools import lru_cache

import flask_babel
import segno
from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask import session as browser
from flask_babel import gettext as _
from flask_login import current_user, login_required, logout_user
from werkzeug.wrappers import Response

from cleanmail import audit, passwords, ratelimit, staff, totp, web
from cleanmail.models import Mailbox

bp = Blueprint("settings", __name__, url_prefix="/settings")

# Each language is named in itself, so that an owner who cannot read the page finds theirs.
LANGUAGES = {"nb": "Norsk bokmål", "da": "Dansk", "en": "English"}
FREQUENCIES = ("never", "daily", "weekly")  # "hourly" only where an operator allows it
FIRST_ZONES = ("Europe/Oslo", "Europe/Copenhagen")
PENDING = "totp_pending_secret"  # the secret being enrolled, until a code confirms it
CODE_LIMIT, CODE_WINDOW = 10, timedelta(minutes=15)


@lru_cache(maxsize=1)
def time_zones() -> tuple[str, ...]:
    """Every IANA time zone, Norway's and Denmark's first."""
    rest = sorted(zoneinfo.available_timezones() - {*FIRST_ZONES, "Factory", "localtime"})
    return FIRST_ZONES + tuple(rest)


def _frequency_names() -> dict[str, str]:
    return {
        "never": _("Never"),
        "hourly": _("Every hour"),
        "daily": _("Daily"),
        "weekly": _("Weekly"),
    }


def _rule_texts() -> dict[str, str]:
    """The password rules as the page lists them."""
    return {
        "length": _("At least %(count)d characters", count=passwords.MIN_LENGTH),
        "lower": _("At least one lower-case letter"),
        "upper": _("At least one upper-case letter"),
        "digit": _("At least one digit"),
    }


def _rule_errors() -> dict[str, str]:
    """What to say about each unmet password rule."""
    return {
        "length": _(
            "The password must have at least %(count)d characters.", count=passwords.MIN_LENGTH
        ),
        "too_long": _(
            "The password must have at most %(count)d characters.", count=passwords.MAX_LENGTH
        ),
        "lower": _("The password must have at least one lower-case letter."),
        "upper": _("The password must have at least one upper-case letter."),
        "digit": _("The password must have at least one digit."),
    }


def _mailbox() -> Mailbox:
    mailbox = web.session().get(Mailbox, current_user.mailbox_id)
    if mailbox is None:
        abort(404)
    return mailbox


@bp.route("/", methods=["GET", "POST"])
@login_required
def index():
    """Language, report frequency and time zone; links to the other settings."""
    mailbox = _mailbox()
    frequencies = list(FREQUENCIES)
    if mailbox.report_frequency not in frequencies:  # set by an operator: keep it selectable
        frequencies.append(mailbox.report_frequency)
    errors: dict[str, str] = {}
    if request.method == "POST":
        chosen = {
            "language": request.form.get("language", ""),
            "report_frequency": request.form.get("report_frequency", ""),
            "timezone": request.form.get("timezone", ""),
        }
        if chosen["language"] not in LANGUAGES:
            errors["language"] = _("Choose one of the languages in the list.")
        if chosen["report_frequency"] not in frequencies:
            errors["report_frequency"] = _("Choose how often you want a report.")
        if chosen["timezone"] not in time_zones():
            errors["timezone"] = _("Choose a time zone from the list.")
        if not errors:
            _save_settings(mailbox, chosen)
            return redirect(url_for(".index"))
    page = render_template(
        "settings/index.html",
        mailbox=mailbox,
        languages=LANGUAGES,
        frequencies={f: _frequency_names().get(f, f) for f in frequencies},
        zones=time_zones(),
        errors=errors,
        values=request.form if errors else None,
    )
    return page, 400 if errors else 200


def _save_settings(mailbox: Mailbox, chosen: dict[str, str]) -> None:
    """Store the chosen settings, audit what changed, and speak the new language at once."""
    changes = {
        name: [getattr(mailbox, name), value]
        for name, value in chosen.items()
        if getattr(mailbox, name) != value
    }
    session = web.session()
    for name, (_old, value) in changes.items():
        setattr(mailbox, name, value)
    if changes:
        audit.record(session, web.actor(), "settings.change", mailbox_id=mailbox.id, **changes)
    session.commit()
    current_user.language, current_user.timezone = mailbox.language, mailbox.timezone
    flask_babel.refresh()  # the confirmation below is already in the new language
    flash(_("Your settings are saved.") if changes else _("Nothing was changed."), "success")


@bp.route("/password", methods=["GET", "POST"])
@login_required
def password():
    """Set or change the password; a report link is enough to prove the mailbox is yours."""
    mailbox = _mailbox()
    errors: list[str] = []
    if request.method == "POST":
        new = request.form.get("password", "")
        unmet = passwords.unmet_rules(new)
        errors = [_rule_errors()[rule] for rule in unmet]
        if new != request.form.get("confirm", ""):
            errors.append(_("The passwords do not match."))
        if not errors:
            session = web.session()
            replaced = mailbox.password_hash is not None
            mailbox.password_hash = passwords.hash_password(new)
            audit.record(
                session, web.actor(), "password.set", mailbox_id=mailbox.id, replaced=replaced
            )
            session.commit()
            flash(_("Your password is saved. You can now log in with it."), "success")
            return redirect(url_for(".index"))
    page = render_template(
        "settings/password.html",
        errors=errors,
        rules=_rule_texts(),
        has_password=mailbox.password_hash is not None,
        min_length=passwords.MIN_LENGTH,
        max_length=passwords.MAX_LENGTH,
    )
    return page, 400 if errors else 200


def _qr_code(uri: str) -> str:
    """The enrolment QR code as a data: URI for an <img> (allowed by the CSP)."""
    return segno.make(uri, error="m").svg_data_uri(scale=5, border=4)


def _render_two_step(mailbox: Mailbox, *, error: str | None = None, status: int = 200):
    if mailbox.totp_secret:
        remaining = totp.recovery_codes_left(web.session(), mailbox)
        page = render_template(
            "settings/two_step.html",
            enabled=True,
            remaining=remaining,
            error=error,
            required=mailbox.role in staff.STAFF_ROLES,
        )
        return page, status
    secret = browser.get(PENDING) or totp.new_secret()
    browser[PENDING] = secret
    page = render_template(
        "settings/two_step.html",
        enabled=False,
        qr=_qr_code(totp.provisioning_uri(secret, mailbox.address)),
        secret=" ".join(secret[i : i + 4] for i in range(0, len(secret), 4)),
        error=error,
    )
    return page, status


def _too_many_attempts(mailbox: Mailbox) -> str | None:
    """Counts a code attempt; what to tell the owner when there have been too many."""
    session = web.session()
    key = f"totp-settings:{mailbox.id}"
    if ratelimit.hit(session, key, limit=CODE_LIMIT, window=CODE_WINDOW):
        return None
    session.commit()
    return _("Too many attempts. Wait a few minutes and try again.")


def _wrong_code() -> str:
    return _("That code is not right. Check the time on your phone and try the newest code.")


def _check_code(mailbox: Mailbox) -> str | None:
    """None when the posted app code or recovery code is right, else what to tell the owner."""
    if error := _too_many_attempts(mailbox):
        return error
    code = request.form.get("code", "")
    session = web.session()
    if totp.verify_code(session, mailbox, code) or totp.use_recovery_code(session, mailbox, code):
        return None
    session.commit()  # the attempt counts even though the answer is no
    return _wrong_code()


@bp.get("/two-step")
@login_required
def two_step():
    """Two-step login: enrol with a QR code, or manage it once on."""
    return _render_two_step(_mailbox())


@bp.post("/two-step/enable")
@login_required
def enable_two_step():
    """Turn two-step login on once a code from the new secret is right; show recovery codes."""
    mailbox = _mailbox()
    secret = browser.get(PENDING)
    if mailbox.totp_secret or not secret:
        return redirect(url_for(".two_step"))
    if error := _too_many_attempts(mailbox):
        return _render_two_step(mailbox, error=error, status=429)
    session = web.session()
    try:
        codes = totp.enable(session, web.actor(), mailbox, secret, request.form.get("code", ""))
    except totp.TotpError:
        session.commit()  # the attempt counts
        return _render_two_step(mailbox, error=_wrong_code(), status=400)
    session.commit()
    browser.pop(PENDING, None)
    if browser.get("login_method") == "password":
        browser["login_method"] = "totp"  # password and now a right code: both steps done
    flash(_("Two-step login is on."), "success")
    return render_template("settings/recovery_codes.html", codes=codes)


@bp.post("/two-step/disable")
@login_required
def disable_two_step():
    """Turn two-step login off; takes a current code or a recovery code."""
    mailbox = _mailbox()
    if not mailbox.totp_secret:
        return redirect(url_for(".two_step"))
    if mailbox.role in staff.STAFF_ROLES:
        return _render_two_step(
            mailbox, error=_("Staff cannot turn two-step login off."), status=403
        )
    if error := _check_code(mailbox):
        return _render_two_step(mailbox, error=error, status=400)
    session = web.session()
    totp.disable(session, web.actor(), mailbox)
    session.commit()
    flash(_("Two-step login is off."), "success")
    return redirect(url_for(".index"))


@bp.post("/two-step/recovery-codes")
@login_required
def new_recovery_codes():
    """Replace the recovery codes with new ones (shown once); takes a current code."""
    mailbox = _mailbox()
    if not mailbox.totp_secret:
        return redirect(url_for(".two_step"))
    if error := _check_code(mailbox):
        return _render_two_step(mailbox, error=error, status=400)
    session = web.session()
    codes = totp.new_recovery_codes(session, mailbox)
    audit.record(session, web.actor(), "totp.recovery_codes", mailbox_id=mailbox.id)
    session.commit()
    flash(_("You have new recovery codes. The old ones no longer work."), "success")
    return render_template("settings/recovery_codes.html", codes=codes)


@bp.post("/logout-everywhere")
@login_required
def logout_everywhere() -> Response:
    """End every session and make every login link sent so far useless."""
    mailbox = _mailbox()
    session = web.session()
    mailbox.key_version += 1
    audit.record(session, web.actor(), "logout.everywhere", mailbox_id=mailbox.id)
    session.commit()
    logout_user()
    browser.clear()
    flash(
        _("You are logged out everywhere. Links in reports you already have no longer work."),
        "success",
    )
    return redirect(url_for("auth.login"))
