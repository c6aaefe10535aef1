"""Web benchmark: the quarantine list and message pages beside /healthz, at full size.

A database with 1,000,000 quarantined messages across 100,000 mailboxes (one of them
holding 10,000) is served by `cleanmail web` (gunicorn). One client process with
`--connections` keep-alive connections, logged in as the big mailbox, requests each page
for `--seconds`. The machine is noisy, so the figure that matters is the list page's
requests per second beside the trivial endpoint's, measured in the same run.

    .venv/bin/python bench/web.py [--database sqlite|postgresql] [--seconds 15]
        [--connections 8] [--workers 2] [--messages N] [--mailboxes N] [--big N]
        [--rebuild] [--explain]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import hashlib
import html
import http.client
import io
import json
import os
import pstats
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import ingest  # noqa: E402
from tests.servers import PostgresServer, free_port  # noqa: E402

CLEANMAIL = ROOT / ".venv" / "bin" / "cleanmail"
CORPUS = Path(os.environ.get("CLEANMAIL_CORPUS", "") or ROOT.parent / "shared" / "corpus")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cleanmail-bench"
FORMAT = 1  # bump when the generated data changes, so that cached databases are rebuilt
BIG_ADDRESS = "big@example0.no"
WITH_CONTENT = 20  # the big mailbox's newest messages get a stored raw message
LIST_DEPTHS = (1, 2, 5, 20, 100)  # list pages requested, reached through the "Older" links
BATCH = 50_000
WARMUP_SECONDS = 2.0
TARGET_P95_MS = 25.0
TARGET_RATIO = 0.50
COPY_MESSAGES = (
    "id",
    "mailbox_id",
    "raw_sha256",
    "envelope_sender",
    "from_header",
    "from_address",
    "sender_domain",
    "subject",
    "message_id_header",
    "date_header",
    "size",
    "score",
    "reasons",
    "status",
    "received_at",
    "expires_at",
    "released_at",
    "release_error",
    "release_attempts",
    "client_address",
    "client_helo",
)
COPY_MAILBOXES = (
    "id",
    "address",
    "domain_id",
    "language",
    "report_frequency",
    "timezone",
    "key_version",
    "role",
    "disabled",
    "created_at",
)
COPY_DOMAINS = ("id", "name", "created_at")


# --- generated data ----------------------------------------------------------------------

NAMES = (
    "PayPal Security",
    "DHL Express",
    "Apple ID",
    "Microsoft 365",
    "Netflix",
    "Posten",
    "Kundeservice",
    "Faktura",
    "Dr. James Okafor",
    "Lotto Winner",
    "Anna Berg",
    "Ola Nordmann",
    "Crypto Alerts",
    "Pharmacy Online",
    "Support",
    "Kari Hansen",
    "Amazon",
    "Vipps",
    "",
)
WORDS = (
    "secure-login",
    "promo",
    "deals",
    "mailer",
    "news",
    "offers",
    "crypto",
    "pharma",
    "casino",
    "bank",
    "parcel",
    "invoice",
    "account",
    "verify",
    "prize",
)
TLDS = ("com", "net", "ru", "cn", "biz", "info", "no", "xyz", "top")
SUBJECTS = (
    "Your account has been suspended #{n}",
    "Faktura {n} forfaller i dag",
    "RE: Invoice {n}",
    "You have won ${n},000!!!",
    "Viktig: oppdater betalingskortet ditt",
    "Limited offer: {p}% off today only",
    "Pakken din kunne ikke leveres ({n})",
    "Urgent business proposal",
    "Cheap meds, fast delivery",
    "Vi savner deg! {p}% rabatt",
    "Your password expires today",
    "Bekreft kontoen din innen 24 timer",
    "[SPAM] Re: møte på fredag",
    "Invitation: webinar {n}",
    "Din BankID er sperret",
)
REASONS = (
    ("GTUBE", "GTUBE test pattern", 1000.0),
    ("SUBJECT_CAPS", "Subject in capitals", 1.5),
    ("LINK_TO_IP", "Link to http://203.0.113.7/login", 2.5),
    ("LINK_SHORTENER", "Link via bit.ly", 1.5),
    ("HTML_ONLY", "HTML only", 1.0),
    ("FROM_DISPLAY_SPOOF", "Display name shows another address", 3.0),
    ("MISSING_DATE", "No Date header", 1.5),
    ("TO_UNDISCLOSED", "Undisclosed recipients", 1.5),
    ("LIST_BLOCK_MAILBOX", "Blocked by *@promo.example", 100.0),
    ("BLOCKED_ATTACHMENT", "Blocked attachment invoice.exe", 100.0),
    ("SUBJECT_SHOUTING", "Subject with !!!", 2.0),
    ("DATE_IN_PAST", "Dated 9 days ago", 1.0),
)


@dataclass(frozen=True)
class Shape:
    """How many rows to make, and when the newest message arrived."""

    messages: int
    mailboxes: int
    big: int
    now: datetime

    @property
    def domains(self) -> int:
        """One domain per hundred mailboxes."""
        return max(1, self.mailboxes // 100)

    @property
    def big_every(self) -> int:
        """Every n-th message belongs to the big mailbox (id 1), spread over the 30 days."""
        return max(1, self.messages // self.big)

    def big_ids(self) -> list[int]:
        """The big mailbox's message ids, oldest first."""
        return [i + 1 for i in range(0, self.messages, self.big_every)][: self.big]


