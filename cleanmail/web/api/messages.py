"""API views on quarantined messages: details, release, delete."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify

from cleanmail import quarantine, web
from cleanmail.models import Message
from cleanmail.web import api


def _time(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def message_json(message: Message) -> dict[str, Any]:
    """A message as the API shows it."""
    return {
        "id": message.id,
        "mailbox": message.mailbox.address,
        "envelope_sender": message.envelope_sender,
        "from": message.from_header,
        "from_address": message.from_address,
        "sender_domain": message.sender_domain,
        "subject": message.subject,
        "message_id": message.message_id_header,
        "size": message.size,
        "score": message.score,
        "reasons": [
            {
                "code": str(r.get("code", "")),
                "text": str(r.get("text", "")),
                "score": float(r.get("score") or 0),
            }
            for r in (message.reasons or [])
            if isinstance(r, dict)
        ],
        "status": message.status,
        "received_at": _time(message.received_at),
        "expires_at": _time(message.expires_at),
        "released_at": _time(message.released_at),
        "release_error": message.release_error,
    }


@api.route("/messages/<int:message_id>", methods=["GET"])
def message(message_id: int) -> Response:
    """One message's details."""
    return jsonify(message_json(api.visible_message(message_id)))


@api.route("/messages/<int:message_id>/release", methods=["POST"])
def release(message_id: int) -> Response | tuple[Response, int]:
    """Deliver a held message to its mailbox (once; a second call says it was done)."""
    message = api.visible_message(message_id)
    session = web.session()
    try:
        released = quarantine.release(session, web.store(), web.relay(), message, api.actor())
    except quarantine.ReleaseFailed as exc:
        session.commit()  # the refusal stays on the message, to be retried
        return api.error_response(502, f"the mail server refused the message: {exc}"), 502
    session.commit()
    return jsonify(released=released, message=message_json(message))


@api.route("/messages/<int:message_id>", methods=["DELETE"])
def delete(message_id: int) -> Response:
    """Delete a message from the quarantine for good."""
    message = api.visible_message(message_id)
    session = web.session()
    quarantine.delete(session, web.store(), message, api.actor())
    session.commit()
    return jsonify(deleted=True, message=message_json(message))
