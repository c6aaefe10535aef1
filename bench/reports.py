"""Quarantine reports at scale: 100,000 mailboxes with new mail, sent to a local SMTP sink.

Builds a database with bulk inserts (1 to 50 new messages per mailbox), then runs
``cleanmail reports send --now`` as its own process against a counting SMTP sink in
another process, and prints reports per second and the sender's peak RSS beside the
sink's own acceptance rate for messages of the same size, measured in the same run.
Run it at two sizes (``--mailboxes 10000`` and ``100000``) to see memory stay flat.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import ingest  # noqa: E402  (bench/ingest.py: the counting sink and the SMTP client)

from cleanmail import db  # noqa: E402
from cleanmail.models import Domain, Mailbox  # noqa: E402

CLEANMAIL = ROOT / ".venv" / "bin" / "cleanmail"
DOMAIN = "example.no"
TARGET_RATE = 850.0
REASONS = ["SUBJECT_CAPS", "SUBJECT_SHOUTING", "LINK_SHORTENER", "FROM_ENDS_IN_NUMS", "GTUBE"]
WORDS = "billig klokke vunnet premie faktura tilbud gratis lån rask levering kampanje".split()
CHUNK = 20_000
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cleanmail-bench"
FORMAT = 1  # bump when the generated data changes, so that cached databases are rebuilt


COLUMNS = (
    "mailbox_id envelope_sender from_header from_address sender_domain subject "
    "message_id_header size score reasons status received_at expires_at release_attempts"
).split()


def build(url: str, mailboxes: int, most: int, seed: int) -> int:
    """Migrate, then fill the database in bulk (raw executemany or COPY); the message count."""
    db.upgrade(url)
    engine = db.make_engine(url)
    now = datetime.now(UTC)
    languages = ("nb", "da", "en")
    with engine.begin() as connection:
        domain_id = connection.execute(
            sqlalchemy.insert(Domain.__table__).values(name=DOMAIN).returning(Domain.id)
        ).scalar_one()
        connection.execute(
            sqlalchemy.insert(Mailbox.__table__),
            [
                {
                    "address": f"user{number}@{DOMAIN}",
                    "domain_id": domain_id,
                    "language": languages[number % 3],
                    "report_frequency": "daily",
                    "timezone": "Europe/Oslo",
                    "key_version": 1,
                    "role": "owner",
                    "disabled": False,
                    "created_at": now,
                    "report_hour": 7,
                }
                for number in range(mailboxes)
            ],
        )
        ids = connection.scalars(sqlalchemy.select(Mailbox.id).order_by(Mailbox.id)).all()
    engine.dispose()
    rows = message_rows(random.Random(seed), ids, most, now, sqlite=url.startswith("sqlite"))
    if url.startswith("sqlite"):
        return _fill_sqlite(url.removeprefix("sqlite:///"), rows)
    return _fill_postgresql(url, rows)


def message_rows(
    rng: random.Random, ids: Sequence[int], most: int, now: datetime, *, sqlite: bool
) -> Iterator[tuple[Any, ...]]:
    """Held messages with plausible spam fields, 1 to ``most`` per mailbox, as tuples."""
    for mailbox_id in ids:
        for _ in range(rng.randint(1, most)):
            domain = f"spam{rng.randint(1, 500)}.example"
            sender = f"{rng.choice(WORDS)}{rng.randint(1, 99999)}@{domain}"
            received = now - timedelta(seconds=rng.randint(60, 20 * 3600))
            expires = received + timedelta(days=30)
            subject = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize()
            code = rng.choice(REASONS)
            reasons = json.dumps([{"code": code, "text": code, "score": 9.0}])
            if sqlite:  # as SQLAlchemy stores them there: naive UTC
                received, expires = (
                    received.strftime("%Y-%m-%d %H:%M:%S.%f"),
                    expires.strftime("%Y-%m-%d %H:%M:%S.%f"),
                )
            yield (
                mailbox_id, sender, sender, sender, domain, subject,
                f"<{rng.getrandbits(64):x}@{domain}>", rng.randint(2_000, 60_000), 9.0,
                reasons, "new", received, expires, 0,
            )  # fmt: skip


def _fill_sqlite(path: str, rows: Iterator[tuple[Any, ...]]) -> int:
    """executemany straight into SQLite, without fsync, the indexes built afterwards."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA synchronous=OFF")
    indexes = connection.execute(
        "SELECT sql FROM sqlite_master"
        " WHERE type = 'index' AND tbl_name = 'messages' AND sql IS NOT NULL"
    ).fetchall()
    connection.execute("BEGIN")
    for (sql,) in indexes:
        connection.execute("DROP INDEX " + sql.split(" INDEX ", 1)[1].split()[0])
    insert = f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    count = 0
    while chunk := list(itertools.islice(rows, CHUNK)):
        connection.executemany(insert, chunk)
        count += len(chunk)
    for (sql,) in indexes:
        connection.execute(sql)
    connection.execute("COMMIT")
    connection.execute("ANALYZE")
    connection.close()
    return count