def iso(when: datetime) -> str:
    """A naive UTC time as SQLAlchemy stores it in SQLite (PostgreSQL reads it in UTC)."""
    return when.isoformat(" ", "microseconds")


def domain_rows(shape: Shape) -> list[tuple[Any, ...]]:
    """The served domains."""
    created = iso(shape.now - timedelta(days=400))
    return [(i + 1, f"example{i}.no", created) for i in range(shape.domains)]


def mailbox_rows(shape: Shape) -> list[tuple[Any, ...]]:
    """The mailboxes; id 1 is the big one."""
    created = iso(shape.now - timedelta(days=300))
    rows = []
    for number in range(1, shape.mailboxes + 1):
        domain = (number - 1) % shape.domains
        address = BIG_ADDRESS if number == 1 else f"user{number}@example{domain}.no"
        rows.append(
            (number, address, domain + 1, "nb", "daily", "Europe/Oslo", 1, "owner", False, created)
        )
    return rows


def sender_pool(rng: random.Random, size: int = 20_000) -> list[tuple[str, ...]]:
    """(envelope sender, From header, From address, domain, HELO) of many spam senders."""
    pool = []
    for number in range(size):
        domain = f"{rng.choice(WORDS)}{number % 997}.{rng.choice(TLDS)}"
        local = rng.choice(("info", "noreply", "service", "billing", f"kari{number}", "news"))
        address = f"{local}@{domain}"
        name = rng.choice(NAMES)
        header = f'"{name}" <{address}>' if name else address
        envelope = f"bounce-{number}@{domain}" if number % 3 else address
        pool.append((envelope, header, address, domain, f"mail.{domain}"))
    return pool


def reason_pool(rng: random.Random, size: int = 64) -> list[tuple[str, float]]:
    """(reasons JSON, score) combinations as the filter stores them."""
    pool = []
    for _number in range(size):
        chosen = rng.sample(REASONS, rng.randint(1, 3))
        reasons = [{"code": code, "text": text, "score": score} for code, text, score in chosen]
        pool.append((json.dumps(reasons), round(sum(r["score"] for r in reasons), 1)))
    return pool


