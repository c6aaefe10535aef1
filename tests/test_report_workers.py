"""A large report run sent from worker processes (both databases): each report once, none lost."""

from __future__ import annotations

import email
import email.policy
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from cleanmail import mailboxes, report_workers, reports, stats
from cleanmail.models import Report, ReportStatus
from cleanmail.relay import Relay
from tests.test_reports import NOW, hold, quarantine_actor

MAILBOXES = 24  # and the owner


@pytest.fixture
def relay(config):
    """The relay to the test's SMTP sink."""
    running = Relay(config.relay, timeout=10)
    yield running
    running.close()


@pytest.fixture
def many(database, store, owner):
    """MAILBOXES mailboxes of the owner's domain with one held message each; their addresses."""
    with database.session_scope(write=True) as session:
        added = [
            mailboxes.add_mailbox(session, quarantine_actor(), f"w{n}@example.no")
            for n in range(MAILBOXES)
        ]
        ids = {mailbox.id: mailbox.address for mailbox in added}
    for mailbox_id in ids:
        hold(database, store, mailbox_id, f"Spam for {mailbox_id}")
    hold(database, store, owner.id, "Spam for the owner")
    return sorted([*ids.values(), owner.address])


@pytest.fixture
def in_workers(monkeypatch):
    """Worker processes from a few pending reports on; records each run that used them."""
    monkeypatch.setattr(report_workers, "PROCESSES_FROM", 2)
    runs = []
    real = report_workers.send

    def recorded(*args, **kwargs):
        runs.append(kwargs["processes"])
        return real(*args, **kwargs)

    monkeypatch.setattr(report_workers, "send", recorded)
    return runs


def test_a_run_in_two_processes_sends_each_report_once(
    database, relay, config, smtp_sink, many, in_workers, monkeypatch
):
    """Two worker processes share the batches; each owner gets one valid report, counted once."""
    monkeypatch.setattr(reports, "BATCH", 5)  # several batches for the two workers
    result = reports.run(database, relay, config, NOW, trigger="test", ignore_schedule=True)
    assert in_workers == [2]
    assert (result.prepared, result.sent, result.failed) == (MAILBOXES + 1, MAILBOXES + 1, 0)
    received = smtp_sink.wait_for(MAILBOXES + 1)
    assert sorted(rcpt for got in received for rcpt in got.rcpt_tos) == many
    for got in received:
        parsed = email.message_from_bytes(got.data, policy=email.policy.default)
        assert not parsed.defects and parsed["Auto-Submitted"] == "auto-generated"
        assert "Spam for" in parsed.get_body(("plain",)).get_content()
    with database.session_scope() as session:
        sent = session.scalars(select(Report).where(Report.status == ReportStatus.SENT)).all()
        assert len(sent) == MAILBOXES + 1
        assert len({report.message_id_header for report in sent}) == MAILBOXES + 1
        assert stats.totals(session, ["example.no"])["reports_sent"] == MAILBOXES + 1
    again = reports.run(database, relay, config, NOW, trigger="test", ignore_schedule=True)
    assert (again.prepared, again.sent) == (0, 0)
    assert len(smtp_sink.messages) == MAILBOXES + 1


def test_reports_a_worker_could_not_send_stay_pending_for_a_retry(
    database, relay, config, smtp_sink, many, in_workers
):
    """The relay refuses a third of them: the workers count them failed, and they go out later."""
    refused = set(many[::3])

    def refuse(received) -> None:
        if set(received.rcpt_tos) & refused:
            raise RuntimeError("relay trouble")  # the sink answers 451

    smtp_sink.on_message = refuse
    result = reports.run(database, relay, config, NOW, trigger="test", ignore_schedule=True)
    assert in_workers == [2]
    assert (result.sent, result.failed) == (len(many) - len(refused), len(refused))
    with database.session_scope() as session:
        info = reports.status(session)
        assert (info["pending"], info["retrying"]) == (len(refused), len(refused))
    smtp_sink.on_message = None
    later = NOW + reports.BACKOFF[0]
    assert reports.send_pending(database.write_sessions, relay, config, later) == (len(refused), 0)
    recipients = [rcpt for got in smtp_sink.wait_for(len(many)) for rcpt in got.rcpt_tos]
    assert sorted(recipients) == many  # each once: the refused ones were not taken before


CHILD = """
import multiprocessing, os, sys, time
sys.path.insert(0, {root!r})
from cleanmail import report_workers

def child(parent):
    report_workers._die_with(parent)
    time.sleep(120)

if __name__ == "__main__":
    worker = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),))
    worker.start()
    print(worker.pid, flush=True)
    time.sleep(120)
"""


def gone(pid: int) -> bool:
    """True when the process has exited (a zombie waiting for init counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_a_worker_dies_with_the_run_that_started_it(tmp_path):
    """SIGKILL of the sending process ends its workers too: none sends on behind its back."""
    script = tmp_path / "parent.py"
    script.write_text(CHILD.format(root=str(Path(__file__).resolve().parent.parent)))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        time.sleep(0.5)  # the worker has set its death signal by now, or will see its new parent
        assert not gone(worker)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not gone(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(worker)
    finally:
        parent.kill()
        parent.stdout.close()