def _fill_postgresql(url: str, rows: Iterator[tuple[Any, ...]]) -> int:
    """COPY into PostgreSQL."""
    import psycopg

    conninfo = (
        sqlalchemy.engine.make_url(url)
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )
    count = 0
    with psycopg.connect(conninfo) as connection, connection.cursor() as cursor:
        with cursor.copy(f"COPY messages ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
                count += 1
        cursor.execute("ANALYZE")
    return count


@contextlib.contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """An empty database URL: SQLite in the temp dir, or a throw-away PostgreSQL cluster."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'cleanmail.db'}"
        return
    from tests.servers import PostgresServer

    with PostgresServer(tmp) as server:
        server.create_database("cleanmail")
        yield server.url("cleanmail")


def cached_sqlite(args: argparse.Namespace, tmp: Path) -> tuple[str, int, bool]:
    """A copy of the built SQLite database for these arguments (built and cached when missing).

    The run changes the database, so it gets a copy; the cached file stays as built.
    Returns the URL, the message count and whether the cache was used.
    """
    key = f"reports-{args.mailboxes}-{args.most}-{args.seed}-{db.head_revision()}-v{FORMAT}"
    final = CACHE / f"{key}.db"
    if args.rebuild:
        final.unlink(missing_ok=True)
    hit = final.exists()
    if not hit:
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{key}.partial-", dir=CACHE))
        try:
            count = build(
                f"sqlite:///{partial / 'cleanmail.db'}", args.mailboxes, args.most, args.seed
            )
            connection = sqlite3.connect(partial / "cleanmail.db")
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # one file to copy
            connection.close()
            (partial / "cleanmail.db").rename(final)
            final.with_suffix(".count").write_text(str(count))
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    shutil.copyfile(final, tmp / "cleanmail.db")
    return f"sqlite:///{tmp / 'cleanmail.db'}", int(final.with_suffix(".count").read_text()), hit


def sample_report(url: str, tmp: Path) -> bytes:
    """A report rendered from the bench data, for the reference's message size (read only)."""
    from cleanmail import config as config_module
    from cleanmail import reports

    config = config_module.load(environment(url, tmp, 25))
    database = db.Database(url)
    try:
        with database.write_sessions() as session:
            mailbox_id = session.scalar(sqlalchemy.select(Mailbox.id).order_by(Mailbox.id))
            report = reports.prepare(session, mailbox_id, None, datetime.now(UTC))
            assert report is not None
            raw = reports.render_report(session, report, config)
            session.rollback()
            return raw
    finally:
        database.dispose()


def environment(url: str, tmp: Path, sink_port: int) -> dict[str, str]:
    """The CLEANMAIL_* settings of the run."""
    return {
        **os.environ,
        "CLEANMAIL_DATA_DIR": str(tmp / "data"),
        "CLEANMAIL_DATABASE_URL": url,
        "CLEANMAIL_SECRET_KEY": "bench-secret",
        "CLEANMAIL_RELAY": f"127.0.0.1:{sink_port}",
        "CLEANMAIL_BASE_URL": "https://karantene.example.no",
    }


def reference(port: int, data: bytes, count: int, connections: int) -> float:
    """The sink's acceptance rate for ``count`` messages of the report's size."""
    stuffed = ingest.dot_stuff(ingest.to_crlf(data))
    messages = [ingest.Message(f"user{n}@{DOMAIN}", stuffed, False) for n in range(count)]
    result = ingest.run_batch(port, messages, connections, 1, [])
    return result.sent / result.seconds


class FamilyRss(threading.Thread):
    """The summed VmRSS of a process and its descendants (the sender's workers), at its peak."""

    def __init__(self, pid: int, counter: Any) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.counter = counter
        self.began = time.perf_counter()
        self.first_report: float | None = None  # seconds until the sink had the first report
        self.peak_kb = 0
        self.most_processes = 1
        self.stopped = threading.Event()

    def run(self) -> None:
        """Sample every 0.25 s until stopped."""
        before = self.counter.value
        while not self.stopped.wait(0.25):
            if self.first_report is None and self.counter.value > before:
                self.first_report = time.perf_counter() - self.began
            pids = ingest.family(self.pid)
            self.most_processes = max(self.most_processes, len(pids))
            self.peak_kb = max(self.peak_kb, ingest.proc_status(pids, "VmRSS"))


def send(
    env: dict[str, str], log: Path, counter: Any, profile: str | None = None
) -> tuple[float, Any, int, FamilyRss]:
    """``cleanmail reports send --now`` as a process: seconds, its rusage, exit code, its RSS.

    The rusage of ``wait4`` counts the CPU of the workers the sender started and waited
    for; its ``ru_maxrss`` is the largest single process, so the sum is sampled as well.
    """
    command = [str(CLEANMAIL), "reports", "send", "--now"]
    if profile:  # py-spy's own CPU is then in the figures: for where the time goes only
        spy = [str(ingest.PY_SPY), "record", "--gil", "--subprocesses", "-f", "raw", "-o", profile]
        command = [*spy, "--", *command]
    started = time.perf_counter()
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=output)
        rss = FamilyRss(process.pid, counter)
        rss.start()
        _pid, status, usage = os.wait4(process.pid, 0)
        rss.stopped.set()
        rss.join()
    return time.perf_counter() - started, usage, os.waitstatus_to_exitcode(status), rss


