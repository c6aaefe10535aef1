"""The API against its own OpenAPI description: generated requests never get a 500."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from cleanmail import apitokens, audit, mailboxes
from cleanmail.web.api import openapi
from tests.conftest import hold_message
from tests.messages import message

ACTOR = audit.Actor("operator", "test")


@schemathesis.serializer("message/rfc822")
def raw_message(_context, value):
    """Generated bodies for the ingest endpoint, sent as bytes."""
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture
def fuzz_app(app, database, store, owner):
    """The app with a token and a held message to find."""
    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, ACTOR, "example.dk")
        mailboxes.add_mailbox(session, ACTOR, "mette@example.dk")
        secret = apitokens.create(session, ACTOR, "fuzz").secret
    hold_message(database, store, owner.id, message(subject="Invoice"))
    app.config["FUZZ_TOKEN"] = secret
    return app


schema = schemathesis.openapi.from_dict(openapi.document())


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_500(case, fuzz_app):
    """Every operation, with generated valid and invalid input: no server error, JSON errors."""
    # The generated security header would be an empty token: every request a 401.
    case.headers = {
        **(case.headers or {}),
        "Authorization": f"Bearer {fuzz_app.config['FUZZ_TOKEN']}",
    }
    response = case.call_and_validate(
        app=fuzz_app,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance],
    )
    assert response.status_code < 500 or response.status_code in (502, 503)
    if case.method in ("HEAD", "OPTIONS"):
        return  # answered by Flask itself, without a body
    content_type = {k.lower(): v for k, v in response.headers.items()}["content-type"]
    if isinstance(content_type, list):
        content_type = content_type[0]
    assert content_type.startswith("application/json"), (
        response.request.url,
        response.status_code,
        response.text[:200],
    )
