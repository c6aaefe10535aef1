"""Smoke tests for the real servers in tests/servers.py."""

from __future__ import annotations

import json
import os
import smtplib
import time
import urllib.error
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import psycopg
import pytest

from tests.servers import (
    PostfixServer,
    PostgresServer,
    ReceivedMessage,
    SmtpSink,
    SpamdServer,
    free_port,
    http_request,
)

needs_postfix = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/sbin/postfix").exists(),
    reason="a private Postfix instance needs root and the postfix package",
)


def make_message(body: str = "The original body, untouched.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = "kari@example.com"
    msg["To"] = "ola@example.no"
    msg["Subject"] = "Smoke test"
    msg.set_content(body)
    return msg.as_bytes()


def reinjector(postfix: list[PostfixServer]) -> Callable[[ReceivedMessage], None]:
    """A filter that hands every message straight back to Postfix's reinject port."""

    def reinject(message: ReceivedMessage) -> None:
        with smtplib.SMTP("127.0.0.1", postfix[0].reinject_port, timeout=10) as smtp:
            smtp.sendmail(message.mail_from, message.rcpt_tos, message.data)

    return reinject


def assert_gone(pid: int) -> None:
    """No process, not even a zombie, is left with this pid."""
    assert not Path(f"/proc/{pid}").exists()


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 < port < 65536


def test_postgres_answers_queries() -> None:
    with PostgresServer() as pg:
        pg.create_database("smoke")
        assert pg.url("smoke") == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/smoke"
        with psycopg.connect(pg.conninfo("smoke")) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        pid = int((pg.datadir / "postmaster.pid").read_text().split()[0])
        directory = pg.dir
    assert directory is not None and not directory.exists()
    assert_gone(pid)


def test_smtp_sink_records_and_refuses() -> None:
    with SmtpSink() as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as smtp:
            smtp.sendmail("a@example.com", ["b@example.org", "c@example.org"], make_message())
            sink.refuse = "451 4.3.0 try later"
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("a@example.com", ["b@example.org"], make_message())
            assert refused.value.smtp_code == 451
        (received,) = sink.wait_for(1, timeout=5)
    assert received.mail_from == "a@example.com"
    assert received.rcpt_tos == ["b@example.org", "c@example.org"]
    assert b"The original body, untouched." in received.data


@needs_postfix
@pytest.mark.timeout(60)
def test_postfix_passes_mail_through_the_filter_to_the_relayhost() -> None:
    postfix: list[PostfixServer] = []
    with SmtpSink() as sink, SmtpSink(on_message=reinjector(postfix)) as scanner:
        with PostfixServer(None, scanner.port, sink.port) as server:
            postfix.append(server)
            server.send("kari@example.com", ["ola@example.no"], make_message())
            (delivered,) = sink.wait_for(1, timeout=20)
            assert len(scanner.messages) == 1
            assert delivered.rcpt_tos == ["ola@example.no"]
            assert b"The original body, untouched." in delivered.data
            server.wait_for_log("status=sent")
            master = int((server.dir / "queue/pid/master.pid").read_text().split()[0])
            directory = server.dir
    assert not directory.exists()
    assert_gone(master)


@needs_postfix
@pytest.mark.timeout(60)
def test_postfix_keeps_mail_queued_until_the_filter_comes_up() -> None:
    filter_port = free_port()
    postfix: list[PostfixServer] = []
    with SmtpSink() as sink, PostfixServer(None, filter_port, sink.port) as server:
        postfix.append(server)
        server.send("kari@example.com", ["ola@example.no"], make_message())
        server.wait_for_log("status=deferred")
        assert server.queue_size() == 1
        assert server.queue()[0]["queue_name"] == "deferred"
        with SmtpSink(port=filter_port, on_message=reinjector(postfix)):
            server.flush()
            (delivered,) = sink.wait_for(1, timeout=20)
            assert b"The original body, untouched." in delivered.data
            # The original leaves the queue once the filter took it, the re-injected copy
            # once the sink took it; either "removed" line may come first.
            deadline = time.monotonic() + 20
            while server.queue_size() and time.monotonic() < deadline:
                time.sleep(0.2)
        assert server.queue_size() == 0


def test_rspamd_checks_and_learns(rspamd_server) -> None:
    from tests.messages import GTUBE, message

    check = json.loads(
        http_request(f"{rspamd_server.url}/checkv2", data=message(body=f"{GTUBE}\n"))
    )
    assert check["action"] == "reject" and "GTUBE" in check["symbols"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        http_request(f"{rspamd_server.controller_url}/learnham", data=message(), headers={})
    assert refused.value.code == 401  # loopback is not trusted without the password
    before = rspamd_server.learned()
    learn = http_request(
        f"{rspamd_server.controller_url}/learnham",
        data=message(subject="Minutes of the board meeting", body="Attached are the minutes " * 9),
        headers={"Password": rspamd_server.password},
    )
    assert json.loads(learn) == {"success": True}
    assert rspamd_server.learned() == before + 1


def test_spamd_answers_ping_and_stops_cleanly() -> None:
    with SpamdServer() as spamd:
        assert spamd.ping()
        pid = int((spamd.dir / "spamd.pid").read_text().split()[0])
        directory = spamd.dir
    assert directory is not None and not directory.exists()
    assert_gone(pid)
