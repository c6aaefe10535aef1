"""The scheduler process: one leader runs APScheduler with its jobs stored in the database.

Several schedulers may run, one per node. On PostgreSQL the leader holds a session-level
advisory lock on a connection of its own for its whole life, so the lock goes the moment
the process dies and a standby, trying every tick, takes over. On SQLite one process is
assumed: an exclusive ``flock`` on a file in the data dir, and a second one refuses to lead.
Jobs are thin: they call domain-level runners with this process's database and settings.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import psycopg
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.engine import make_url

from cleanmail import db, feedback, learning, logins, purge, ratelimit
from cleanmail.config import Config
from cleanmail.filter import daemon
from cleanmail.models import utcnow
from cleanmail.relay import Relay
from cleanmail.store import Store

log = logging.getLogger(__name__)
RATE_LIMITS_KEPT = timedelta(days=1)  # the longest limit counts an hour

JOBS_TABLE = "scheduler_jobs"
LOCK_KEY = 0x436C65616E6D6C01  # "Cleanml" + 1: the PostgreSQL advisory lock of the leader
LOCK_FILE = "scheduler.lock"
TICK_VARIABLE = "CLEANMAIL_SCHEDULER_TICK"
TICK = 2.0  # seconds between a standby's attempts, and between the leader's checks
REPORTS_EVERY_VARIABLE = "CLEANMAIL_REPORTS_EVERY"
REPORTS_EVERY = timedelta(minutes=1)
PURGE_EVERY = timedelta(minutes=15)
BULK_EVERY = timedelta(minutes=1)
LEARN_EVERY = timedelta(minutes=1)
FEEDBACK_EVERY = timedelta(minutes=1)
# coalesce: however many runs were missed, one catch-up run; no grace limit, so that it
# does happen even after a long outage.
JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": None}


class SchedulerError(Exception):
    """The scheduler cannot lead; the message is one line for the operator."""


@dataclass(frozen=True)
class Runtime:
    """What the jobs of this process work with (jobs in the store carry no arguments)."""

    config: Config
    database: db.Database


_runtime: Runtime | None = None
_warned_no_reports = False


def reports_job() -> None:
    """Send the reports that are due (once ``cleanmail.reports`` exists)."""
    global _warned_no_reports
    runtime = _current()
    try:
        from cleanmail import reports
    except ModuleNotFoundError as exc:
        if exc.name != "cleanmail.reports":
            raise
        if not _warned_no_reports:
            log.warning("cleanmail.reports is not available; the reports job does nothing")
            _warned_no_reports = True
        return
    config = runtime.config
    relay = Relay(config.relay, timeout=config.relay_timeout, hostname=config.hostname)
    try:
        reports.run(runtime.database, relay, config, utcnow(), trigger="schedule")
    finally:
        relay.close()


def purge_job() -> None:
    """Expire messages past their retention, sweep unreferenced files and old login records."""
    runtime = _current()
    now = utcnow()
    result = purge.run(runtime.database, Store(runtime.config.store_dir), now)
    if result.expired or result.orphans:
        log.info("purge: %d messages expired, %d files removed", result.expired, result.orphans)
    with runtime.database.session_scope(write=True) as session:
        logins.purge(session, now)  # ended sessions whose cookies expired anyway
        ratelimit.purge(session, RATE_LIMITS_KEPT)


def bulk_job() -> None:
    """Resume bulk releases and deletes whose web worker died before finishing them."""
    from cleanmail import bulk

    runtime = _current()
    config = runtime.config
    relay = Relay(config.relay, timeout=config.relay_timeout, hostname=config.hostname)
    resumed = bulk.resume(runtime.database, Store(config.store_dir), relay)
    if resumed:
        log.info("bulk: %d interrupted jobs resumed", resumed)


def learning_job() -> None:
    """Fold owners' releases and blocks into a new classifier model version."""
    runtime = _current()
    try:
        learning.apply_pending(runtime.database, Store(runtime.config.store_dir))
    except learning.ModelConflict as exc:
        log.info("learning: %s; the events wait for the next run", exc)


def feedback_job() -> None:
    """Send owners' releases and blocks to the external engines as lessons (retried)."""
    runtime = _current()
    learners = daemon.external_engines(runtime.config)
    try:
        feedback.run(runtime.database, Store(runtime.config.store_dir), learners, utcnow())
    finally:
        for learner in learners:
            learner.close()


JOBS: dict[str, tuple[Any, timedelta]] = {
    "reports": (reports_job, REPORTS_EVERY),
    "purge": (purge_job, PURGE_EVERY),
    "bulk": (bulk_job, BULK_EVERY),
    "learning": (learning_job, LEARN_EVERY),
    "feedback": (feedback_job, FEEDBACK_EVERY),
}


def _current() -> Runtime:
    if _runtime is None:
        raise RuntimeError("scheduler jobs run only inside `cleanmail scheduler`")
    return _runtime


class LeaderLock(Protocol):
    """The right to run the jobs: taken without waiting, kept until released."""

    def acquire(self) -> bool:
        """Take the lock if it is free."""

    def held(self) -> bool:
        """True while the lock is still ours."""

    def release(self) -> None:
        """Give the lock up."""