def message_batches(shape: Shape, seed: int = 1) -> Iterator[list[tuple[Any, ...]]]:
    """Every message row in id order (= arrival order), in batches of BATCH."""
    rng = random.Random(seed)
    senders, reasons = sender_pool(rng), reason_pool(rng)
    subjects = [
        s.format(n=rng.randint(1000, 99999), p=rng.choice((30, 50, 70, 90)))
        for s in SUBJECTS
        for _ in range(40)
    ]
    start = shape.now - timedelta(days=30)
    step = timedelta(days=30) / shape.messages
    retention, hour = timedelta(days=30), timedelta(hours=1)
    for first in range(0, shape.messages, BATCH):
        rows = []
        for index in range(first, min(first + BATCH, shape.messages)):
            received = start + step * index
            envelope, header, address, domain, helo = senders[rng.randrange(len(senders))]
            reason, score = reasons[rng.randrange(len(reasons))]
            big = index % shape.big_every == 0 and index // shape.big_every < shape.big
            mailbox = 1 if big else rng.randint(2, max(2, shape.mailboxes))
            draw = rng.random()
            status = "new" if draw < 0.94 else "released" if draw < 0.97 else "deleted"
            received_text = iso(received)
            rows.append(
                (
                    index + 1,
                    mailbox,
                    None,
                    envelope,
                    header,
                    address,
                    domain,
                    subjects[rng.randrange(len(subjects))],
                    f"<{index:x}.{mailbox}@{domain}>",
                    iso(received - timedelta(seconds=rng.randint(5, 900))),
                    min(int(rng.lognormvariate(9.0, 1.2)) + 600, 20_000_000),
                    score,
                    reason,
                    status,
                    received_text,
                    iso(received + retention),
                    iso(received + hour) if status == "released" else None,
                    None,
                    int(status == "released"),
                    f"203.0.113.{index % 254 + 1}",
                    helo,
                )
            )
        yield rows


def content_messages(count: int) -> list[bytes]:
    """Distinct raw messages from the corpus (spam first), or made-up ones without it."""
    files = sorted(
        p
        for folder in ("spam", "ham")
        if (CORPUS / folder).is_dir()
        for p in (CORPUS / folder).iterdir()
        if p.is_file()
    )
    raws: dict[str, bytes] = {}
    for path in files:
        raw = ingest.to_crlf(path.read_bytes())
        if len(raw) < 200_000:
            raws.setdefault(hashlib.sha256(raw).hexdigest(), raw)
        if len(raws) == count:
            break
    while len(raws) < count:
        raw = (
            f'From: "Posten" <noreply@parcel{len(raws)}.xyz>\r\nTo: {BIG_ADDRESS}\r\n'
            f"Subject: Pakken din kunne ikke leveres ({len(raws)})\r\n"
            "Date: Mon, 01 Jan 2024 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/html; charset=utf-8\r\n\r\n<p>Betal <b>29 kr</b> her: "
            '<a href="http://203.0.113.7/">posten.no</a></p>\r\n'
        ).encode()
        raws.setdefault(hashlib.sha256(raw).hexdigest(), raw)
    return list(raws.values())


def add_content(url: str, store_dir: Path, message_ids: Sequence[int]) -> None:
    """Give some messages a real stored raw message, so that their page shows a preview."""
    import sqlalchemy

    from cleanmail import mime
    from cleanmail.models import Message, RawMessage
    from cleanmail.store import Store, digest

    store = Store(store_dir)
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as connection:
            for message_id, raw in zip(
                message_ids, content_messages(len(message_ids)), strict=True
            ):
                parsed, sha = mime.parse(raw), digest(raw)
                store.write(sha, raw)
                connection.execute(
                    RawMessage.__table__.insert(),
                    {
                        "sha256": sha,
                        "size": len(raw),
                        "created_at": parsed.date or datetime.now(UTC),
                    },
                )
                connection.execute(
                    Message.__table__.update().where(Message.__table__.c.id == message_id),
                    {
                        "raw_sha256": sha,
                        "size": len(raw),
                        "status": "new",
                        "released_at": None,
                        "release_attempts": 0,
                        "from_header": parsed.from_header,
                        "from_address": parsed.from_address,
                        "envelope_sender": parsed.from_address,
                        "subject": parsed.subject,
                        "sender_domain": mime.address_domain(parsed.from_address),
                        "message_id_header": parsed.message_id,
                        "date_header": parsed.date,
                    },
                )
    finally:
        engine.dispose()


