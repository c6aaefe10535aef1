"""The scheduler as real processes: one leader, a standby that takes over, jobs run once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from cleanmail import scheduler
from cleanmail.models import utcnow
from tests.conftest import FilterProcess

ROOT = Path(__file__).resolve().parent.parent


def record(path: str) -> None:
    """A job for the tests: one line per run in a file."""
    with open(path, "a") as handle:
        handle.write("ran\n")


def record_slowly(path: str) -> None:
    """A job that is still running when the scheduler is told to stop."""
    with open(path, "a") as handle:
        handle.write("started\n")
    time.sleep(1.5)
    record(path)


def runs(path: Path) -> int:
    return path.read_text().count("ran\n") if path.exists() else 0


class SchedulerProcess:
    """``cleanmail scheduler`` as its own process, its stderr in a file."""

    def __init__(self, config, log: Path, **env_extra: str) -> None:
        env = {**FilterProcess(config).environment(), scheduler.TICK_VARIABLE: "0.2", **env_extra}
        self.log = log
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cleanmail", "scheduler"], env=env, cwd=ROOT, stderr=stderr
            )

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 20) -> float:
        """Seconds until ``text`` appears on stderr."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if text in self.output:
                return time.monotonic() - start
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} from the scheduler:\n{self.output}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@pytest.fixture
def start(config, tmp_path):
    """A factory of scheduler processes; each one is killed at the end if still running."""
    started: list[SchedulerProcess] = []

    def make(name: str, **env: str) -> SchedulerProcess:
        started.append(SchedulerProcess(config, tmp_path / f"{name}.log", **env))
        return started[-1]

    yield make
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
        running.process.wait(10)


class Offline(BaseScheduler):
    """A scheduler that only writes to its job store: it has no loop that could run jobs."""

    def wakeup(self) -> None:
        """Nothing to wake."""

    def shutdown(self, wait: bool = True) -> None:
        """Close the job store."""
        super().shutdown(wait)


def add_job(url: str, *args, **kwargs) -> None:
    """Add a job to the database's job store from outside the scheduler processes."""
    engine = create_engine(url)
    other = Offline(
        jobstores={"default": SQLAlchemyJobStore(engine=engine, tablename=scheduler.JOBS_TABLE)},
        timezone="UTC",
    )
    try:
        other.start(paused=True)
    except (OperationalError, ProgrammingError, IntegrityError) as exc:
        # The leader logs "leading" just before it creates the job table: both may try
        # (SQLite and PostgreSQL say so in their own words).
        if "already exists" not in str(exc) and "duplicate key" not in str(exc):
            raise
        other.start(paused=True)
    try:
        other.add_job(*args, **kwargs)
    finally:
        other.shutdown(wait=False)
        engine.dispose()


