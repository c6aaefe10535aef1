"""The REST API under /api/v1: JSON in and out, bearer tokens, no cookies and so no CSRF.

Every view runs with ``g.api_token`` set; a token scoped to domains sees and touches
only mailboxes in those domains, and anything else answers 404 as if it did not exist.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

from flask import Blueprint, Response, current_app, g, jsonify, request
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from cleanmail import apitokens, audit, lists, mailboxes, quarantine, search, staff, web
from cleanmail.models import ApiToken, Domain, Mailbox, Message
from cleanmail.store import StoreError
from cleanmail.web import csrf

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api/v1")
csrf.exempt(bp)

MAX_ID = 2**63 - 1  # the largest message id either database stores; larger ones are not ours
MAX_SMALL_ID = 2**31 - 1  # the same for tables with 32-bit ids (list entries, bulk jobs)
# Endpoints that need no token (the description of the API itself).
PUBLIC = {"api.openapi"}


class ApiError(Exception):
    """An error answered as JSON with a status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def fail(status: int, message: str) -> NoReturn:
    """Stop the request with a JSON error."""
    raise ApiError(status, message)


def error_response(status: int, message: str) -> Response:
    """The JSON body of every error."""
    response = jsonify(error={"status": status, "message": message})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="cleanmail"'
    return response


HTTP_MESSAGES = {
    400: "the request could not be understood",
    401: "a valid API token is required",
    403: "this token may not do that",
    404: "not found",
    405: "method not allowed here",
    413: "the request is too large",
    415: "unsupported content type",
}


def http_error(error: HTTPException) -> Response:
    """Werkzeug's errors (404, 405, 413 ...) as JSON."""
    code = error.code or 500
    return error_response(code, HTTP_MESSAGES.get(code, error.name.lower()))


@bp.errorhandler(ApiError)
def _api_error(error: ApiError) -> Response:
    return error_response(error.status, error.message)


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException) -> Response:
    return http_error(error)


@bp.errorhandler(lists.ListError)
@bp.errorhandler(mailboxes.MailboxError)
@bp.errorhandler(apitokens.TokenError)
@bp.errorhandler(search.SearchError)
def _bad_input(error: Exception) -> Response:
    return error_response(400, str(error))


@bp.errorhandler(UnicodeError)
def _not_unicode(_error: Exception) -> Response:
    return error_response(400, "text in the request must be valid Unicode")


@bp.errorhandler(quarantine.QuarantineError)
def _quarantine_error(error: Exception) -> Response:
    return error_response(409, str(error))


@bp.errorhandler(SQLAlchemyError)
@bp.errorhandler(StoreError)
def _unavailable(error: Exception) -> Response:
    log.error("api: %s: %s", type(error).__name__, str(error).splitlines()[0])
    return error_response(503, "the service is unavailable; try again later")


def _secret() -> str | None:
    header = request.headers.get("Authorization", "")
    kind, _space, value = header.partition(" ")
    if kind.lower() == "bearer":
        return value.strip()
    if kind.lower() == "basic":
        # For pushers that only know user and password (rspamd): the password is the token.
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def _has_nul() -> bool:
    """NUL in the path, the query or a JSON body: no database column can store it."""
    if "\x00" in request.path or b"%00" in request.query_string:
        return True
    if request.endpoint == "api.ingest" or not request.is_json:
        return False
    body = request.get_data(cache=True)
    return b"\x00" in body or b"\\u0000" in body.lower()


@bp.before_request
def _authenticate() -> None:
    if request.endpoint in PUBLIC:
        return
    if _has_nul():
        fail(400, "text in the request must not contain NUL characters")
    secret = _secret()
    database = current_app.extensions["cleanmail.db"]
    # Its own short session: the view's session may take SQLite's write lock at BEGIN.
    with database.sessions() as session:
        found = apitokens.authenticate(session, secret) if secret else None
    if found is None:
        fail(401, "a valid API token is required (Authorization: Bearer <token>)")
    if apitokens.needs_touch(found):
        with database.session_scope(write=True) as session:
            apitokens.touch(session, found.id)
    g.api_token = found


