"""The OpenAPI 3 description of the API, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify

from cleanmail.web import api

STRING = {"type": "string"}
NULLABLE_STRING = {"type": ["string", "null"]}
INTEGER = {"type": "integer"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": {"$ref": "#/components/responses/Error"},
    "401": {"$ref": "#/components/responses/Error"},
    "403": {"$ref": "#/components/responses/Error"},
    "404": {"$ref": "#/components/responses/Error"},
    "503": {"$ref": "#/components/responses/Error"},
}
MESSAGE_ID = {"name": "message_id", "in": "path", "required": True, "schema": INTEGER}
ADDRESS = {"name": "address", "in": "path", "required": True, "schema": STRING}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["status", "message"],
                "properties": {"status": INTEGER, "message": STRING},
            }
        },
    },
    "Reason": {
        "type": "object",
        "properties": {"code": STRING, "text": STRING, "score": {"type": "number"}},
    },
    "Message": {
        "type": "object",
        "required": ["id", "mailbox", "status", "subject", "received_at"],
        "properties": {
            "id": INTEGER,
            "mailbox": STRING,
            "envelope_sender": STRING,
            "from": STRING,
            "from_address": STRING,
            "sender_domain": STRING,
            "subject": STRING,
            "message_id": STRING,
            "size": INTEGER,
            "score": {"type": "number"},
            "reasons": {"type": "array", "items": _ref("Reason")},
            "status": {"enum": ["new", "released", "deleted", "expired"]},
            "received_at": STRING,
            "expires_at": STRING,
            "released_at": NULLABLE_STRING,
            "release_error": NULLABLE_STRING,
        },
    },
    "ListEntry": {
        "type": "object",
        "required": ["id", "scope", "action", "pattern"],
        "properties": {
            "id": INTEGER,
            "scope": {"enum": ["global", "domain", "mailbox"]},
            "owner": STRING,
            "action": {"enum": ["allow", "block"]},
            "pattern": STRING,
            "comment": STRING,
            "created_at": STRING,
        },
    },
    "BulkJob": {
        "type": "object",
        "required": ["id", "action", "status", "total", "done"],
        "properties": {
            "id": INTEGER,
            "action": STRING,
            "status": {"enum": ["pending", "running", "done", "cancelled"]},
            "total": INTEGER,
            "done": INTEGER,
            "failed": INTEGER,
            "skipped": INTEGER,
            "last_error": NULLABLE_STRING,
            "created_at": STRING,
            "finished_at": NULLABLE_STRING,
        },
    },
    "Mailbox": {
        "type": "object",
        "required": ["address"],
        "properties": {
            "address": STRING,
            "role": STRING,
            "disabled": {"type": "boolean"},
            "language": STRING,
            "report_frequency": STRING,
            "report_hour": INTEGER,
            "timezone": STRING,
            "has_password": {"type": "boolean"},
            "created_at": STRING,
            "last_login_at": NULLABLE_STRING,
            "last_report_at": NULLABLE_STRING,
        },
    },
}


def _paths() -> dict[str, Any]:
    return {
        "/messages": {
            "get": {
                "summary": "Search held messages across the mailboxes the token covers",
                "parameters": [
                    {"name": name, "in": "query", "schema": schema}
                    for name, schema in (
                        ("recipient", STRING),
                        ("sender", STRING),
                        ("subject", STRING),
                        ("reason", STRING),
                        ("status", {"enum": ["new", "released", "deleted", "expired", "any"]}),
                        ("since", {"type": "string", "format": "date-time"}),
                        ("until", {"type": "string", "format": "date-time"}),
                        ("min_score", {"type": "number"}),
                        ("max_score", {"type": "number"}),
                        ("sort", {"enum": ["date", "score", "sender", "size", "recipient"]}),
                        ("order", {"enum": ["asc", "desc"]}),
                        ("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                        ("cursor", STRING),
                    )
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["messages", "total"],
                            "properties": {
                                "messages": {"type": "array", "items": _ref("Message")},
                                "total": INTEGER,
                                "total_is_exact": {"type": "boolean"},
                                "next_cursor": NULLABLE_STRING,
                            },
                        }
                    ),
                    **ERRORS,
                },
            }
        },
        "/messages/{message_id}": {
            "parameters": [MESSAGE_ID],
            "get": {
                "summary": "One message's details",
                "responses": {"200": _json(_ref("Message")), **ERRORS},
            },
            "delete": {
                "summary": "Delete a message for good",
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"deleted": {"type": "boolean"}}}
                    ),
                    **ERRORS,
                },
            },
        },
        "/messages/{message_id}/release": {
            "parameters": [MESSAGE_ID],
            "post": {
                "summary": "Deliver a held message to its mailbox (once)",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "released": {"type": "boolean"},
                                "message": _ref("Message"),
                            },
                        }
                    ),
                    "409": {"$ref": "#/components/responses/Error"},
                    "502": {"$ref": "#/components/responses/Error"},
                    **ERRORS,
                },
            },
        },
        "/bulk": {
            "post": {
                "summary": "Release or delete everything a search matches, in the background",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["action", "query"],
                                "properties": {
                                    "action": {"enum": ["release", "delete"]},
                                    "query": {
                                        "type": "object",
                                        "properties": {
                                            "recipient": STRING,
                                            "sender": STRING,
                                            "subject": STRING,
                                            "reason": STRING,
                                            "since": STRING,
                                            "until": STRING,
                                            "ids": {"type": "array", "items": INTEGER},
                                        },
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {"202": _json(_ref("BulkJob"), "Accepted"), **ERRORS},
            }
        },
        "/bulk/{job_id}": {
            "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": INTEGER}],
            "get": {
                "summary": "A bulk job's progress",
                "responses": {"200": _json(_ref("BulkJob")), **ERRORS},
            },
        },
        "/lists": {
            "get": {
                "summary": "The allow and block entries of one owner",
                "parameters": [
                    {
                        "name": "scope",
                        "in": "query",
                        "schema": {"enum": ["global", "domain", "mailbox"]},
                    },
                    {"name": "owner", "in": "query", "schema": STRING},
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "entries": {"type": "array", "items": _ref("ListEntry")}
                            },
                        }
                    ),
                    **ERRORS,
                },
            },
            "post": {
                "summary": "Put a pattern on an allow or block list",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["scope", "action", "pattern"],
                                "properties": {
                                    "scope": {"enum": ["global", "domain", "mailbox"]},
                                    "owner": STRING,
                                    "action": {"enum": ["allow", "block"]},
                                    "pattern": STRING,
                                    "comment": STRING,
                                },
                            }
                        }
                    },
                },
                "responses": {"201": _json(_ref("ListEntry"), "Created"), **ERRORS},
            },
        },
        "/lists/{entry_id}": {
            "parameters": [{"name": "entry_id", "in": "path", "required": True, "schema": INTEGER}],
            "delete": {
                "summary": "Take an entry off its list",
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"deleted": {"type": "boolean"}}}
                    ),
                    **ERRORS,
                },
            },
        },
        "/mailboxes": {
            "get": {
                "summary": "Find mailboxes by part of their address",
                "parameters": [
                    {"name": "q", "in": "query", "schema": STRING},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "mailboxes": {"type": "array", "items": _ref("Mailbox")}
                            },
                        }
                    ),
                    **ERRORS,
                },
            }
        },
        "/mailboxes/{address}": {
            "parameters": [ADDRESS],
            "get": {
                "summary": "A mailbox's settings and last reports",
                "responses": {"200": _json(_ref("Mailbox")), **ERRORS},
            },
        },
        "/mailboxes/{address}/login-link": {
            "parameters": [ADDRESS],
            "post": {
                "summary": "A fresh login link for the owner (valid 15 days)",
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["address", "url"],
                            "properties": {"address": STRING, "url": STRING},
                        },
                        "Created",
                    ),
                    "409": {"$ref": "#/components/responses/Error"},
                    **ERRORS,
                },
            },
        },
        "/reports/status": {
            "get": {
                "summary": "The last report run and the reports waiting or failed (operators)",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "pending": INTEGER,
                                "retrying": INTEGER,
                                "failed": INTEGER,
                                "sent": INTEGER,
                            },
                        }
                    ),
                    **ERRORS,
                },
            }
        },
        "/stats": {
            "get": {
                "summary": "Counters per day, top reasons and senders, release rate",
                "parameters": [
                    {
                        "name": "days",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 366},
                    },
                    {"name": "domain", "in": "query", "schema": STRING},
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["days", "totals", "release_rate"],
                            "properties": {
                                "days": {"type": "array", "items": {"type": "object"}},
                                "totals": {"type": "object"},
                                "top_reasons": {"type": "array"},
                                "top_sender_domains": {"type": "array"},
                                "release_rate": {"type": "number"},
                            },
                        }
                    ),
                    **ERRORS,
                },
            }
        },
        "/ingest": {
            "post": {
                "summary": "Quarantine a message that the site's own scanner held",
                "description": (
                    "Body: the raw message. Envelope and verdict in the headers that rspamd's"
                    " metadata_exporter sends with meta_headers = true."
                ),
                "parameters": [
                    {"name": "X-Rspamd-Rcpt", "in": "header", "required": True, "schema": STRING},
                    {"name": "X-Rspamd-From", "in": "header", "schema": STRING},
                    {"name": "X-Rspamd-Ip", "in": "header", "schema": STRING},
                    {"name": "X-Rspamd-Score", "in": "header", "schema": STRING},
                    {"name": "X-Rspamd-Action", "in": "header", "schema": STRING},
                    {"name": "X-Rspamd-Symbols", "in": "header", "schema": STRING},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"message/rfc822": {"schema": {"type": "string"}}},
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "held": {"type": "array"},
                                "already_held": INTEGER,
                                "refused": {"type": "array", "items": STRING},
                            },
                        }
                    ),
                    "413": {"$ref": "#/components/responses/Error"},
                    "422": {"$ref": "#/components/responses/Error"},
                    **ERRORS,
                },
            }
        },
    }


def document() -> dict[str, Any]:
    """The whole description."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cleanmail API", "version": "1"},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "responses": {"Error": _json(_ref("Error"), "An error")},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


@api.route("/openapi.json", methods=["GET"])
def openapi() -> Response:
    """The OpenAPI description (public: it holds no data)."""
    return jsonify(document())