def wait_for_jobs(url: str, timeout: float = 20) -> None:
    """Wait until the leader has stored its own jobs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stored_jobs(url) >= {"reports", "purge"}:
                return
        except (OperationalError, ProgrammingError):  # the table is not there yet
            pass
        time.sleep(0.05)
    raise AssertionError("the leader stored no jobs")


def stored_jobs(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return set(connection.scalars(text(f"SELECT id FROM {scheduler.JOBS_TABLE}")))
    finally:
        engine.dispose()


def test_jobs_keep_their_schedule_across_restarts(database):
    first = scheduler.build(database)
    first.start(paused=True)
    scheduler.ensure_jobs(first)
    due = {job.id: job.next_run_time for job in first.get_jobs()}
    first.shutdown(wait=False)
    assert set(due) == {"reports", "purge", "bulk", "learning", "feedback"}
    second = scheduler.build(database)
    second.start(paused=True)
    scheduler.ensure_jobs(second)
    assert {job.id: job.next_run_time for job in second.get_jobs()} == due
    job = second.get_job("purge")
    assert job.coalesce and job.max_instances == 1 and job.misfire_grace_time is None
    second.shutdown(wait=False)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_on_sqlite_a_second_scheduler_refuses_to_lead(config, start, tmp_path):
    first = start("first")
    first.wait_for("leading")
    wait_for_jobs(config.database_url)
    second = start("second")
    assert second.process.wait(30) == 1
    assert second.output.startswith("cleanmail: error: another scheduler leads")
    assert second.output.count("\n") == 1
    # A run missed five times over is caught up once; a one-off job runs once.
    missed, once = tmp_path / "missed", tmp_path / "once"
    add_job(
        config.database_url,
        record,
        "interval",
        hours=1,
        args=[str(missed)],
        id="missed",
        next_run_time=utcnow() - timedelta(hours=5),
        coalesce=True,
        misfire_grace_time=None,
    )
    add_job(config.database_url, record, "date", run_date=utcnow(), args=[str(once)], id="once")
    deadline = time.monotonic() + 10
    while (runs(missed), runs(once)) != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    assert (runs(missed), runs(once)) == (1, 1), first.output
    assert stored_jobs(config.database_url) == {
        "reports",
        "purge",
        "bulk",
        "learning",
        "feedback",
        "missed",
    }
    assert first.stop() == 0
    assert "scheduler stopped" in first.output
    # The lock went with the process: a new scheduler leads.
    third = start("third")
    third.wait_for("leading")
    assert third.stop() == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sigterm_waits_for_a_running_job(config, start, tmp_path):
    leader = start("leader")
    leader.wait_for("leading")
    wait_for_jobs(config.database_url)  # its job table exists: adding a job cannot race it
    slow = tmp_path / "slow"
    add_job(config.database_url, record_slowly, "date", run_date=utcnow(), args=[str(slow)])
    deadline = time.monotonic() + 10
    while not (slow.exists() and "started" in slow.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leader.stop() == 0
    assert runs(slow) == 1, leader.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_unmigrated_database_is_refused(config, tmp_path):
    env = {
        **FilterProcess(config).environment(),
        "CLEANMAIL_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "cleanmail", "scheduler"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "not migrated" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_on_postgresql_one_leads_and_a_standby_takes_over(config, start, tmp_path):
    first = start("first")
    first.wait_for("leading")
    wait_for_jobs(config.database_url)
    second = start("second")
    second.wait_for("standing by")
    once = tmp_path / "once"
    add_job(config.database_url, record, "date", run_date=utcnow(), args=[str(once)], id="once")
    deadline = time.monotonic() + 10
    while runs(once) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    assert runs(once) == 1
    assert "leading" not in second.output

    first.process.kill()
    first.process.wait(10)
    assert second.wait_for("leading", timeout=10) < 10
    time.sleep(1)
    assert runs(once) == 1, "the one-off job ran again under the new leader"
    assert stored_jobs(config.database_url) == {
        "reports",
        "purge",
        "bulk",
        "learning",
        "feedback",
    }
    # A third process finds the new leader and stands by; SIGTERM stops both cleanly.
    third = start("third")
    third.wait_for("standing by")
    assert third.stop() == 0
    assert second.stop() == 0
    assert "scheduler stopped" in second.output


def add_mailboxes(database, store, first: int, count: int) -> list[str]:
    """Mailboxes u<N>@example.no with a held message each, their report due at once."""
    from cleanmail import audit, mailboxes
    from tests.conftest import hold_message
    from tests.messages import message

    actor = audit.Actor("operator", "test")
    addresses = []
    with database.session_scope(write=True) as session:
        if first == 0:
            mailboxes.add_domain(session, actor, "example.no")
        ids = []
        for number in range(first, first + count):
            address = f"u{number}@example.no"
            mailbox = mailboxes.add_mailbox(session, actor, address)
            mailbox.report_hour = 0  # local midnight: due today, whatever the time
            ids.append(mailbox.id)
            addresses.append(address)
    for mailbox_id in ids:
        hold_message(database, store, mailbox_id, message(subject=f"Spam {mailbox_id}"))
    return addresses


def wait_for_recipients(sink, count: int, timeout: float = 30) -> list[str]:
    """The recipients of the first ``count`` messages at the sink, once they are there."""
    return [rcpt for received in sink.wait_for(count, timeout) for rcpt in received.rcpt_tos]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_schedulers_send_each_report_once_and_the_standby_takes_over(
    config, database, store, smtp_sink, start
):
    first_batch = add_mailboxes(database, store, 0, 30)
    fast = {scheduler.REPORTS_EVERY_VARIABLE: "0.5"}
    first = start("first", **fast)
    first.wait_for("leading")
    second = start("second", **fast)
    second.wait_for("standing by")
    assert sorted(wait_for_recipients(smtp_sink, 30)) == sorted(first_batch)
    time.sleep(2)  # several more ticks of the reports job: nothing is sent twice
    assert len(smtp_sink.messages) == 30
    assert "leading" not in second.output

    first.process.kill()  # SIGKILL: no chance to hand over
    first.process.wait(10)
    assert second.wait_for("leading", timeout=10) < 10
    second_batch = add_mailboxes(database, store, 30, 10)
    recipients = wait_for_recipients(smtp_sink, 40)
    assert sorted(recipients) == sorted(first_batch + second_batch)
    time.sleep(2)
    assert len(smtp_sink.messages) == 40, "a report was sent twice"
    assert second.stop() == 0