@bp.after_request
def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


def token() -> ApiToken:
    """The token of this request."""
    return g.api_token


def actor() -> audit.Actor:
    """The audit actor of this request: type "api" and the token's name."""
    return audit.Actor("api", token().name, request.remote_addr)


def domains() -> list[str] | None:
    """The domains this token may see, or None for operator tokens."""
    return list(token().domains) or None


def access() -> staff.Access:
    """The token's reach as the foundation's Access: every domain, or the token's domains."""
    if "api_access" not in g:
        names = domains()
        if names is None:
            g.api_access = staff.Access("api")
        else:
            ids = web.session().scalars(select(Domain.id).where(Domain.name.in_(names)))
            g.api_access = staff.Access("api", None, frozenset(ids))
    return g.api_access


def require_operator() -> None:
    """Refuse unless the token has operator scope."""
    if domains() is not None:
        fail(403, "this needs an operator token; this token is limited to domains")


def may_see_domain(name: str) -> bool:
    """Whether the token covers a domain."""
    allowed = domains()
    return allowed is None or name.lower() in allowed


def domain_of(mailbox: Mailbox) -> str:
    """The domain part of a mailbox address."""
    return mailbox.address.rpartition("@")[2]


def visible_mailbox(address: str) -> Mailbox:
    """A mailbox the token may see, or 404."""
    try:
        mailbox = mailboxes.get_mailbox(web.session(), address)
    except mailboxes.MailboxError:
        fail(404, f"no mailbox {address.strip()[:320]}")
    if not may_see_domain(domain_of(mailbox)):
        fail(404, f"no mailbox {address.strip()[:320]}")
    return mailbox


def visible_domain(name: str) -> Domain:
    """A served domain the token may see, or 404."""
    if not may_see_domain(name):
        fail(404, f"no domain {name.strip()[:253]}")
    try:
        return mailboxes.get_domain(web.session(), name)
    except mailboxes.MailboxError:
        fail(404, f"no domain {name.strip()[:253]}")


def visible_message(message_id: int) -> Message:
    """A quarantined message the token may see, or 404."""
    if message_id > MAX_ID:
        fail(404, f"no message {message_id}")
    try:
        message = quarantine.get(web.session(), message_id)
    except quarantine.QuarantineError:
        fail(404, f"no message {message_id}")
    if not may_see_domain(domain_of(message.mailbox)):
        fail(404, f"no message {message_id}")
    return message


def body() -> dict[str, Any]:
    """The JSON object sent with the request, or 400."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        fail(400, "expected a JSON object (Content-Type: application/json)")
    return data


def field(
    data: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    """One field of a JSON body, checked for its type."""
    if name not in data or data[name] is None:
        if default is ...:
            fail(400, f"{name} is required")
        return default
    value = data[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        fail(400, f"{name} has the wrong type")
    return value


def float_arg(name: str) -> float | None:
    """A finite number query parameter, or None when absent; 400 when malformed."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        fail(400, f"{name} must be a number")
    if value != value or abs(value) == float("inf"):
        fail(400, f"{name} must be a finite number")
    return value


def time_arg(name: str) -> datetime | None:
    """An ISO 8601 date or time query parameter (UTC unless it says otherwise)."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        fail(400, f"{name} must be a date or time like 2026-11-22T08:00:00Z")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def int_arg(name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within bounds, or 400."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        fail(400, f"{name} must be a whole number")
    if not low <= value <= high:
        fail(400, f"{name} must be between {low} and {high}")
    return value


def route(rule: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a view on the API blueprint."""
    return bp.route(rule, **options)


from cleanmail.web.api import admin, ingest, messages, openapi  # noqa: E402, F401 - the views