def machine_busy(seconds: float = 1.0) -> float:
    """How busy the CPUs are right now (other work on this shared machine)."""
    before = ingest.machine_ticks()
    time.sleep(seconds)
    total, idle = (
        after - start for after, start in zip(ingest.machine_ticks(), before, strict=True)
    )
    return 1 - idle / total if total else 0.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=100_000)
    parser.add_argument("--most", type=int, default=50, help="most new messages per mailbox")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--reference", type=int, default=5_000, help="messages for the sink")
    parser.add_argument("--connections", type=int, default=4, help="for the sink reference")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--processes", type=int, help="CLEANMAIL_REPORT_PROCESSES for the sender (default: its own)"
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="record the sender with py-spy (raw, collapsed stacks)"
    )
    parser.add_argument(
        "--rebuild", action="store_true", help=f"rebuild the SQLite database cached in {CACHE}"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Build, measure the sink, send the reports; print the figures."""
    args = parse_args(argv)
    counter = mp.get_context("spawn").Value("q", 0)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-reports-")))
        began = time.perf_counter()
        if args.database == "sqlite":
            url, messages, hit = cached_sqlite(args, tmp)
        else:
            url, hit = stack.enter_context(database(args.database, tmp)), False
            messages = build(url, args.mailboxes, args.most, args.seed)
        print(
            f"{'copied cached' if hit else 'built'} {args.mailboxes:,} mailboxes, "
            f"{messages:,} messages ({args.database}) in {time.perf_counter() - began:.0f} s",
            flush=True,
        )
        port = ingest.free_port()
        stack.enter_context(ingest.spawned(ingest.sink_main, port, counter))
        sample = sample_report(url, tmp)
        sink_rate = reference(port, sample, args.reference, args.connections)
        before = counter.value
        print(f"sink alone: {sink_rate:,.0f} messages/s of {len(sample):,} bytes", flush=True)
        env = environment(url, tmp, port)
        if args.processes:
            env["CLEANMAIL_REPORT_PROCESSES"] = str(args.processes)
        busy = machine_busy()
        seconds, usage, code, rss = send(env, tmp / "send.log", counter, args.profile)
        print((tmp / "send.log").read_text().strip()[-2000:])
        delivered = counter.value - before
        rate = delivered / seconds
        cpu_ms = (usage.ru_utime + usage.ru_stime) * 1000 / max(delivered, 1)
        print(
            f"\nReports: {args.mailboxes:,} mailboxes, {messages:,} messages, {args.database}, "
            f"{os.cpu_count()} CPUs, {busy:.0%} busy with other work before the run\n"
            f"  reports delivered       {delivered:>10,}   (exit code {code})\n"
            f"  wall time               {seconds:>10.1f} s   (prepare and send; the first report "
            f"reached the sink after {rss.first_report or 0:.1f} s)\n"
            f"  reports/s               {rate:>10,.0f}   target >= {TARGET_RATE:.0f}  "
            f"{ingest.verdict(rate >= TARGET_RATE)}\n"
            f"  sink alone, same size   {sink_rate:>10,.0f}   messages/s  "
            f"(reports reach {rate / sink_rate:.0%} of it)\n"
            f"  sender CPU per report   {cpu_ms:>10.2f} ms  (at most {1000 / cpu_ms:,.0f}/s "
            f"on one idle core; system {usage.ru_stime * 1000 / max(delivered, 1):.2f} ms of it)\n"
            f"  sender peak RSS         {rss.peak_kb / 1024:>10.1f} MiB  (summed over its "
            f"{rss.most_processes} processes; the largest alone {usage.ru_maxrss / 1024:.1f} MiB)"
        )
        return 0 if code == 0 and delivered == args.mailboxes else 1


if __name__ == "__main__":
    sys.exit(main())
