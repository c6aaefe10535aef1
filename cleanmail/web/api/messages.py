"""API views on quarantined messages: search, details, release, delete, bulk jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Response, current_app, jsonify, request

from cleanmail import bulk, quarantine, search, web
from cleanmail.models import BulkJob, Message
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


STATUSES = ("new", "released", "deleted", "expired")


def query_from_args() -> search.Query:
    """A search from the query string."""
    args = request.args
    status = args.get("status", "new")
    if status not in (*STATUSES, "any"):
        api.fail(400, f"status must be one of {', '.join(STATUSES)} or any")
    return search.Query(
        recipient=args.get("recipient", "")[:320],
        sender=args.get("sender", "")[:320],
        subject=args.get("subject", "")[:200],
        reason=args.get("reason", "")[:64],
        statuses=() if status == "any" else (status,),
        since=api.time_arg("since"),
        until=api.time_arg("until"),
        min_score=api.float_arg("min_score"),
        max_score=api.float_arg("max_score"),
    )


@api.route("/messages", methods=["GET"])
def find() -> Response:
    """Search messages across the mailboxes the token covers, newest first, by cursor."""
    query = query_from_args()
    sort = request.args.get("sort", "date")
    if sort not in search.SORTS:
        api.fail(400, f"sort must be one of {', '.join(search.SORTS)}")
    order = search.Order(sort, request.args.get("order", "desc") != "asc")
    limit = api.int_arg("limit", 50, 1, 500)
    cursor_text = request.args.get("cursor")
    after = search.Cursor.decode(cursor_text, order) if cursor_text else None
    if cursor_text and after is None:
        api.fail(400, "cursor is not one this API gave")
    session = web.session()
    found = search.page(session, api.access(), query, order, after=after, limit=limit)
    total = search.count(session, api.access(), query, cap=COUNT_CAP)
    return jsonify(
        messages=[message_json(row.message) for row in found.rows],
        total=min(total, COUNT_CAP),
        total_is_exact=total <= COUNT_CAP,
        next_cursor=found.next.encode() if found.next else None,
    )


COUNT_CAP = 10_000


def job_json(job: BulkJob) -> dict[str, Any]:
    """A bulk job's progress."""
    return {
        "id": job.id,
        "action": job.action,
        "status": job.status,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "skipped": job.skipped,
        "last_error": job.last_error,
        "created_at": _time(job.created_at),
        "finished_at": _time(job.finished_at),
    }


@api.route("/bulk", methods=["POST"])
def bulk_create() -> tuple[Response, int]:
    """Release or delete everything a search matches, in the background (202 + progress)."""
    data = api.body()
    action = api.field(data, "action", str)
    if action not in bulk.ACTIONS:
        api.fail(400, f"action must be one of {', '.join(bulk.ACTIONS)}")
    criteria = api.field(data, "query", dict)
    ids = api.field(criteria, "ids", list, [])
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in ids):
        api.fail(400, "query.ids must be message ids")
    try:
        query = search.Query(
            recipient=api.field(criteria, "recipient", str, "")[:320],
            sender=api.field(criteria, "sender", str, "")[:320],
            subject=api.field(criteria, "subject", str, "")[:200],
            reason=api.field(criteria, "reason", str, "")[:64],
            since=_parse_time(api.field(criteria, "since", str, "")),
            until=_parse_time(api.field(criteria, "until", str, "")),
            ids=tuple(ids),
        )
    except ValueError:
        api.fail(400, "query.since and query.until must be ISO 8601 times")
    if query.is_empty():
        api.fail(400, "the query matches everything; narrow it (sender, recipient, ids ...)")
    session = web.session()
    job = bulk.create(session, api.access(), api.actor(), action, query)
    session.commit()
    database = current_app.extensions["cleanmail.db"]
    bulk.start(database, web.store(), web.relay(), job.id)
    return jsonify(job_json(job)), 202


def _parse_time(text: str) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@api.route("/bulk/<int:job_id>", methods=["GET"])
def bulk_status(job_id: int) -> Response:
    """A bulk job's progress."""
    job = web.session().get(BulkJob, job_id) if job_id <= api.MAX_SMALL_ID else None
    if (
        job is None
        or job.actor_type != "api"
        or (api.domains() is not None and job.actor != api.token().name)
    ):
        api.fail(404, f"no bulk job {job_id}")
    return jsonify(job_json(job))
