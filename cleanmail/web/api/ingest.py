"""The ingest endpoint: a site's own scanner (rspamd's metadata_exporter) pushes held mail.

The request body is the raw message; the envelope and the scanner's verdict come in
headers, named as rspamd's HTTP pusher sends them with ``meta_headers = true``:
``X-Rspamd-From``, ``X-Rspamd-Rcpt`` (a JSON array), ``X-Rspamd-Ip``,
``X-Rspamd-Score``, ``X-Rspamd-Action`` and ``X-Rspamd-Symbols`` (a JSON array of
``{"name", "score", "options"}``). A success is always 200, the only status rspamd
3.4 takes for success.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Any

from flask import Response, jsonify, request
from sqlalchemy import select

from cleanmail import audit, mailboxes, mime, quarantine, stats, web
from cleanmail.models import Domain
from cleanmail.web import api

log = logging.getLogger(__name__)

HEADER = "X-Rspamd-"
MAX_REASONS = 30


def _header(name: str) -> str:
    """A pushed header as text (rspamd sends UTF-8; the server reads bytes as Latin-1)."""
    value = request.headers.get(HEADER + name, "")
    try:
        value = value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        pass
    return mime.clean_text(value, 64 * 1024)


def recipients() -> list[str]:
    """The envelope recipients: a JSON array, or addresses separated by commas."""
    text = _header("Rcpt").strip()
    if not text or text == "unknown":
        api.fail(400, f"{HEADER}Rcpt is required: the envelope recipients")
    try:
        value = json.loads(text)
    except ValueError:
        value = [part.strip() for part in text.split(",")]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        api.fail(400, f"{HEADER}Rcpt must be a JSON array of addresses")
    return [v for v in dict.fromkeys(value) if v][:1000]


def _number(text: str, name: str) -> float:
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        api.fail(400, f"{HEADER}{name} must be a number")
    if value != value or value in (float("inf"), float("-inf")):
        api.fail(400, f"{HEADER}{name} must be a number")
    return value


def reasons(action: str, score: float) -> list[dict[str, Any]]:
    """The scanner's verdict and its scoring symbols, as stored reasons."""
    found = [
        {"code": "SCANNER_VERDICT", "text": f"scanner verdict: {action or 'held'}", "score": score}
    ]
    try:
        symbols = json.loads(_header("Symbols") or "[]")
    except ValueError:
        symbols = []
    if isinstance(symbols, dict):  # some versions send an object keyed by symbol name
        symbols = [
            dict(v, name=k) if isinstance(v, dict) else {"name": k} for k, v in symbols.items()
        ]
    hits = []
    for symbol in symbols if isinstance(symbols, list) else []:
        if not isinstance(symbol, dict) or not isinstance(symbol.get("name"), str):
            continue
        weight = symbol.get("score")
        weight = float(weight) if isinstance(weight, int | float) else 0.0
        if weight <= 0:
            continue
        options = symbol.get("options")
        detail = ", ".join(str(o) for o in options) if isinstance(options, list) else ""
        text = str(symbol.get("description") or "") or detail or symbol["name"]
        hits.append(
            {
                "code": mime.clean_text(symbol["name"], 64),
                "text": mime.clean_text(text, 200),
                "score": round(weight, 2),
            }
        )
    hits.sort(key=lambda hit: -hit["score"])
    return found + hits[:MAX_REASONS]


def _client_address() -> str | None:
    text = _header("Ip").strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


@api.route("/ingest", methods=["POST"])
def ingest() -> Response:
    """Quarantine a message that the site's scanner held, for its served recipients."""
    config = web.config()
    request.max_content_length = config.max_message_size
    raw = request.get_data(cache=False)
    if not raw:
        api.fail(400, "the request body must be the raw message")
    sender = _header("From").strip()
    sender = "" if sender in ("unknown", "<>") else sender.strip("<>")
    wanted = recipients()
    score = _number(_header("Score").strip(), "Score")
    why = reasons(_header("Action").strip(), score)
    session = web.session()
    served = dict(session.execute(select(Domain.name, Domain.id)).all())
    ours: dict[str, str] = {}
    refused: list[str] = []
    for recipient in wanted:
        try:
            address = mailboxes.normalize_address(recipient)
        except mailboxes.MailboxError:
            refused.append(recipient)
            continue
        domain = address.rpartition("@")[2]
        if domain in served and api.may_see_domain(domain):
            ours[recipient] = address
        else:
            refused.append(recipient)
    if not ours:
        api.fail(422, "no recipient is in a domain this token may quarantine for")
    ids = mailboxes.ensure_mailboxes(session, ours.values(), served)
    holds = [quarantine.Hold(ids[address], score, why) for address in dict.fromkeys(ours.values())]
    origin = quarantine.Origin(sender, _client_address(), None)
    held = quarantine.hold(
        session,
        web.store(),
        raw,
        mime.parse(raw),
        origin,
        holds,
        retention_days=config.retention_days,
    )
    actor = api.actor()
    rows = []
    for message_id in held:
        message = quarantine.get(session, message_id)
        domain = api.domain_of(message.mailbox)
        stats.bump(session, "quarantined", domain)
        stats.bump(session, "ingested", domain)
        stats.count_reasons(session, domain, why)
        audit.record(
            session,
            actor,
            "message.ingest",
            mailbox_id=message.mailbox_id,
            message_id=message_id,
            score=score,
        )
        rows.append({"id": message_id, "mailbox": message.mailbox.address})
    session.commit()
    for row in rows:
        log.info(
            "message ingested",
            extra={"event": "message.ingest", "message_id": row["id"], "mailbox": row["mailbox"]},
        )
    return jsonify(held=rows, already_held=len(holds) - len(rows), refused=refused)
