"""The filter daemon over real SMTP, relaying to a real sink, on both databases."""

from __future__ import annotations

import smtplib

import pytest
from sqlalchemy import select

from cleanmail import audit, lists, mailboxes
from cleanmail.models import Domain, Message
from cleanmail.store import digest
from tests.messages import ELF, GTUBE, message, zip_of

ACTOR = audit.Actor("operator", "test")


@pytest.fixture
def served(database):
    """example.no is served; ola has a mailbox."""
    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, ACTOR, "example.no")
        mailboxes.add_mailbox(session, ACTOR, "ola@example.no")
    return database


def send(port: int, raw: bytes, rcpts=("ola@example.no",), sender="kari@example.com"):
    """Send and return the final reply (code, text) rather than raising on refusal."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("mx.cleanmail.test")
        code, text = client.mail(sender)
        if code != 250:
            return code, text.decode()
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            assert code == 250, text
        code, text = client.data(raw)
        return code, text.decode()


def held(database):
    with database.session_scope() as session:
        rows = list(session.scalars(select(Message).order_by(Message.id)))
        for row in rows:
            session.refresh(row, ["mailbox"])
        return rows


def test_ham_passes_with_headers_and_unchanged_body(served, filter_server, smtp_sink):
    raw = message()
    code, _ = send(filter_server.port, raw)
    assert code == 250
    (got,) = smtp_sink.wait_for(1)
    assert got.rcpt_tos == ["ola@example.no"] and got.mail_from == "kari@example.com"
    head, _sep, rest = got.data.partition(b"X-Cleanmail-Reasons:")
    assert head.startswith(b"X-Cleanmail-Verdict: pass\r\nX-Cleanmail-Score: ")
    assert rest.split(b"\r\n", 1)[1].replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
    assert held(served) == []


def test_gtube_is_quarantined_with_its_reason_and_exact_bytes(
    served, filter_server, smtp_sink, store
):
    raw = message(subject="Test spam", body=f"Hello\n{GTUBE}\n")
    code, text = send(filter_server.port, raw)
    assert code == 250, text
    (row,) = held(served)
    assert "GTUBE" in [r["code"] for r in row.reasons]
    assert row.status == "new" and row.subject == "Test spam"
    assert store.read(row.raw_sha256) == raw
    assert smtp_sink.messages == []


def test_unserved_recipients_pass_untouched(served, filter_server, smtp_sink):
    raw = message(to="Some.One@Elsewhere.test", body=f"{GTUBE}\n")
    code, _ = send(filter_server.port, raw, rcpts=("Some.One@Elsewhere.test",))
    assert code == 250
    (got,) = smtp_sink.wait_for(1)
    assert got.data == raw and got.rcpt_tos == ["Some.One@Elsewhere.test"]
    assert held(served) == []


def test_mixed_recipients_each_get_their_verdict(served, filter_server, smtp_sink):
    raw = message(body=f"{GTUBE}\n")
    code, _ = send(filter_server.port, raw, rcpts=("ola@example.no", "x@elsewhere.test"))
    assert code == 250
    (got,) = smtp_sink.wait_for(1)
    assert got.rcpt_tos == ["x@elsewhere.test"] and got.data == raw
    assert [m.mailbox.address for m in held(served)] == ["ola@example.no"]


def test_first_mail_creates_the_mailbox(served, filter_server, smtp_sink):
    code, _ = send(filter_server.port, message(to="new@example.no"), rcpts=("New@Example.no",))
    assert code == 250
    smtp_sink.wait_for(1)
    with served.session_scope() as session:
        assert mailboxes.get_mailbox(session, "new@example.no").domain.name == "example.no"


@pytest.mark.parametrize(
    ("name", "content", "ctype"),
    [
        ("invoice.exe", b"MZ harmless", "application/octet-stream"),
        ("photo.jpg", ELF, "image/jpeg"),
        ("documents.zip", zip_of({"setup.exe": b"MZ"}), "application/zip"),
        ("report.zip", zip_of({"report.pdf": ELF}), "application/zip"),
    ],
    ids=["by-name", "by-content", "zip-by-name", "zip-by-content"],
)
def test_blocked_attachments_are_quarantined(
    served, filter_server, smtp_sink, name, content, ctype
):
    raw = message(subject="Your invoice", attachments=[(name, content, ctype)])
    assert send(filter_server.port, raw)[0] == 250
    (row,) = held(served)
    assert [r["code"] for r in row.reasons] == ["BLOCKED_ATTACHMENT"]
    assert smtp_sink.messages == []


def add_entry(database, action, pattern, mailbox="ola@example.no"):
    with database.session_scope(write=True) as session:
        owner = mailboxes.get_mailbox(session, mailbox)
        lists.add(session, ACTOR, action, pattern, mailbox=owner)


def test_blocked_sender_is_quarantined_not_lost(served, filter_server, smtp_sink):
    add_entry(served, "block", "*@example.com")
    assert send(filter_server.port, message())[0] == 250
    (row,) = held(served)
    assert row.reasons[0]["code"] == "LIST_BLOCK_MAILBOX"


def test_allowed_sender_passes_even_spam_but_not_executables(served, filter_server, smtp_sink):
    add_entry(served, "allow", "kari@example.com")
    assert send(filter_server.port, message(body=f"{GTUBE}\n"))[0] == 250
    (got,) = smtp_sink.wait_for(1)
    assert b"X-Cleanmail-Reasons: LIST_ALLOW" in got.data
    raw = message(subject="tool", attachments=[("tool.exe", b"MZ", "application/octet-stream")])
    assert send(filter_server.port, raw)[0] == 250
    assert [r["code"] for r in held(served)[0].reasons] == ["BLOCKED_ATTACHMENT"]


def test_allow_entry_does_not_rescue_spoofed_from(served, filter_server, smtp_sink):
    add_entry(served, "allow", "bank.no")
    forged = "mx.cleanmail.test; spf=fail smtp.mailfrom=evil.test; dmarc=fail header.from=bank.no"
    raw = message(
        sender="post@bank.no", body=f"{GTUBE}\n", headers={"Authentication-Results": forged}
    )
    assert send(filter_server.port, raw, sender="x@evil.test")[0] == 250
    (row,) = held(served)
    codes = [r["code"] for r in row.reasons]
    assert codes[0] == "ALLOW_IGNORED_SPOOFED" and "GTUBE" in codes


def test_domain_threshold_applies(served, filter_server, smtp_sink):
    with served.session_scope(write=True) as session:
        session.scalar(select(Domain)).quarantine_threshold = 5000.0
    filter_server.pipeline.forget_cache()  # the cache would pick it up within seconds
    assert send(filter_server.port, message(body=f"{GTUBE}\n"))[0] == 250
    smtp_sink.wait_for(1)
    assert held(served) == []


def test_a_retry_after_relay_refusal_is_not_doubled(served, filter_server, smtp_sink):
    raw = message(body=f"{GTUBE}\n")
    smtp_sink.refuse = "451 4.3.0 try later"
    code, text = send(filter_server.port, raw, rcpts=("ola@example.no", "x@elsewhere.test"))
    assert code == 451, text
    smtp_sink.refuse = None
    assert send(filter_server.port, raw, rcpts=("ola@example.no", "x@elsewhere.test"))[0] == 250
    assert len(smtp_sink.wait_for(1)) == 1
    assert len(held(served)) == 1


def test_permanent_relay_refusal_is_passed_back(served, filter_server, smtp_sink):
    smtp_sink.refuse = "554 5.7.1 no thanks"
    code, text = send(filter_server.port, message())
    assert code == 554 and "no thanks" in text


def test_relay_down_gives_451(served, filter_server, smtp_sink):
    smtp_sink.stop()
    assert send(filter_server.port, message())[0] == 451


def test_store_failure_gives_451(served, filter_server, smtp_sink, config):
    config.store_dir.rmdir()
    config.store_dir.write_text("not a folder: writes fail like a full disk")
    assert send(filter_server.port, message(body=f"{GTUBE}\n"))[0] == 451
    assert held(served) == []


def test_size_limit_refused_with_552_534(served, filter_server, config):
    with smtplib.SMTP("127.0.0.1", filter_server.port, timeout=30) as client:
        client.ehlo("x")
        assert client.has_extn("size") and client.has_extn("xforward")
        code, text = client.mail("a@example.com", [f"SIZE={config.max_message_size + 1}"])
        assert (code, text[:5]) == (552, b"5.3.4")
        client.rset()
        client.mail("a@example.com")
        client.rcpt("ola@example.no")
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (
            config.max_message_size // 1000 + 10
        )
        code, text = client.data(big)
        assert (code, text[:5]) == (552, b"5.3.4")


def test_too_many_recipients_are_deferred(served, filter_server, config):
    with smtplib.SMTP("127.0.0.1", filter_server.port, timeout=30) as client:
        client.ehlo("x")
        client.mail("a@example.com")
        codes = [client.rcpt(f"u{i}@elsewhere.test")[0] for i in range(config.max_recipients + 5)]
    assert set(codes[: config.max_recipients]) == {250}
    assert set(codes[config.max_recipients :]) == {452}


def test_xforward_client_is_recorded(served, filter_server, smtp_sink):
    with smtplib.SMTP("127.0.0.1", filter_server.port, timeout=30) as client:
        client.ehlo("x")
        assert client.docmd("XFORWARD", "NAME=mx.evil.test ADDR=192.0.2.7 HELO=evil")[0] == 250
        client.sendmail("a@example.com", ["ola@example.no"], message(body=f"{GTUBE}\n"))
    (row,) = held(served)
    assert (row.client_address, row.client_helo) == ("192.0.2.7", "evil")


def test_stored_message_is_shared_between_recipients(served, filter_server, store):
    raw = message(body=f"{GTUBE}\n")
    with served.session_scope(write=True) as session:
        mailboxes.add_mailbox(session, ACTOR, "kari@example.no")
    assert send(filter_server.port, raw, rcpts=("ola@example.no", "kari@example.no"))[0] == 250
    rows = held(served)
    assert len(rows) == 2 and {r.raw_sha256 for r in rows} == {digest(raw)}


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_database_down_gives_451_and_recovers(served, filter_server, smtp_sink, postgres_server):
    """A database that refuses connections: Postfix is told to retry, then it all works again."""
    import psycopg
    from psycopg import sql as pgsql

    name = served.engine.url.database
    served.engine.dispose()
    filter_server.pipeline.database.engine.dispose()
    with psycopg.connect(postgres_server.conninfo(), autocommit=True) as conn:
        conn.execute(
            pgsql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(pgsql.Identifier(name))
        )
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name]
        )
    raw = message(body=f"{GTUBE}\n")
    assert send(filter_server.port, raw)[0] == 451
    with psycopg.connect(postgres_server.conninfo(), autocommit=True) as conn:
        conn.execute(
            pgsql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(pgsql.Identifier(name))
        )
    assert send(filter_server.port, raw)[0] == 250
    assert len(held(served)) == 1


def test_dots_and_line_ends_survive_the_smtp_round_trip(served, filter_server, smtp_sink, store):
    """Dot-stuffing is undone exactly, and a line ending in a dot does not end the data."""
    body = ".leading dot\n..two dots\nends with a dot.\n.\nX" + "y" * 70000 + "\n"
    raw = message(subject="dots", body=body + GTUBE + "\n")
    assert send(filter_server.port, raw)[0] == 250
    (row,) = held(served)
    assert store.read(row.raw_sha256) == raw
    ham = message(subject="dots", body=body)
    assert send(filter_server.port, ham)[0] == 250
    (got,) = smtp_sink.wait_for(1)
    assert got.data.endswith(ham)


def test_reject_threshold_refuses_only_when_every_recipient_rejects(
    served, filter_server, smtp_sink
):
    with served.session_scope(write=True) as session:
        mailboxes.set_thresholds(
            session, ACTOR, "example.no", quarantine_threshold=5.0, reject_threshold=100.0
        )
    filter_server.pipeline.forget_cache()
    spam = message(body=f"{GTUBE}\n")
    code, text = send(filter_server.port, spam)
    assert (code, text) == (550, "5.7.1 Message refused as spam")
    assert held(served) == []
    # With a recipient that takes it, SMTP has one answer: the rejecting one is held.
    assert send(filter_server.port, spam, rcpts=("ola@example.no", "x@elsewhere.test"))[0] == 250
    assert [m.mailbox.address for m in held(served)] == ["ola@example.no"]
    assert smtp_sink.wait_for(1)[0].rcpt_tos == ["x@elsewhere.test"]


def test_concurrent_sessions_are_each_stored_once(served, filter_server, smtp_sink, store):
    """Many clients at once: the held ones share commits, and every one is stored once."""
    from concurrent.futures import ThreadPoolExecutor

    raws = [message(subject=f"offer {n}", body=f"{GTUBE}\n") for n in range(24)]
    raws += [message(subject=f"lunch {n}") for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda raw: send(filter_server.port, raw), raws))
    assert [code for code, _text in replies] == [250] * len(raws)
    rows = held(served)
    assert sorted(r.raw_sha256 for r in rows) == sorted(digest(raw) for raw in raws[:24])
    assert all(store.read(r.raw_sha256) == raws[int(r.subject.split()[1])] for r in rows)
    assert len(smtp_sink.wait_for(8)) == 8


def test_idle_connections_time_out_and_busy_ones_do_not():
    """The filter's one idle timer per connection: commands keep it open, silence closes it."""
    import asyncio
    import time

    from cleanmail.filter.server import FilterSMTP

    class Quiet:
        """No hooks: aiosmtpd answers NOOP itself."""

    async def scenario() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: FilterSMTP(Quiet(), hostname="filter.test", timeout=0.6), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()  # the greeting
            started = time.monotonic()
            while time.monotonic() - started < 1.5:  # busy for well over the timeout
                writer.write(b"NOOP\r\n")
                assert (await reader.readline()).startswith(b"250")
                last = time.monotonic()
                await asyncio.sleep(0.2)
            busy = time.monotonic() - started
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
            return busy, time.monotonic() - last
        finally:
            server.close()

    busy, idle = asyncio.run(scenario())
    assert busy >= 1.5
    assert 0.5 <= idle < 5  # the timeout counts from the last command


def test_a_pipelining_client_gets_every_reply_in_order(served, filter_server, smtp_sink):
    """Postfix sends MAIL, RCPT and DATA in one write when the filter offers PIPELINING."""
    with smtplib.SMTP("127.0.0.1", filter_server.port, timeout=30) as client:
        client.ehlo("mx.cleanmail.test")
        assert client.has_extn("pipelining")
        finals = []
        for body in ("ham\n", f"{GTUBE}\n"):
            client.send(
                "MAIL FROM:<kari@example.com>\r\nRCPT TO:<ola@example.no>\r\n"
                "RCPT TO:<not-an-address>\r\nDATA\r\n"
            )
            replies = [client.getreply()[0] for _command in range(4)]
            assert replies == [250, 250, 501, 354]
            client.send(message(body=body) + b".\r\n")
            finals.append(client.getreply())
    assert [(code, text.rpartition(b" ")[2]) for code, text in finals] == [
        (250, b"pass"),
        (250, b"quarantine"),
    ]
    assert len(smtp_sink.wait_for(1)) == 1
    assert [row.mailbox.address for row in held(served)] == ["ola@example.no"]