class AdvisoryLock:
    """A PostgreSQL session advisory lock on a dedicated connection."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self.conninfo = url.render_as_string(hide_password=False)
        self.connection: psycopg.Connection[Any] | None = None

    def acquire(self) -> bool:
        """Try the lock once; a broken connection is replaced on the next try."""
        try:
            if self.connection is None or self.connection.closed:
                self.connection = psycopg.connect(
                    self.conninfo,
                    autocommit=True,
                    application_name="cleanmail-scheduler",
                    connect_timeout=10,
                    # A leader whose host vanishes loses its connection, and so the lock.
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                )
            row = self.connection.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY]).fetchone()
            return bool(row and row[0])
        except psycopg.Error as exc:
            log.warning("cannot try the leader lock: %s", str(exc).strip().splitlines()[0])
            self.release()
            return False

    def held(self) -> bool:
        """True while the connection that holds the lock answers."""
        try:
            return self.connection is not None and bool(self.connection.execute("SELECT 1"))
        except psycopg.Error:
            return False

    def release(self) -> None:
        """Close the connection, which releases the lock."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class FileLock:
    """An exclusive ``flock`` on a file in the data dir (SQLite: one scheduler per machine)."""

    def __init__(self, path: os.PathLike[str] | str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Try the lock once."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def held(self) -> bool:
        """A flock lasts as long as the open file."""
        return self.fd is not None

    def release(self) -> None:
        """Close the file, which releases the lock."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def leader_lock(config: Config) -> AdvisoryLock | FileLock:
    """The lock that decides who leads, by database backend."""
    if config.database_url.startswith("postgresql"):
        return AdvisoryLock(config.database_url)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(config.data_dir / LOCK_FILE)


def tick() -> float:
    """Seconds between lock attempts and leader checks (``CLEANMAIL_SCHEDULER_TICK``)."""
    return float(os.environ.get(TICK_VARIABLE, TICK))


class Scheduler(BackgroundScheduler):
    """APScheduler's background scheduler, minus a job lost at shutdown.

    Its loop wakes once more after ``shutdown()`` and would take a due job from the
    store only to fail handing it to the stopped executor. Checking the state under the
    job-store lock, which ``shutdown()`` takes before it stops the executors, closes that.
    """

    def _process_jobs(self) -> float | None:
        with self._jobstores_lock:
            if self.state == STATE_STOPPED:
                return None
            return super()._process_jobs()


def build(database: db.Database) -> Scheduler:
    """An APScheduler whose jobs live in the Cleanmail database."""
    return Scheduler(
        jobstores={"default": SQLAlchemyJobStore(engine=database.engine, tablename=JOBS_TABLE)},
        executors={"default": ThreadPoolExecutor(4)},
        job_defaults=JOB_DEFAULTS,
        timezone="UTC",
    )


def reports_every() -> timedelta:
    """How often the leader looks for due reports (``CLEANMAIL_REPORTS_EVERY`` seconds)."""
    seconds = os.environ.get(REPORTS_EVERY_VARIABLE)
    return REPORTS_EVERY if seconds is None else timedelta(seconds=float(seconds))


def ensure_jobs(scheduler: Scheduler) -> None:
    """Add our jobs, keeping a stored job's next run time unless its schedule changed."""
    for job_id, (func, every) in JOBS.items():
        if job_id == "reports":
            every = reports_every()
        trigger = IntervalTrigger(seconds=every.total_seconds(), timezone="UTC")
        stored = scheduler.get_job(job_id)
        if stored is not None and stored.func is func and str(stored.trigger) == str(trigger):
            continue
        scheduler.add_job(func, trigger, id=job_id, name=job_id, replace_existing=True)


def run(config: Config) -> int:
    """Run as leader or standby until SIGTERM; refuses to start on an unmigrated database."""
    global _runtime
    db.check_ready(config.database_url)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    lock = leader_lock(config)
    database = db.Database(config.database_url, pool_size=4)
    _runtime = Runtime(config, database)
    interval = tick()
    try:
        while not stop.is_set():
            if not lock.acquire():
                if isinstance(lock, FileLock):
                    raise SchedulerError(
                        f"another scheduler leads: {lock.path} is locked (SQLite allows one)"
                    )
                log.info("standing by: another scheduler leads")
                while not stop.wait(interval) and not lock.acquire():
                    pass
                if stop.is_set():
                    break
            lead(database, lock, stop, interval)
        return 0
    finally:
        lock.release()
        database.dispose()
        _runtime = None


def lead(database: db.Database, lock: LeaderLock, stop: threading.Event, interval: float) -> None:
    """Run the jobs while the lock is ours and no stop is asked; wait for a running job."""
    log.info("leading: running the scheduled jobs")
    scheduler = build(database)
    scheduler.start(paused=True)
    try:
        ensure_jobs(scheduler)
        scheduler.resume()
        while not stop.wait(interval):
            if not lock.held():
                log.error("lost the leader lock; stopping the jobs and standing by")
                lock.release()
                break
            # Jobs added by other processes are seen at the next tick, not the next own run.
            scheduler.wakeup()
    finally:
        scheduler.shutdown(wait=True)
        log.info("scheduler stopped")