# --- loading -----------------------------------------------------------------------------


def load_sqlite(path: Path, shape: Shape) -> None:
    """Bulk-load a migrated SQLite file: indexes dropped and rebuilt, no fsync."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        for pragma in (
            "journal_mode=WAL",
            "synchronous=OFF",
            "cache_size=-1048576",
            "temp_store=MEMORY",
            "foreign_keys=OFF",
        ):
            connection.execute(f"PRAGMA {pragma}")
        indexes = connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages' "
            "AND sql IS NOT NULL"
        ).fetchall()
        connection.execute("BEGIN")
        for name, _statement in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        insert_sqlite(connection, "domains", COPY_DOMAINS, domain_rows(shape))
        insert_sqlite(connection, "mailboxes", COPY_MAILBOXES, mailbox_rows(shape))
        for rows in message_batches(shape):
            insert_sqlite(connection, "messages", COPY_MESSAGES, rows)
        for _name, statement in indexes:
            connection.execute(statement)
        connection.execute("COMMIT")
        connection.execute("ANALYZE")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def insert_sqlite(
    connection: sqlite3.Connection, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    """One executemany of many rows."""
    marks = ", ".join("?" * len(columns))
    connection.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)


def load_postgresql(url: str, shape: Shape) -> None:
    """Bulk-load a migrated PostgreSQL database: COPY, indexes rebuilt, no trigger checks."""
    import psycopg

    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as connection:
        for setting in (
            "session_replication_role = replica",  # no FK triggers on the load
            "maintenance_work_mem = '1GB'",
            "synchronous_commit = off",
            "TimeZone = 'UTC'",
        ):
            connection.execute(f"SET {setting}")
        indexes = connection.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'messages' "
            "AND indexname NOT IN (SELECT conname FROM pg_constraint)"
        ).fetchall()
        for name, _definition in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        copy_postgresql(connection, "domains", COPY_DOMAINS, [domain_rows(shape)])
        copy_postgresql(connection, "mailboxes", COPY_MAILBOXES, [mailbox_rows(shape)])
        copy_postgresql(connection, "messages", COPY_MESSAGES, message_batches(shape))
        for _name, definition in indexes:
            connection.execute(definition)
        for table in ("domains", "mailboxes", "messages"):
            connection.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))"
            )
        connection.commit()
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute("ANALYZE")
        vacuum_postgresql(connection)


def vacuum_postgresql(connection: Any, tries: int = 20) -> None:
    """VACUUM messages until its pages are all-visible, as autovacuum keeps a settled table.

    Without the visibility map PostgreSQL cannot count a mailbox's messages from the
    index alone. A VACUUM right after the load may see the loading transaction as too
    recent (autovacuum's own snapshots hold the horizon back), so it is repeated.
    """
    query = "SELECT relpages, relallvisible FROM pg_class WHERE relname = 'messages'"
    for _attempt in range(tries):
        connection.execute("VACUUM (ANALYZE) messages")
        pages, visible = connection.execute(query).fetchone()
        if visible >= 0.99 * pages:
            return
        time.sleep(1)
    print(f"warning: only {visible} of {pages} pages of messages are all-visible")


def copy_postgresql(
    connection: Any,
    table: str,
    columns: Sequence[str],
    batches: Iterator[list[tuple[Any, ...]]] | list[list[tuple[Any, ...]]],
) -> None:
    """COPY rows into a table."""
    with (
        connection.cursor() as cursor,
        cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
    ):
        for rows in batches:
            for row in rows:
                copy.write_row(row)


# --- set-up ------------------------------------------------------------------------------


@dataclass
class Installation:
    """A loaded database and its data dir, with the environment that reaches them."""

    env: dict[str, str]
    database: str
    url: str
    big_ids: list[int] = field(default_factory=list)
    load_seconds: float | None = None  # None when a cached database was used

    @property
    def content_ids(self) -> list[int]:
        """The messages whose page shows a preview: the big mailbox's newest."""
        return self.big_ids[-WITH_CONTENT:]

    def cli(self, *args: str) -> str:
        """Run a `cleanmail` command; return its output or raise with its stderr."""
        result = subprocess.run(
            [str(CLEANMAIL), *args],
            env=self.env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode:
            raise RuntimeError(f"cleanmail {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout


def base_env(data_dir: Path) -> dict[str, str]:
    """Our environment without any CLEANMAIL_ setting, then the data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANMAIL_")}
    env["CLEANMAIL_DATA_DIR"] = str(data_dir)
    return env


def build(setup: Installation, shape: Shape, data_dir: Path) -> None:
    """Migrate, bulk-load, analyze and add the stored messages; time it all."""
    started = time.monotonic()
    setup.cli("db", "upgrade")
    if setup.database == "sqlite":
        load_sqlite(data_dir / "cleanmail.db", shape)
    else:
        load_postgresql(setup.url, shape)
    add_content(setup.url, data_dir / "store", setup.content_ids)
    setup.load_seconds = time.monotonic() - started


@contextlib.contextmanager
def installation(tmp: Path, args: argparse.Namespace) -> Iterator[Installation]:
    """A loaded PostgreSQL cluster in tmp, or a SQLite data dir (cached between runs)."""
    shape = Shape(
        args.messages,
        args.mailboxes,
        args.big,
        datetime.now(UTC).replace(minute=0, second=0, microsecond=0),
    )
    if args.database == "postgresql":
        with PostgresServer(tmp) as server:
            server.create_database("cleanmail")
            data_dir = tmp / "data"
            env = dict(
                base_env(data_dir),
                CLEANMAIL_DATABASE_URL=server.url("cleanmail"),
                CLEANMAIL_SECRET_KEY="bench-secret-key-bench-secret-key",
            )
            setup = Installation(env, "postgresql", server.url("cleanmail"), shape.big_ids())
            build(setup, shape, data_dir)
            yield setup
        return
    yield sqlite_installation(shape, args.rebuild)


def sqlite_installation(shape: Shape, rebuild: bool) -> Installation:
    """The cached SQLite data dir for this shape and schema, built when missing."""
    from cleanmail import db

    key = f"web-{shape.messages}-{shape.mailboxes}-{shape.big}-{db.head_revision()}-v{FORMAT}"
    final = CACHE / key
    if rebuild and final.exists():
        shutil.rmtree(final)
    data_dir = final / "data"
    url = f"sqlite:///{data_dir / 'cleanmail.db'}"
    if final.exists():
        return Installation(base_env(data_dir), "sqlite", url, shape.big_ids())
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{key}.partial-", dir=CACHE))
    try:
        setup = Installation(
            base_env(partial / "data"),
            "sqlite",
            f"sqlite:///{partial / 'data' / 'cleanmail.db'}",
            shape.big_ids(),
        )
        build(setup, shape, partial / "data")
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return Installation(base_env(data_dir), "sqlite", url, shape.big_ids(), setup.load_seconds)


@contextlib.contextmanager
def web_process(
    setup: Installation, workers: int, log_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`cleanmail web` on a free port; stopped with SIGTERM."""
    port = free_port()
    env = dict(
        setup.env, CLEANMAIL_WEB_LISTEN=f"127.0.0.1:{port}", CLEANMAIL_WEB_WORKERS=str(workers)
    )
    proc = ingest.start_cleanmail("web", env, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"web exited with {proc.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(OSError):
                status, _body, _headers = fetch(
                    http.client.HTTPConnection("127.0.0.1", port), "/healthz"
                )
                if status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"web did not answer on {port}:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield proc, port
    finally:
        ingest.stop_process(proc)


# --- client ------------------------------------------------------------------------------


def fetch(
    connection: http.client.HTTPConnection, path: str, cookie: str = ""
) -> tuple[int, bytes, http.client.HTTPMessage]:
    """One GET on a kept-alive connection; the whole body is read."""
    connection.request("GET", path, headers={"Cookie": cookie} if cookie else {})
    response = connection.getresponse()
    return response.status, response.read(), response.headers


def log_in(port: int, setup: Installation) -> str:
    """The session cookie of the big mailbox, from a login link."""
    path = urlsplit(setup.cli("login-link", BIG_ADDRESS).strip()).path
    status, _body, headers = fetch(http.client.HTTPConnection("127.0.0.1", port), path)
    cookie = next(
        (
            value.split(";", 1)[0]
            for value in headers.get_all("Set-Cookie") or []
            if value.startswith("cleanmail_session=")
        ),
        "",
    )
    if status not in (302, 303) or not cookie:
        raise RuntimeError(f"login link answered {status} without a session cookie")
    return cookie


def list_pages(port: int, cookie: str) -> dict[str, str]:
    """Paths of the list at LIST_DEPTHS, found by following the "Older" links."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    pages, path = {}, "/"
    for depth in range(1, max(LIST_DEPTHS) + 1):
        status, body, _headers = fetch(connection, path, cookie)
        if status != 200:
            raise RuntimeError(f"list page {depth} ({path}) answered {status}")
        if depth in LIST_DEPTHS:
            pages[f"page {depth}"] = path
        older = re.search(rb'rel="next" href="([^"]+)"', body)
        if older is None:
            break
        path = html.unescape(older.group(1).decode())
    connection.close()
    return pages


@dataclass
class PhaseResult:
    """Every request of one phase: latency, status and which path."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    cpu_seconds: float = 0.0
    machine_busy: float = 0.0

    @property
    def rate(self) -> float:
        """Requests per second (every request, whatever its status)."""
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, share: float, label: str | None = None) -> float:
        """A latency percentile in milliseconds, of all requests or those of one path."""
        chosen = [
            x
            for x, name in zip(self.latencies, self.labels, strict=True)
            if label is None or name == label
        ]
        if len(chosen) < 2:
            return chosen[0] * 1000 if chosen else 0.0
        cuts = statistics.quantiles(chosen, n=100, method="inclusive")
        return cuts[round(share * 100) - 1] * 1000


def run_phase(
    port: int,
    cookie: str,
    paths: dict[str, str],
    connections: int,
    seconds: float,
    server_pids: list[int],
) -> PhaseResult:
    """`connections` threads, each on its own kept-alive connection, until the time is up."""
    result = PhaseResult()
    lock = threading.Lock()
    items = list(paths.items())
    start = threading.Barrier(connections + 1)
    deadline = [0.0]

    def work(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        latencies, labels, failures = [], [], collections.Counter[str]()
        position = number
        try:
            start.wait()
        except threading.BrokenBarrierError:  # the bench is stopping
            return
        while True:
            label, path = items[position % len(items)]
            position += 1
            began = time.monotonic()
            if began >= deadline[0]:
                break
            try:
                status, _body, _headers = fetch(connection, path, cookie)
            except (OSError, http.client.HTTPException) as exc:
                status = 0
                failures[f"connection ({type(exc).__name__})"] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            latencies.append(time.monotonic() - began)
            labels.append(label)
            if status not in (0, 200):
                failures[str(status)] += 1
        connection.close()
        with lock:
            result.latencies += latencies
            result.labels += labels
            result.failures.update(failures)

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(connections)]
    for thread in threads:
        thread.start()
    cpu_before, machine_before = ingest.cpu_seconds(server_pids), ingest.machine_ticks()
    began = time.monotonic()
    deadline[0] = began + seconds
    try:
        start.wait()
        for thread in threads:
            thread.join()
    finally:  # on Ctrl-C, stop the threads so that gunicorn can stop at once
        deadline[0] = 0.0
        start.abort()
    result.seconds = time.monotonic() - began
    result.cpu_seconds = ingest.cpu_seconds(server_pids) - cpu_before
    result.machine_busy = busy_since(machine_before)
    return result


def machine_busy(seconds: float) -> float:
    """How busy all CPUs were over a short wait (others share this machine)."""
    before = ingest.machine_ticks()
    time.sleep(seconds)
    return busy_since(before)


def busy_since(before: tuple[int, int]) -> float:
    """The busy share of all CPUs since an earlier `ingest.machine_ticks()`."""
    total, idle = (a - b for a, b in zip(ingest.machine_ticks(), before, strict=True))
    return 1 - idle / total if total else 0.0


# --- output ------------------------------------------------------------------------------


def print_table(
    args: argparse.Namespace,
    setup: Installation,
    results: dict[str, PhaseResult],
    single: dict[str, PhaseResult],
    pages: dict[str, str],
    background: float,
) -> bool:
    """The comparison table and any failures; True when the list page meets its targets."""
    trivial, listing = results["trivial"], results["list"]
    ratio = listing.rate / trivial.rate if trivial.rate else 0.0
    p95 = listing.percentile(0.95)
    loaded = (
        f"loaded in {setup.load_seconds:.0f} s"
        if setup.load_seconds is not None
        else "cached, --rebuild to rebuild"
    )
    print(
        f"\nWeb: {args.messages:,} messages, {args.mailboxes:,} mailboxes, big one "
        f"{args.big:,}; database {args.database} ({loaded}); gunicorn workers {args.workers}; "
        f"{args.seconds:.0f} s per page; {os.cpu_count()} CPUs, {background:.0%} busy "
        "before the run"
    )
    every = list(results.values())
    rows = [
        ("", "/healthz", "list page", "message page", "target"),
        (f"requests/s, {args.connections} conns", *(f"{r.rate:.0f}" for r in every), ""),
        (
            "share of /healthz",
            "",
            f"{ratio:.0%}",
            f"{results['message'].rate / trivial.rate:.0%}" if trivial.rate else "",
            f"list >= {TARGET_RATIO:.0%}  {ingest.verdict(ratio >= TARGET_RATIO)}",
        ),
        ("latency p50 ms", *(f"{r.percentile(0.5):.1f}" for r in every), ""),
        (
            "latency p95 ms",
            *(f"{r.percentile(0.95):.1f}" for r in every),
            f"list < {TARGET_P95_MS:.0f}  {ingest.verdict(p95 < TARGET_P95_MS)}",
        ),
        (
            "server CPU ms/request",
            *(f"{r.cpu_seconds * 1000 / max(1, len(r.latencies)):.2f}" for r in every),
            "",
        ),
        (
            "machine CPU busy",
            *(f"{r.machine_busy:.0%}" for r in every),
            "client, server and others share the CPUs",
        ),
        ("requests/s, 1 conn", *(f"{r.rate:.0f}" for r in single.values()), ""),
        (
            "p50/p95 ms, 1 conn",
            *(f"{r.percentile(0.5):.1f}/{r.percentile(0.95):.1f}" for r in single.values()),
            "no queueing: service time",
        ),
        (
            "requests",
            *(
                str(len(r.latencies) + len(o.latencies))
                for r, o in zip(every, single.values(), strict=True)
            ),
            "",
        ),
        (
            "non-200",
            *(
                str(sum(r.failures.values()) + sum(o.failures.values()))
                for r, o in zip(every, single.values(), strict=True)
            ),
            "0",
        ),
    ]
    for row in rows:
        print(f"  {row[0]:<24}{row[1]:>10}{row[2]:>12}{row[3]:>14}   {row[4]}")
    print(
        "  list p50/p95 ms by depth: "
        + ", ".join(
            f"{label} {listing.percentile(0.5, label):.0f}/{listing.percentile(0.95, label):.0f}"
            for label in pages
        )
    )
    for name, result in [*results.items(), *single.items()]:
        for code, count in sorted(result.failures.items()):
            print(f"  {name} non-200 {code}: {count}")
    met = ratio >= TARGET_RATIO and p95 < TARGET_P95_MS
    if not met and not args.explain:
        print("  the list page misses a target: --explain shows its queries' plans and a profile")
    return met


def explain_list_page(setup: Installation) -> None:
    """Run the list page in-process: each SQL statement with its plan and time, then a profile."""
    from sqlalchemy import event

    from cleanmail import config as config_module
    from cleanmail.web import create_app

    app = create_app(config_module.load(setup.env))
    engine = app.extensions["cleanmail.db"].engine
    client = app.test_client()
    client.get(urlsplit(setup.cli("login-link", BIG_ADDRESS).strip()).path)
    client.get("/")
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):  # not SQLite's BEGIN
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    client.get("/")
    event.remove(engine, "before_cursor_execute", capture)
    timings = []
    for _number in range(30):
        began = time.perf_counter()
        client.get("/")
        timings.append(time.perf_counter() - began)
    print(
        f"\nList page in-process: median {statistics.median(timings) * 1000:.1f} ms over 30; "
        f"its {len(statements)} statements:"
    )
    prefix = "EXPLAIN QUERY PLAN " if setup.database == "sqlite" else "EXPLAIN (ANALYZE, BUFFERS) "
    with engine.connect() as connection:
        for statement, parameters in statements:
            runs = []
            for _number in range(20):
                began = time.perf_counter()
                connection.exec_driver_sql(statement, parameters).fetchall()
                runs.append(time.perf_counter() - began)
            print(
                f"\n  {statistics.median(runs) * 1000:.2f} ms  {' '.join(statement.split())}"
                f"\n  parameters {parameters}"
            )
            for row in connection.exec_driver_sql(prefix + statement, parameters):
                print("    " + " ".join(str(value) for value in row))
    profile = cProfile.Profile()
    profile.enable()
    for _number in range(30):
        client.get("/")
    profile.disable()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out).sort_stats("cumulative")
    stats.print_stats(r"/cleanmail/|/templates/|babel/|jinja2/(environment|runtime)", 25)
    print("\nProfile of 30 list pages, by cumulative time:\n" + out.getvalue().split("\n\n", 1)[-1])
    app.extensions["cleanmail.db"].dispose()


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--mailboxes", type=int, default=100_000)
    parser.add_argument(
        "--big",
        type=int,
        default=10_000,
        help="messages of the big mailbox, whose pages are requested",
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="per page measured")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="CLEANMAIL_WEB_WORKERS")
    parser.add_argument(
        "--rebuild", action="store_true", help=f"rebuild the SQLite database cached in {CACHE}"
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also show the list page's SQL plans and a Python profile",
    )
    args = parser.parse_args(argv)
    if not 0 < args.big <= args.messages or args.mailboxes < 2:
        parser.error("need 0 < --big <= --messages and at least 2 mailboxes")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; every process and temporary directory is gone when it returns."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cleanmail-bench-")))
        tmp.chmod(0o755)  # PostgreSQL runs as its own user and must reach its directory
        print(f"building the {args.database} database ...", flush=True)
        setup = stack.enter_context(installation(tmp, args))
        print(
            "loaded in "
            + (
                f"{setup.load_seconds:.1f} s"
                if setup.load_seconds is not None
                else "0 s: cached (--rebuild to rebuild)"
            ),
            flush=True,
        )
        background = machine_busy(1.0)
        proc, port = stack.enter_context(web_process(setup, args.workers, tmp / "web.log"))
        cookie = log_in(port, setup)
        pages = list_pages(port, cookie)
        phases = {
            "trivial": {"healthz": "/healthz"},
            "list": pages,
            "message": {f"message {i}": f"/messages/{i}" for i in setup.content_ids},
        }
        results, single = {}, {}
        for name, paths in phases.items():
            pids = ingest.family(proc.pid)  # gunicorn's workers, whenever they started
            run_phase(port, cookie, paths, args.connections, WARMUP_SECONDS, pids)
            results[name] = run_phase(port, cookie, paths, args.connections, args.seconds, pids)
            single[name] = run_phase(port, cookie, paths, 1, max(3.0, args.seconds / 3), pids)
            print(
                f"{name}: {results[name].rate:.0f} requests/s, "
                f"{single[name].rate:.0f} on one connection",
                flush=True,
            )
        print_table(args, setup, results, single, pages, background)
        if args.explain:
            explain_list_page(setup)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
