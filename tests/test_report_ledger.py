"""The report ledger: the claims and marks of many sender threads, committed together."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, select

from cleanmail import mailboxes, report_ledger, report_senders, reports
from cleanmail.models import Report, ReportStatus
from tests.test_reports import hold, quarantine_actor

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def _ledger(engine):
    return report_ledger.Ledger(
        engine, report_senders._CLAIM, report_senders._MARK_SENT, NOW, NOW + report_senders.CLAIM
    )


def test_claims_and_marks_of_many_threads_are_each_written_once(database, store, owner):
    """Eight threads claim and mark their reports through one ledger; a claim is taken once."""
    with database.session_scope(write=True) as session:
        ids = [owner.id] + [
            mailboxes.add_mailbox(session, quarantine_actor(), f"l{n}@example.no").id
            for n in range(15)
        ]
    for mailbox_id in ids:
        hold(database, store, mailbox_id, f"Spam for {mailbox_id}")
    with database.session_scope(write=True) as session:
        prepared = reports.prepare_batch(session, ids, None, NOW)
    report_ids = sorted(report_id for report_id, _count in prepared.values())
    engine = database.write_sessions.kw["bind"].execution_options(
        cleanmail_immediate=True, cleanmail_relaxed=True
    )
    ledger = _ledger(engine)
    won: list[int] = []
    lock = threading.Lock()

    def sender(mine: list[int]) -> None:
        for report_id in mine:
            for _twice in range(2):  # the second claim of the same report must fail
                if ledger.write([], report_id):
                    with lock:
                        won.append(report_id)
            mark = {"report": report_id, "now": NOW, "message_id": f"<{report_id}@x>"}
            ledger.write([mark], None)

    threads = [threading.Thread(target=sender, args=(report_ids[n::8],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ledger.close()
    assert sorted(won) == report_ids
    with database.session_scope() as session:
        rows = session.execute(select(Report.status, Report.message_id_header)).all()
    assert len(rows) == len(report_ids)
    assert all(status == ReportStatus.SENT and header for status, header in rows)


def test_a_ledger_that_cannot_connect_raises_instead_of_hanging(tmp_path):
    """The ledger's thread dies on a database it cannot open: the senders get the error."""
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'db.sqlite'}")
    ledger = _ledger(engine)
    with pytest.raises(report_ledger.LedgerError) as failed:
        ledger.write([], 1)
    assert not failed.value.marked
    ledger.close()
    assert ledger.failed is not None
