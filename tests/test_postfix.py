"""End to end: Postfix in front of and behind ``cleanmail filter``, on both databases."""

from __future__ import annotations

import dataclasses
import time

import pytest
from sqlalchemy import select

from cleanmail import audit, lists, mailboxes
from cleanmail.config import Endpoint
from cleanmail.models import Mailbox, Message
from tests.conftest import FilterProcess
from tests.messages import ELF, GTUBE, message, zip_of
from tests.servers import free_port

ACTOR = audit.Actor("operator", "test")


@pytest.fixture
def chain(config, database, smtp_sink, postfix):
    """Postfix (front and after-filter smtpd) -> Cleanmail filter -> Postfix -> sink."""
    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, ACTOR, "example.no")
        ola = mailboxes.add_mailbox(session, ACTOR, "ola@example.no")
        lists.add(session, ACTOR, "block", "spammer@bad.test", mailbox=ola)
        lists.add(session, ACTOR, "allow", "friend@good.test", mailbox=ola)
    filter_port = free_port()
    front = postfix(filter_port, smtp_sink.port)
    cfg = dataclasses.replace(
        config,
        filter_listen=Endpoint("127.0.0.1", filter_port),
        relay=Endpoint("127.0.0.1", front.reinject_port),
    )
    cfg.store_dir.mkdir(parents=True, exist_ok=True)
    daemon = FilterProcess(cfg).start()
    yield front, daemon
    daemon.stop()


def held_subjects(database) -> dict[str, list[str]]:
    with database.session_scope() as session:
        rows = session.execute(select(Message.subject, Message.reasons))
        return {subject: [r["code"] for r in reasons] for subject, reasons in rows}


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


CASES = {
    "ham": (message(subject="ham"), "kari@example.com", "pass"),
    "gtube": (message(subject="gtube", body=f"{GTUBE}\n"), "kari@example.com", "GTUBE"),
    "exe-by-name": (
        message(
            subject="exe-by-name", attachments=[("faktura.exe", b"MZ", "application/octet-stream")]
        ),
        "kari@example.com",
        "BLOCKED_ATTACHMENT",
    ),
    "elf-as-pdf": (
        message(subject="elf-as-pdf", attachments=[("faktura.pdf", ELF, "application/pdf")]),
        "kari@example.com",
        "BLOCKED_ATTACHMENT",
    ),
    "exe-in-zip": (
        message(
            subject="exe-in-zip",
            attachments=[("faktura.zip", zip_of({"faktura.pdf.exe": b"MZ"}), "application/zip")],
        ),
        "kari@example.com",
        "BLOCKED_ATTACHMENT",
    ),
    "blocked-sender": (
        message(subject="blocked-sender", sender="spammer@bad.test"),
        "spammer@bad.test",
        "LIST_BLOCK_MAILBOX",
    ),
    "allowed-sender": (
        message(subject="allowed-sender", sender="friend@good.test", body=f"{GTUBE}\n"),
        "friend@good.test",
        "pass",
    ),
}


def test_each_kind_of_mail_meets_its_fate(chain, database, smtp_sink):
    front, _daemon = chain
    for raw, sender, _expected in CASES.values():
        front.send(sender, ["ola@example.no"], raw)
    passed = [name for name, case in CASES.items() if case[2] == "pass"]
    wait_until(
        lambda: len(smtp_sink.messages) >= len(passed) and front.queue_size() == 0,
        what="Postfix to deliver everything",
    )
    time.sleep(0.5)
    delivered = {}
    for received in smtp_sink.messages:
        subject = received.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        delivered[subject] = received
        assert (
            received.data.startswith(b"X-Cleanmail-Verdict: pass")
            or b"\nX-Cleanmail-Verdict: pass" in received.data
        )
    assert sorted(delivered) == sorted(passed)
    held = held_subjects(database)
    for name, (_raw, _sender, expected) in CASES.items():
        if expected != "pass":
            assert expected in held[name], (name, held.get(name))
    assert len(held) == len(CASES) - len(passed)
    with database.session_scope() as session:
        row = session.scalar(select(Message).where(Message.subject == "gtube"))
        assert row.client_address == "127.0.0.1"  # from Postfix's XFORWARD


def test_nothing_is_lost_when_cleanmail_stops_mid_stream(chain, database, smtp_sink):
    front, daemon = chain
    total = 30
    for n in range(total):
        body = f"number {n}\n" + (f"{GTUBE}\n" if n % 3 == 0 else "")
        front.send("kari@example.com", ["ola@example.no"], message(subject=f"mail {n}", body=body))
        if n == 10:
            assert daemon.stop() == 0
    time.sleep(2)
    assert front.queue_size() > 0, "with Cleanmail down, Postfix must hold the mail"
    daemon.start()
    front.flush()

    def all_accounted() -> bool:
        return len(smtp_sink.messages) + len(held_subjects(database)) >= total

    wait_until(all_accounted, timeout=90, what="every message to arrive")
    wait_until(lambda: front.queue_size() == 0, what="an empty Postfix queue")
    subjects = [
        r.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for r in smtp_sink.messages
    ]
    held = list(held_subjects(database))
    everything = sorted(subjects + held)
    assert everything == sorted(f"mail {n}" for n in range(total)), "lost or doubled mail"
    assert len(held) == len(range(0, total, 3))
    with database.session_scope() as session:
        assert session.scalar(select(Mailbox.address)) == "ola@example.no"
