"""The ingest endpoint: a real Debian rspamd pushes held mail through metadata_exporter."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from werkzeug.serving import make_server

from cleanmail import apitokens, audit, mailboxes
from cleanmail.models import AuditEvent, Message, Status
from tests.messages import message
from tests.servers import RspamdServer, free_port, http_request

ACTOR = audit.Actor("operator", "test")

# The configuration the README shows, with the test's port and token filled in.
EXPORTER = """\
rules {{
  CLEANMAIL {{
    backend = "http";
    url = "http://127.0.0.1:{port}/api/v1/ingest";
    selector = "is_reject";
    formatter = "default";
    meta_headers = true;
    mime_type = "message/rfc822";
    user = "rspamd";
    password = "{token}";
  }}
}}
"""
# GTUBE cannot stand in for spam here: rspamd marks a GTUBE message "skip", and
# metadata_exporter exports no skipped task. A multimap rule on the subject makes a real
# reject verdict instead.
SPAM_RULE = """\
CLEANMAIL_TEST_SUBJECT {
  type = "header";
  header = "Subject";
  regexp = true;
  map = "${LOCAL_CONFDIR}/local.d/cleanmail_test_subjects.map";
  score = 20.0;
}
"""


class WebServer:
    """The Flask app served over real HTTP on a loopback port, in a thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.thread.join(10)


def make_token(database, name="rspamd", domains=()):
    with database.session_scope(write=True) as session:
        return apitokens.create(session, ACTOR, name, domains).secret


def held(database) -> list[Message]:
    with database.session_scope() as session:
        found = session.scalars(select(Message).order_by(Message.id)).all()
        for row in found:
            _ = row.mailbox.address
        return list(found)


@pytest.fixture
def web(app) -> Iterator[WebServer]:
    with WebServer(app) as running:
        yield running


def test_rspamd_pushes_rejected_mail_into_the_quarantine(tmp_path, database, owner, web):
    token = make_token(database, domains=["example.no"])
    config = {
        "metadata_exporter.conf": EXPORTER.format(port=web.port, token=token),
        "multimap.conf": SPAM_RULE,
        "cleanmail_test_subjects.map": "/cheap watches/i\n",
    }
    spam = message(subject="Cheap watches", sender="seller@spam.example")
    with RspamdServer(tmp_path, extra_local_d=config) as rspamd:
        answer = json.loads(
            http_request(
                f"{rspamd.url}/checkv2",
                data=spam,
                headers={
                    "From": "bounce@spam.example",
                    "Rcpt": "ola@example.no",
                    "IP": "192.0.2.7",
                    "Helo": "mail.spam.example",
                },
            )
        )
        assert answer["action"] == "reject"
        deadline = time.monotonic() + 15
        while not held(database) and time.monotonic() < deadline:
            time.sleep(0.2)
        log = rspamd.log()
    (row,) = held(database) or pytest.fail("nothing was ingested; rspamd said:\n" + log[-3000:])
    assert row.mailbox.address == "ola@example.no"
    assert row.status == Status.NEW
    assert row.envelope_sender == "bounce@spam.example"
    assert row.client_address == "192.0.2.7"
    assert row.subject == "Cheap watches"
    assert row.score == pytest.approx(answer["score"], abs=0.01)
    codes = [reason["code"] for reason in row.reasons]
    assert codes[0] == "SCANNER_VERDICT" and "reject" in row.reasons[0]["text"]
    assert codes[1] == "CLEANMAIL_TEST_SUBJECT"  # the highest-scoring symbol first
    assert row.reasons[1] == {
        "code": "CLEANMAIL_TEST_SUBJECT",
        "text": "Cheap watches",
        "score": 20,
    }
    with database.session_scope() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "message.ingest")
        ).one()
        assert (event.actor_type, event.actor, event.message_id) == ("api", "rspamd", row.id)


def test_ingest_refuses_other_domains_and_bad_input(client, database, owner):
    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, ACTOR, "example.dk")
    token = make_token(database, domains=["example.no"])
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "message/rfc822"}
    raw = message(subject="Hi")
    other = client.post(
        "/api/v1/ingest", data=raw, headers={**headers, "X-Rspamd-Rcpt": '["mette@example.dk"]'}
    )
    assert other.status_code == 422
    mixed = client.post(
        "/api/v1/ingest",
        data=raw,
        headers={**headers, "X-Rspamd-Rcpt": '["ola@example.no", "mette@example.dk"]'},
    )
    assert mixed.status_code == 200
    assert [row["mailbox"] for row in mixed.json["held"]] == ["ola@example.no"]
    assert mixed.json["refused"] == ["mette@example.dk"]
    again = client.post(
        "/api/v1/ingest", data=raw, headers={**headers, "X-Rspamd-Rcpt": "ola@example.no"}
    )
    assert again.json == {"held": [], "already_held": 1, "refused": []}  # a retried push
    assert len(held(database)) == 1
    counted = client.get("/api/v1/stats?days=1", headers=headers).json
    assert counted["held"] == 1
    assert counted["top_reasons"] == [{"code": "SCANNER_VERDICT", "count": 1}]
    for bad in (
        {"X-Rspamd-Rcpt": ""},
        {"X-Rspamd-Rcpt": "[1, 2]"},
        {"X-Rspamd-Rcpt": "ola@example.no", "X-Rspamd-Score": "lots"},
    ):
        response = client.post("/api/v1/ingest", data=raw, headers={**headers, **bad})
        assert response.status_code == 400, bad
        assert response.json["error"]["message"]
    empty = client.post(
        "/api/v1/ingest", data=b"", headers={**headers, "X-Rspamd-Rcpt": "ola@example.no"}
    )
    assert empty.status_code == 400


def test_ingest_takes_messages_up_to_the_filter_limit(client, database, owner, config):
    token = make_token(database)
    headers = {"Authorization": f"Bearer {token}", "X-Rspamd-Rcpt": "ola@example.no"}
    big = message(subject="Big", body="x" * (2 * 1024 * 1024))  # past the app's 1 MB form limit
    assert client.post("/api/v1/ingest", data=big, headers=headers).status_code == 200
    too_big = b"x" * (config.max_message_size + 1)
    refused = client.post("/api/v1/ingest", data=too_big, headers=headers)
    assert refused.status_code == 413 and refused.json["error"]["status"] == 413
