"""Operator search at a million messages, and bulk release to an SMTP sink.

Builds a quarantine of ``--messages`` rows (default 1,000,000) with bulk inserts
(executemany on SQLite, COPY on PostgreSQL), then times, in the same run:

- a lookup by primary key (the reference: what the database does at its fastest);
- the foundation's operator search (``search.page``) by sender domain;
- the same search by a word of the subject;
- ``search.count`` for those searches (capped as the console caps it);
- the statistics summary of 30 days (``stats.summary``: counters, top reasons and
  sending domains, release rate), as the console's statistics page reads it;

and reports the median and p95 of each. Then it releases ``--release`` messages
(default 10,000) as one bulk job (``bulk.run``, as the console and ``cleanmail
release`` do) to a counting SMTP sink in its own process, and reports messages/s.

    .venv/bin/python bench/search.py [--messages 1000000] [--release 10000]
        [--database sqlite|postgresql|both] [--queries 60]

``--queries 0`` skips the searches (``--messages 0 --queries 0``: only the release).

The built SQLite database is cached in ``~/.cache/cleanmail-bench/`` under a key of the
size, the schema revision and the day (as ``bench/web.py`` does) and copied for each run, as the
release changes it; ``--rebuild`` builds it again.

Targets: search p95 under 100 ms on PostgreSQL; release at no less than 300/s.
The machine is shared and noisy: read the figures beside the primary-key reference.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from bench.ingest import sink_main  # noqa: E402
from cleanmail import audit, bulk, db, search, staff, stats  # noqa: E402
from cleanmail.config import Endpoint  # noqa: E402
from cleanmail.models import Message, RawMessage  # noqa: E402
from cleanmail.relay import Relay  # noqa: E402
from cleanmail.store import Store, digest  # noqa: E402
from tests.servers import PostgresServer, free_port  # noqa: E402

DOMAINS = 100
MAILBOXES = 10_000
SENDER_DOMAINS = 5_000
WORDS = 5_000
BATCH = 20_000
# The start of today, so that a database cached today holds the rows a fresh one would.
NOW = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cleanmail-bench"
FORMAT = 1  # bump when the generated data changes, so that cached databases are rebuilt
COLUMNS = (
    "mailbox_id",
    "raw_sha256",
    "envelope_sender",
    "from_header",
    "from_address",
    "sender_domain",
    "subject",
    "message_id_header",
    "size",
    "score",
    "reasons",
    "status",
    "received_at",
    "expires_at",
    "release_attempts",
)
REASONS = [
    json.dumps([{"code": code, "text": "bench", "score": 6.0}])
    for code in ("SUBJECT_CAPS", "BAYES_SPAM", "GTUBE", "BLOCKED_ATTACHMENT", "LIST_BLOCK_MAILBOX")
]
RELEASE_DOMAIN = "bulk-release.example"
RAW = (
    b"From: Invoices <billing@bulk-release.example>\r\nTo: you@example.invalid\r\n"
    b"Subject: Invoice for November\r\nMessage-ID: <bench@bulk-release.example>\r\n\r\n"
    + b"Please find the invoice attached.\r\n"
    * 40
)


def word(n: int) -> str:
    """The n-th word of the synthetic subject vocabulary."""
    return f"w{n:04d}x"


def rows(count: int, seed: int) -> Iterator[tuple]:
    """Generated message rows, spread over 30 days."""
    rnd = random.Random(seed)
    for n in range(count):
        domain = f"sender{rnd.randrange(SENDER_DOMAINS)}.example"
        sender = f"user{rnd.randrange(50)}@{domain}"
        received = NOW - timedelta(seconds=rnd.randrange(30 * 86400))
        subject = " ".join(word(rnd.randrange(WORDS)) for _ in range(4)).capitalize()
        yield (
            1 + rnd.randrange(MAILBOXES),
            None,
            sender,
            sender,
            sender,
            domain,
            subject,
            f"<{n}@{domain}>",
            2000 + rnd.randrange(50_000),
            round(rnd.uniform(5, 30), 1),
            REASONS[n % len(REASONS)],
            "new",
            received,
            received + timedelta(days=30),
            0,
        )


def build(database: db.Database, count: int) -> float:
    """Domains, mailboxes and ``count`` messages; the seconds it took."""
    started = time.monotonic()
    engine = database.engine
    sqlite = engine.dialect.name == "sqlite"
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        mark = "?" if sqlite else "%s"
        if sqlite:  # our connections run in autocommit: one transaction, not one per row
            cursor.execute("BEGIN")
        cursor.executemany(
            f"INSERT INTO domains (id, name, allow_hourly_reports, created_at) VALUES ({mark}, {mark}, {mark}, {mark})",  # noqa: E501
            [(d, f"d{d}.example", False, _ts(NOW, sqlite)) for d in range(1, DOMAINS + 1)],
        )
        cursor.executemany(
            "INSERT INTO mailboxes (id, address, domain_id, language, report_frequency, timezone,"
            " key_version, role, disabled, created_at, report_hour)"
            f" VALUES ({', '.join([mark] * 11)})",
            [
                (
                    m,
                    f"box{m}@d{1 + m % DOMAINS}.example",
                    1 + m % DOMAINS,
                    "nb",
                    "daily",
                    "Europe/Oslo",
                    1,
                    "owner",
                    False,
                    _ts(NOW, sqlite),
                    7,
                )
                for m in range(1, MAILBOXES + 1)
            ],
        )
        raw.commit()
        done = 0
        while done < count:
            size = min(BATCH, count - done)
            batch = [_row(r, sqlite) for r in rows(size, seed=done)]
            if sqlite:
                cursor.execute("BEGIN")
                cursor.executemany(
                    f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",  # noqa: E501
                    batch,
                )
            else:
                with cursor.copy(f"COPY messages ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                    for row in batch:
                        copy.write_row(row)
            raw.commit()
            done += size
            print(f"\r  {done:,} messages", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        cursor.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
    return time.monotonic() - started


def _ts(value: datetime, sqlite: bool) -> object:
    return value.replace(tzinfo=None).isoformat(sep=" ") if sqlite else value


def _row(row: tuple, sqlite: bool) -> tuple:
    return tuple(_ts(v, sqlite) if isinstance(v, datetime) else v for v in row)


def timed(samples: int, action: Callable[[int], object]) -> list[float]:
    """Milliseconds per call of ``action(i)`` for i in range(samples), after one warm-up."""
    action(samples)
    found = []
    for i in range(samples):
        started = time.perf_counter()
        action(i)
        found.append((time.perf_counter() - started) * 1000)
    return found


def p95(values: list[float]) -> float:
    """The 95th percentile."""
    return statistics.quantiles(values, n=100, method="inclusive")[94]


def measure(database: db.Database, queries: int, count: int) -> dict[str, list[float]]:
    """Latencies of the primary-key lookup and of the operator searches."""
    rnd = random.Random(7)
    ids = [1 + rnd.randrange(count) for _ in range(queries + 1)]
    senders = [f"sender{rnd.randrange(SENDER_DOMAINS)}.example" for _ in range(queries + 1)]
    words = [word(rnd.randrange(WORDS)) for _ in range(queries + 1)]

    def by_id(i: int) -> object:
        with database.sessions() as session:
            return session.get(Message, ids[i])

    def page(query: search.Query) -> object:
        with database.sessions() as session:
            return search.page(session, staff.OPERATOR, query, limit=50)

    def counted(query: search.Query) -> object:
        with database.sessions() as session:
            return search.count(session, staff.OPERATOR, query, cap=10_000)

    def summary(_i: int) -> object:
        with database.sessions() as session:
            return stats.summary(session, 30)

    return {
        "primary key lookup": timed(queries, by_id),
        "search by sender domain": timed(queries, lambda i: page(search.Query(sender=senders[i]))),
        "search by subject word": timed(queries, lambda i: page(search.Query(subject=words[i]))),
        "count by sender domain": timed(
            queries, lambda i: counted(search.Query(sender=senders[i]))
        ),
        "count by subject word": timed(queries, lambda i: counted(search.Query(subject=words[i]))),
        "statistics, 30 days": timed(min(queries, 5), summary),
    }


def release(
    database: db.Database, store: Store, total: int
) -> tuple[float, float, int, float, float]:
    """Release ``total`` held messages as one bulk job to a sink.

    Returns the bare relay's rate to the same sink (the reference: the same ``Relay``
    sending the same message ``total`` times, one connection, no database), the bulk
    job's messages/s, how many messages the sink received from the job, and the CPU
    ms per message of this process (all its threads) for the relay and for the job.
    """
    sha = digest(RAW)
    store.write(sha, RAW)
    with database.session_scope(write=True) as session:
        session.add(RawMessage(sha256=sha, size=len(RAW)))
        session.flush()
        session.execute(
            Message.__table__.insert(),
            [
                {
                    "mailbox_id": m,
                    "raw_sha256": sha,
                    "envelope_sender": f"billing@{RELEASE_DOMAIN}",
                    "from_header": "",
                    "from_address": f"billing@{RELEASE_DOMAIN}",
                    "sender_domain": RELEASE_DOMAIN,
                    "subject": "Invoice for November",
                    "message_id_header": "",
                    "size": len(RAW),
                    "score": 6.0,
                    "reasons": [],
                    "status": "new",
                    "received_at": NOW,
                    "expires_at": NOW + timedelta(days=30),
                    "release_attempts": 0,
                }
                for m in range(1, total + 1)
            ],
        )
    port = free_port()
    context = mp.get_context("spawn")
    counter, ready = context.Value("l", 0), context.Event()
    sink = context.Process(target=sink_main, args=(port, counter, ready), daemon=True)
    sink.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the SMTP sink did not start")
        relay = Relay(Endpoint("127.0.0.1", port), timeout=30, hostname="bench.invalid")
        started, cpu = time.monotonic(), time.process_time()
        for m in range(total):
            relay.send(f"billing@{RELEASE_DOMAIN}", [f"box{m}@d1.example"], RAW)
        reference = total / (time.monotonic() - started)
        relay_cpu = (time.process_time() - cpu) * 1000 / total
        relay.close()
        before = counter.value
        query = search.Query(sender=RELEASE_DOMAIN)
        with database.session_scope(write=True) as session:
            job = bulk.create(
                session, staff.OPERATOR, audit.Actor("system", "bench"), "release", query
            )
        relay = Relay(Endpoint("127.0.0.1", port), timeout=30, hostname="bench.invalid")
        started, cpu = time.monotonic(), time.process_time()
        bulk.run(database, store, relay, job.id)
        seconds = time.monotonic() - started
        job_cpu = (time.process_time() - cpu) * 1000 / total
        with database.sessions() as session:
            released = session.scalar(
                select(func.count())
                .select_from(Message)
                .where(Message.sender_domain == RELEASE_DOMAIN, Message.status == "released")
            )
        return reference, (released or 0) / seconds, counter.value - before, relay_cpu, job_cpu
    finally:
        sink.terminate()
        sink.join(10)


def cached_sqlite(workdir: Path, messages: int, rebuild: bool) -> tuple[str, str]:
    """A copy of the cached SQLite database in workdir (built when missing); (url, how)."""
    key = f"search-{messages}-{db.head_revision()}-v{FORMAT}-{NOW:%Y%m%d}"
    final = CACHE / key / "bench.db"
    if rebuild and final.parent.exists():
        shutil.rmtree(final.parent)
    how = "cached, --rebuild to rebuild"
    if not final.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{key}.partial-", dir=CACHE))
        try:
            url = f"sqlite:///{partial / 'bench.db'}"
            db.upgrade(url)
            database = db.Database(url)
            try:
                print(f"\n== sqlite: building {messages:,} messages", file=sys.stderr)
                how = f"built in {build(database, messages):.0f} s"
            finally:
                database.dispose()
            partial.rename(final.parent)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    shutil.copyfile(final, workdir / "bench.db")
    return f"sqlite:///{workdir / 'bench.db'}", how


def run(name: str, url: str, workdir: Path, args: argparse.Namespace, how: str = "") -> None:
    """Build (unless ``how`` says it was built), measure and print one backend's figures."""
    if not how:
        print(f"\n== {name}: building {args.messages:,} messages", file=sys.stderr)
        db.upgrade(url)
    database = db.Database(url)
    try:
        if not how:
            how = f"built in {build(database, args.messages):.0f} s"
        print(f"{name}: {args.messages:,} messages ({how})")
        results = measure(database, args.queries, args.messages) if args.queries else {}
        if results:
            reference = statistics.median(results["primary key lookup"])
            print(f"{'':26}{'median ms':>10}{'p95 ms':>10}{'p95 / pk median':>18}")
        for label, values in results.items():
            print(
                f"{label:26}{statistics.median(values):10.2f}{p95(values):10.2f}"
                f"{p95(values) / reference:18.1f}"
            )
        if args.release:
            store = Store(workdir / f"store-{name}")
            reference, rate, delivered, relay_cpu, job_cpu = release(database, store, args.release)
            print(
                f"{name}: bulk release of {args.release:,}: {rate:.0f} messages/s"
                f" ({delivered:,} reached the sink; target >= 300/s); the bare relay to the"
                f" same sink: {reference:.0f} messages/s ({rate / reference:.0%});"
                f" CPU ms per message: job {job_cpu:.2f}, bare relay {relay_cpu:.2f}"
            )
    finally:
        database.dispose()


def main() -> None:
    """Parse the options and run the chosen backends."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--release", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument(
        "--rebuild", action="store_true", help=f"rebuild the SQLite database cached in {CACHE}"
    )
    args = parser.parse_args()
    args.release = min(args.release, MAILBOXES)  # one held copy per mailbox shares one file
    with tempfile.TemporaryDirectory(prefix="cleanmail-bench-search-") as tmp:
        workdir = Path(tmp)
        if args.database in ("sqlite", "both"):
            url, how = cached_sqlite(workdir, args.messages, args.rebuild)
            run("sqlite", url, workdir, args, how)
        if args.database in ("postgresql", "both"):
            (workdir / "pg").mkdir()
            with PostgresServer(workdir / "pg") as pg:
                pg.create_database("bench")
                run("postgresql", pg.url("bench"), workdir, args)


if __name__ == "__main__":
    main()
