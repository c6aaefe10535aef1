"""Ingest benchmark: the real `cleanmail filter` against a bare relay, same client, same mail.

The client, the filter (or the bare relay) and the SMTP sink each run in their own
processes, so they do not share a GIL. The machine is noisy, so the figure that
matters is the ratio of the filter's throughput to the bare relay's in the same run.

    .venv/bin/python bench/ingest.py [--messages 5000] [--connections 10]
        [--client-processes 2] [--filter-workers N] [--skip-memory]
        [--database sqlite|postgresql] [--classifier on|off] [--profile FILE [--profile-gil]]
        [--engine rspamd|spamassassin]

With ``--engine``, a second filter run chains a private rspamd or spamd (Debian's
packages, no network checks) after the embedded engines, and its rate is printed
beside the first run's (embedded engines only) and the bare relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import ctypes
import multiprocessing as mp
import os
import random
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402
from aiosmtpd.smtp import SMTP, Envelope, Session  # noqa: E402

from tests.servers import PostgresServer, RspamdServer, SpamdServer, free_port  # noqa: E402

CORPUS = Path(os.environ.get("CLEANMAIL_CORPUS", "") or ROOT.parent / "shared" / "corpus")
CLEANMAIL = ROOT / ".venv" / "bin" / "cleanmail"
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"  # .venv/bin/pip install py-spy, for --profile
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
DOMAIN = "example.no"
MAILBOXES = 200
SENDER = "bench-sender@example.org"
MAX_MESSAGE_SIZE = 18 * 1024 * 1024
LINE_LIMIT = 64 * 1024  # as the filter: corpus mail has lines longer than RFC 5321 allows
TARGET_RATIO = 0.80
TARGET_RATE = 400.0
TARGET_MEMORY_FACTOR = 3.0
MB = 1024 * 1024


class Message(NamedTuple):
    """One message ready to send: envelope recipient and dot-stuffed DATA with its terminator."""

    recipient: str
    data: bytes
    gtube: bool


@dataclass
class ClientReport:
    """What one client process saw."""

    latencies: list[float] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: dict[str, str] = field(default_factory=dict)
    end: float = 0.0
    error: str = ""


@dataclass
class BatchResult:
    """The whole batch as the client saw it, and what the server process used."""

    sent: int
    seconds: float
    latencies: list[float]
    verdicts: list[str]
    failures: collections.Counter[str]
    samples: dict[str, str]
    reached_sink: int = 0
    peak_rss_kb: int = 0
    sampled_rss_kb: int = 0
    cpu_seconds: float = 0.0
    rss_timeline_kb: list[int] = field(default_factory=list)
    machine_busy: float = 0.0
    log_lines: int | None = None
    quarantined: int | None = None

    @property
    def rate(self) -> float:
        """Messages per second over the whole batch."""
        return self.sent / self.seconds if self.seconds else 0.0

    def percentile(self, share: float, verdict: str | None = None) -> float:
        """A latency percentile in milliseconds, of all messages or those with one verdict."""
        latencies = [
            x
            for x, v in zip(self.latencies, self.verdicts, strict=True)
            if verdict is None or v == verdict
        ]
        if len(latencies) < 2:
            return latencies[0] * 1000 if latencies else 0.0
        return (
            statistics.quantiles(latencies, n=100, method="inclusive")[round(share * 100) - 1]
            * 1000
        )


# --- processes ---------------------------------------------------------------------------


def die_with_parent() -> None:
    """Ask Linux to send us SIGTERM when the bench dies, so that nothing is left behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def child_signals() -> None:
    """Children leave Ctrl-C to the bench (which stops them) and die on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()


class BenchSMTP(SMTP):
    """aiosmtpd's server with the filter's line length limit."""

    line_length_limit = LINE_LIMIT


async def serve_smtp(handler: Any, port: int, ready: Event, size_limit: int | None) -> None:
    """Serve SMTP on 127.0.0.1:port until the process is terminated."""
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return BenchSMTP(
            handler,
            data_size_limit=size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname="bench.invalid",
            timeout=600,
        )

    server = await loop.create_server(factory, host="127.0.0.1", port=port)
    ready.set()
    async with server:
        await asyncio.Event().wait()


class CountingSink(asyncio.Protocol):
    """A lean SMTP server that accepts every message and counts it in shared memory.

    It stands for the mail server's after-filter port (Postfix's smtpd, written in C):
    an aiosmtpd sink would spend more CPU per message than the filter's own SMTP side,
    and on two cores that CPU is taken from whatever is measured. It reads the data in
    large pieces, advertises PIPELINING as Postfix does, and answers every command.
    """

    def __init__(self, counter: Any) -> None:
        self.counter = counter
        self.transport: Any = None
        self.buffer = bytearray()
        self.in_data = False

    def connection_made(self, transport: Any) -> None:
        """Greet the client."""
        self.transport = transport
        transport.write(b"220 sink.bench.invalid ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        """Answer each complete command; count each complete message."""
        self.buffer += data
        replies = []
        while self.buffer:
            if self.in_data:
                # The data ends with CRLF.CRLF, or is the lone "." line of an empty message.
                if self.buffer.startswith(b".\r\n"):
                    end, skip = 0, 3
                else:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    skip = end + 5
                del self.buffer[:skip]
                self.in_data = False
                with self.counter.get_lock():
                    self.counter.value += 1
                replies.append(b"250 2.0.0 Ok\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            verb = bytes(self.buffer[:4]).upper()
            del self.buffer[: end + 2]
            if verb == b"EHLO":
                replies.append(
                    b"250-sink.bench.invalid\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                    b"250-SMTPUTF8\r\n250 SIZE 0\r\n"
                )
            elif verb == b"DATA":
                self.in_data = True
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(replies))
                self.transport.close()
                return
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                replies.append(b"250 2.0.0 Ok\r\n")
            else:
                replies.append(b"502 5.5.2 Command not recognized\r\n")
        if replies:
            self.transport.write(b"".join(replies))


async def serve_sink(counter: Any, port: int, ready: Event) -> None:
    """Serve the counting sink on 127.0.0.1:port until the process is terminated."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: CountingSink(counter), host="127.0.0.1", port=port)
    ready.set()
    async with server:
        await asyncio.Event().wait()


def sink_main(port: int, counter: Any, ready: Event) -> None:
    """Run the counting sink (a process of its own)."""
    child_signals()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_sink(counter, port, ready))


class BareRelay:
    """Re-injects each message like the filter (executor thread, reused connection), no verdict."""

    def __init__(self, relay_port: int) -> None:
        self.relay_port = relay_port
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="relay")
        self.local = threading.local()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Relay the message, answering 451 when the next hop fails."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self.executor,
                self.send,
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
            )
        except (OSError, smtplib.SMTPException) as exc:
            self.local.client = None
            return f"451 4.4.1 relay failed: {exc}"[:200]
        return "250 2.0.0 Ok"

    def send(self, sender: str, recipients: list[str], data: bytes) -> None:
        """Send over this thread's connection, opening it on first use."""
        client = getattr(self.local, "client", None)
        if client is None:
            client = smtplib.SMTP("127.0.0.1", self.relay_port, timeout=60)
            client.ehlo()
            self.local.client = client
        client.sendmail(sender, recipients, data)


def relay_main(port: int, relay_port: int, ready: Event) -> None:
    """Run the bare relay (a process of its own)."""
    child_signals()
    asyncio.run(serve_smtp(BareRelay(relay_port), port, ready, MAX_MESSAGE_SIZE))


# --- client ------------------------------------------------------------------------------


def send_one(client: smtplib.SMTP, message: Message) -> tuple[int, str]:
    """One transaction as Postfix's smtp client makes it; returns the final reply.

    Where the server offers PIPELINING, MAIL, RCPT and DATA go in one write and the
    client then reads their three replies (Postfix does the same); else one by one.
    """
    data: tuple[int, bytes] = (0, b"")
    if client.has_extn("pipelining"):
        assert client.sock is not None
        client.sock.sendall(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{message.recipient}>\r\nDATA\r\n".encode()
        )
        (code, text), rcpt, data = [client.getreply() for _command in range(3)]
        if code == 250:
            code, text = rcpt
    else:
        code, text = client.mail(SENDER)
        if code == 250:
            code, text = client.rcpt(message.recipient)
            if code in (250, 251):
                data = client.docmd("DATA")
    if code in (250, 251) and data[0] == 354:
        assert client.sock is not None
        client.sock.sendall(message.data)
        code, text = client.getreply()
        return code, text.decode(errors="replace")
    if data[0] == 354:
        # Pipelined DATA was accepted although a command before it failed: hang up, as
        # Postfix does, so that nothing is delivered.
        client.close()
        raise smtplib.SMTPServerDisconnected(f"{code} {text.decode(errors='replace')}")
    if code in (250, 251):
        code, text = data  # DATA itself was refused
    client.rset()
    return code, text.decode(errors="replace")


def connect(port: int) -> smtplib.SMTP:
    """An SMTP connection that has said EHLO."""
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.bench.invalid", timeout=120)
    client.ehlo()
    return client


def send_all(
    client: smtplib.SMTP,
    port: int,
    messages: Sequence[Message],
    work: collections.deque[int],
    report: ClientReport,
    lock: threading.Lock,
) -> None:
    """Send messages from the shared work queue until it is empty."""
    while True:
        try:
            index = work.popleft()
        except IndexError:
            break
        started = time.monotonic()
        try:
            code, text = send_one(client, messages[index])
        except (OSError, smtplib.SMTPException) as exc:
            code, text = 0, f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                client.close()
            with contextlib.suppress(OSError, smtplib.SMTPException):
                client = connect(port)
        elapsed = time.monotonic() - started
        with lock:
            report.latencies.append(elapsed)
            # The filter's 250 ends with the verdicts ("Ok: 1234 bytes, pass").
            report.verdicts.append(text.rpartition(" ")[2] if code == 250 else str(code))
            if code != 250:
                key = str(code) if code else "connection"
                report.failures[key] += 1
                report.samples.setdefault(key, text[:160])
    with contextlib.suppress(Exception):
        client.quit()


def client_main(
    port: int,
    messages: Sequence[Message],
    indices: range,
    threads: int,
    barrier: Barrier,
    results: Any,
) -> None:
    """One client process: connect, wait for the start, send its share over a few threads."""
    child_signals()
    report = ClientReport()
    try:
        clients = [connect(port) for _ in range(threads)]
    except (OSError, smtplib.SMTPException) as exc:
        report.error = f"cannot connect: {exc}"
        barrier.abort()
        results.put(report)
        return
    work = collections.deque(indices)
    lock = threading.Lock()
    workers = [
        threading.Thread(target=send_all, args=(c, port, messages, work, report, lock))
        for c in clients
    ]
    barrier.wait()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    report.end = time.monotonic()
    results.put(report)


def run_batch(
    port: int, messages: Sequence[Message], connections: int, processes: int, server_pids: list[int]
) -> BatchResult:
    """Send every message over `connections` connections from `processes` processes."""
    ctx = mp.get_context("fork")  # the children share the preloaded messages, unpickled
    processes = max(1, min(processes, connections))
    barrier = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    procs = []
    for number in range(processes):
        threads = connections // processes + (number < connections % processes)
        procs.append(
            ctx.Process(
                target=client_main,
                daemon=True,
                args=(
                    port,
                    messages,
                    range(number, len(messages), processes),
                    threads,
                    barrier,
                    results,
                ),
            )
        )
    try:
        for proc in procs:
            proc.start()
        sampler = RssSampler(server_pids)
        sampler.start()
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            errors = [r.error for r in collect_reports(results, procs, wanted=1)]
            raise RuntimeError(f"client did not start: {errors}") from None
        started = time.monotonic()
        cpu_before, machine_before = cpu_seconds(server_pids), machine_ticks()
        reports = collect_reports(results, procs)
        cpu = cpu_seconds(server_pids) - cpu_before
        machine = [
            after - before for after, before in zip(machine_ticks(), machine_before, strict=True)
        ]
        sampler.stop()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(5)
    errors = [r.error for r in reports if r.error]
    if errors:
        raise RuntimeError("client failed: " + "; ".join(errors))
    failures: collections.Counter[str] = collections.Counter()
    samples: dict[str, str] = {}
    for report in reports:
        failures.update(report.failures)
        for key, text in report.samples.items():
            samples.setdefault(key, text)
    return BatchResult(
        sent=len(messages),
        seconds=max(r.end for r in reports) - started,
        latencies=[x for r in reports for x in r.latencies],
        verdicts=[v for r in reports for v in r.verdicts],
        failures=failures,
        samples=samples,
        peak_rss_kb=proc_status(server_pids, "VmHWM"),
        sampled_rss_kb=sampler.peak_kb,
        cpu_seconds=cpu,
        rss_timeline_kb=sampler.quartiles(),
        machine_busy=1 - machine[1] / machine[0] if machine[0] else 0.0,
    )


def collect_reports(results: Any, procs: list[Any], wanted: int = 0) -> list[ClientReport]:
    """Wait for every client process's report, noticing one that died without reporting."""
    reports: list[ClientReport] = []
    grace = 0
    while len(reports) < (wanted or len(procs)):
        try:
            reports.append(results.get(timeout=1))
            continue
        except Exception:  # queue.Empty
            pass
        if sum(p.exitcode is not None for p in procs) > len(reports):
            grace += 1
            if grace > 3:
                raise RuntimeError("a client process died without reporting")
    return reports


# --- measuring ---------------------------------------------------------------------------


def family(pid: int) -> list[int]:
    """A process and its descendants (the filter forks workers when told to)."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.read_text().rsplit(")", 1)[1].split()[1])].append(
                int(stat.parent.name)
            )
    found, todo = [pid], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def workers_started(pid: int, workers: int | None, timeout: float = 60.0) -> list[int]:
    """The filter's processes once all its workers have forked (the parent listens first)."""
    expected = workers or os.cpu_count() or 1
    deadline = time.monotonic() + timeout
    while len(found := family(pid)) < 1 + expected and expected > 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the filter forked {len(found) - 1} of {expected} workers")
        time.sleep(0.05)
    return found


def proc_status(pids: list[int], name: str) -> int:
    """A /proc/PID/status field in kB, summed over processes (0 for one that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(name + ":"):
                    total += int(line.split()[1])
    return total


def machine_ticks() -> tuple[int, int]:
    """All CPU ticks and idle ticks (idle + iowait) of the machine so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of processes so far (their threads included)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """Samples the summed VmRSS of processes every 50 ms and keeps the largest."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak_kb = 0
        self.samples: list[int] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        while not self._stop_event.wait(0.05):
            self.samples.append(proc_status(self.pids, "VmRSS"))
            self.peak_kb = max(self.peak_kb, self.samples[-1])

    def quartiles(self) -> list[int]:
        """VmRSS a quarter, half, three quarters of the way through, and at the end."""
        if not self.samples:
            return []
        return [
            self.samples[min(len(self.samples) - 1, len(self.samples) * q // 4)]
            for q in (1, 2, 3, 4)
        ]

    def stop(self) -> None:
        """Stop sampling."""
        self._stop_event.set()
        self.join()


# --- set-up ------------------------------------------------------------------------------


def load_messages(count: int, gtube_every: int = 10, seed: int = 1) -> list[Message]:
    """Corpus mail as CRLF DATA, every tenth with GTUBE appended; cycles when short."""
    files = sorted(
        p for folder in ("ham", "spam") for p in (CORPUS / folder).iterdir() if p.is_file()
    )
    if not files:
        raise RuntimeError(f"no messages in {CORPUS}")
    random.Random(seed).shuffle(files)
    raws = [to_crlf(path.read_bytes()) for path in files[:count]]
    messages = []
    for number in range(count):
        raw = raws[number % len(raws)]
        gtube = number % gtube_every == 0
        if gtube:
            raw = raw + GTUBE + b"\r\n"
        messages.append(Message(f"user{number % MAILBOXES}@{DOMAIN}", dot_stuff(raw), gtube))
    return messages


def to_crlf(raw: bytes) -> bytes:
    """Drop the mbox From_ line and turn LF into CRLF; end with a line break."""
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return raw if raw.endswith(b"\r\n") else raw + b"\r\n"


def dot_stuff(raw: bytes) -> bytes:
    """SMTP DATA for a CRLF message: leading dots doubled, terminator added."""
    stuffed = (b"\r\n" + raw).replace(b"\r\n.", b"\r\n..")[2:]
    return stuffed + b".\r\n"


def big_message(limit: int = MAX_MESSAGE_SIZE, margin: int = 1024) -> bytes:
    """A multipart message with a random base64 attachment, just under `limit` bytes."""
    head = (
        f"From: Bench <{SENDER}>\r\nTo: user0@{DOMAIN}\r\nSubject: the data you asked for\r\n"
        "Date: Mon, 01 Jan 2024 12:00:00 +0000\r\nMessage-ID: <big.1@bench.invalid>\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="bench-boundary"\r\n\r\n'
        "--bench-boundary\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Here is the file.\r\n\r\n--bench-boundary\r\n"
        'Content-Type: application/octet-stream; name="data.bin"\r\n'
        'Content-Disposition: attachment; filename="data.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    tail = b"--bench-boundary--\r\n"
    lines = (limit - margin - len(head) - len(tail)) // 78  # 57 bytes -> 76 chars + CRLF
    body = base64.encodebytes(os.urandom(lines * 57)).replace(b"\n", b"\r\n")
    raw = head + body + tail
    assert len(raw) < limit, len(raw)
    return raw


@dataclass
class Installation:
    """A data dir and database with example.no served, and the environment to reach them."""

    env: dict[str, str]
    database_url: str
    data_dir: Path

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

    def count_quarantined(self) -> int:
        """Rows in the quarantine (one per message and mailbox)."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return int(
                    connection.execute(
                        sqlalchemy.text("SELECT count(*) FROM messages")
                    ).scalar_one()
                )
        finally:
            engine.dispose()


@contextlib.contextmanager
def installation(tmp: Path, database: str, classifier: bool = True) -> Iterator[Installation]:
    """Migrate a fresh database (SQLite in the data dir, or a throw-away PostgreSQL).

    With the classifier on, it is trained on the corpus first, so that the filter scores
    every message with a real model (as an installation that ran ``engine train`` does).
    """
    data_dir = tmp / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANMAIL_")}
    env["CLEANMAIL_DATA_DIR"] = str(data_dir)
    with contextlib.ExitStack() as stack:
        if database == "postgresql":
            server = stack.enter_context(PostgresServer(tmp))
            server.create_database("cleanmail")
            url = server.url("cleanmail")
            env["CLEANMAIL_DATABASE_URL"] = url
            env["CLEANMAIL_SECRET_KEY"] = "bench-secret-key-bench-secret-key"
        else:
            url = f"sqlite:///{data_dir / 'cleanmail.db'}"
        setup = Installation(env, url, data_dir)
        setup.cli("db", "upgrade")
        setup.cli("domain", "add", DOMAIN)
        if classifier:
            print(
                setup.cli(
                    "engine", "train", "--ham", str(CORPUS / "ham"), "--spam", str(CORPUS / "spam")
                ).strip()
            )
        else:
            env["CLEANMAIL_CLASSIFIER"] = "off"
        yield setup


@contextlib.contextmanager
def spawned(target: Any, *args: Any) -> Iterator[Any]:
    """A server process started fresh (spawn: its RSS is its own), terminated on exit."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=target, args=(*args, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError(f"{target.__name__} did not start")
        yield proc
    finally:
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def start_cleanmail(command: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a `cleanmail` daemon in its own session, logging to `log_path`; dies with us."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(CLEANMAIL), command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


@contextlib.contextmanager
def filter_process(
    setup: Installation,
    relay_port: int,
    log_path: Path,
    profile: Path | None = None,
    gil: bool = False,
    workers: int | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`cleanmail filter` on a free port, relaying to `relay_port`; stopped with SIGTERM."""
    port = free_port()
    env = dict(
        setup.env,
        CLEANMAIL_FILTER_LISTEN=f"127.0.0.1:{port}",
        CLEANMAIL_RELAY=f"127.0.0.1:{relay_port}",
    )
    if workers:
        env["CLEANMAIL_FILTER_WORKERS"] = str(workers)
    proc = start_cleanmail("filter", env, log_path)
    spy: subprocess.Popen[bytes] | None = None
    try:
        wait_listening(port, proc, log_path)
        if profile is not None:
            spy_command = str(PY_SPY) if PY_SPY.exists() else "py-spy"
            spy = subprocess.Popen(
                [
                    spy_command,
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--rate",
                    "100",
                    "--format",
                    "raw",
                    "--output",
                    str(profile),
                    "--subprocesses",
                    *(["--gil"] if gil else []),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            time.sleep(1)
        yield proc, port
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a grace period."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_listening(port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Wait until the filter answers on its port."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"filter exited with {proc.returncode}:\n{log_path.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"filter did not listen on {port}:\n{log_path.read_text()}")


# --- the runs ----------------------------------------------------------------------------


def measure_relay(
    messages: Sequence[Message], args: argparse.Namespace, sink_port: int, counter: Any
) -> BatchResult:
    """The reference: the bare relay with the same client and messages."""
    port = free_port()
    with spawned(relay_main, port, sink_port) as relay:
        before = counter.value
        result = run_batch(port, messages, args.connections, args.client_processes, [relay.pid])
        result.reached_sink = counter.value - before
    return result


def measure_filter(
    messages: Sequence[Message],
    args: argparse.Namespace,
    setup: Installation,
    sink_port: int,
    counter: Any,
    tmp: Path,
) -> BatchResult:
    """The real filter with the same client and messages."""
    with filter_process(
        setup, sink_port, tmp / "filter.log", args.profile, args.profile_gil, args.filter_workers
    ) as (proc, port):
        before = counter.value
        result = run_batch(
            port,
            messages,
            args.connections,
            args.client_processes,
            workers_started(proc.pid, args.filter_workers),
        )
        result.reached_sink = counter.value - before
    result.quarantined = setup.count_quarantined()
    with open(tmp / "filter.log", "rb") as log:
        result.log_lines = sum(1 for _line in log)
    return result


def measure_memory(
    setup: Installation, sink_port: int, warmup: Sequence[Message], tmp: Path, workers: int | None
) -> dict[str, Any]:
    """Peak RSS increase of a fresh filter for one message just under 18 MiB."""
    raw = big_message()
    big = Message(f"user0@{DOMAIN}", dot_stuff(raw), False)
    with filter_process(setup, sink_port, tmp / "filter-memory.log", workers=workers) as (
        proc,
        port,
    ):
        client = connect(port)
        try:
            for message in warmup:
                send_one(client, message)
            time.sleep(0.5)
            pids = family(proc.pid)
            baseline = proc_status(pids, "VmRSS")
            hwm_reset = all([reset_peak(pid) for pid in pids])
            sampler = RssSampler(pids)
            sampler.start()
            started = time.monotonic()
            code, text = send_one(client, big)
            seconds = time.monotonic() - started
            sampler.stop()
            peak = proc_status(pids, "VmHWM")
        finally:
            with contextlib.suppress(Exception):
                client.quit()
    return {
        "size": len(raw),
        "attachment": (len(raw) * 57) // 78,
        "baseline_kb": baseline,
        "peak_kb": peak,
        "sampled_kb": sampler.peak_kb,
        "reply": f"{code} {text}"[:100],
        "seconds": seconds,
        "hwm_reset": hwm_reset,
    }


@contextlib.contextmanager
def external_engine(name: str, tmp: Path) -> Iterator[dict[str, str]]:
    """A private rspamd or spamd with two checking processes; the settings that use it."""
    engines = f"rules,{name}"
    if name == "rspamd":
        with RspamdServer(tmp, workers=2) as rspamd:
            yield {
                "CLEANMAIL_ENGINES": engines,
                "CLEANMAIL_RSPAMD_URL": rspamd.url,
                "CLEANMAIL_RSPAMD_CONTROLLER_URL": rspamd.controller_url,
                "CLEANMAIL_RSPAMD_PASSWORD": rspamd.password,
            }
    else:
        with SpamdServer(tmp, children=4) as spamd:
            yield {
                "CLEANMAIL_ENGINES": engines,
                "CLEANMAIL_SPAMD_HOST": spamd.host,
                "CLEANMAIL_SPAMD_PORT": str(spamd.port),
            }


def measure_engine(
    messages: Sequence[Message],
    args: argparse.Namespace,
    setup: Installation,
    sink_port: int,
    counter: Any,
    tmp: Path,
    relay: BatchResult,
    first: BatchResult,
) -> BatchResult:
    """The filter again, with an external engine chained after the embedded ones."""
    started = time.monotonic()
    with external_engine(args.engine, tmp) as settings:
        print(f"{args.engine} started in {time.monotonic() - started:.1f} s")
        plain = dict(setup.env)
        setup.env.update(settings)
        try:
            result = measure_filter(messages, args, setup, sink_port, counter, tmp)
        finally:
            setup.env.clear()
            setup.env.update(plain)
    held = (result.quarantined or 0) - (first.quarantined or 0)
    print(f"\nWith {args.engine} chained after the embedded engines (same run, same messages):")
    rows = [
        ("", f"+ {args.engine}", "embedded only", "bare relay"),
        ("messages/s", f"{result.rate:.0f}", f"{first.rate:.0f}", f"{relay.rate:.0f}"),
        (
            "latency p50 ms",
            f"{result.percentile(0.50):.1f}",
            f"{first.percentile(0.50):.1f}",
            f"{relay.percentile(0.50):.1f}",
        ),
        (
            "latency p95 ms",
            f"{result.percentile(0.95):.1f}",
            f"{first.percentile(0.95):.1f}",
            f"{relay.percentile(0.95):.1f}",
        ),
        (
            "reached the sink",
            str(result.reached_sink),
            str(first.reached_sink),
            str(relay.reached_sink),
        ),
        # The quarantine keeps one copy per message and mailbox: the second run adds
        # only what the external engine held and the embedded engines did not.
        ("held in addition", str(held), "-", "-"),
        (
            "non-250 replies",
            str(sum(result.failures.values())),
            str(sum(first.failures.values())),
            str(sum(relay.failures.values())),
        ),
    ]
    for row in rows:
        print(f"  {row[0]:<22}{row[1]:>16}{row[2]:>16}{row[3]:>16}")
    for code, count in sorted(result.failures.items()):
        print(f"  + {args.engine} failures {code}: {count}  e.g. {result.samples.get(code, '')}")
    return result


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs permission); report success."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --- output ------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    """A mark for a figure against its target."""
    return "ok" if ok else "BELOW TARGET"


def timeline(result: BatchResult) -> str:
    """The sampled VmRSS through the run, in MB."""
    return "/".join(f"{kb / 1024:.0f}" for kb in result.rss_timeline_kb)


def print_table(
    args: argparse.Namespace, relay: BatchResult, filt: BatchResult, gtube_count: int
) -> None:
    """The comparison table and any failures."""
    ratio = filt.rate / relay.rate if relay.rate else 0.0
    print(
        f"\nIngest: {filt.sent} messages, {args.connections} connections, "
        f"{args.client_processes} client processes, database {args.database}, "
        f"filter workers {args.filter_workers or 'default'}, classifier {args.classifier}, "
        f"{os.cpu_count()} CPUs"
    )
    rows = [
        ("", "filter", "bare relay", "target"),
        (
            "messages/s",
            f"{filt.rate:.0f}",
            f"{relay.rate:.0f}",
            f">= {TARGET_RATE:.0f}  {verdict(filt.rate >= TARGET_RATE)}",
        ),
        (
            "filter / relay",
            f"{ratio:.0%}",
            "",
            f">= {TARGET_RATIO:.0%}  {verdict(ratio >= TARGET_RATIO)}",
        ),
        ("seconds", f"{filt.seconds:.1f}", f"{relay.seconds:.1f}", ""),
        ("latency p50 ms", f"{filt.percentile(0.50):.1f}", f"{relay.percentile(0.50):.1f}", ""),
        ("latency p95 ms", f"{filt.percentile(0.95):.1f}", f"{relay.percentile(0.95):.1f}", ""),
        (
            "server CPU ms/message",
            f"{filt.cpu_seconds * 1000 / filt.sent:.2f}",
            f"{relay.cpu_seconds * 1000 / relay.sent:.2f}",
            "",
        ),
        (
            "server CPU use",
            f"{filt.cpu_seconds / filt.seconds:.0%}",
            f"{relay.cpu_seconds / relay.seconds:.0%}",
            "of one core",
        ),
        (
            "machine CPU busy",
            f"{filt.machine_busy:.0%}",
            f"{relay.machine_busy:.0%}",
            f"all {os.cpu_count()} CPUs: client, server, sink",
        ),
        (
            "p50 ms pass/quarantine",
            f"{filt.percentile(0.5, 'pass'):.1f}/{filt.percentile(0.5, 'quarantine'):.1f}",
            "",
            "passed mail is relayed",
        ),
        (
            "non-250 replies",
            str(sum(filt.failures.values())),
            str(sum(relay.failures.values())),
            "0",
        ),
        (
            "peak RSS MB (VmHWM)",
            f"{filt.peak_rss_kb / 1024:.1f}",
            f"{relay.peak_rss_kb / 1024:.1f}",
            "",
        ),
        (
            "max sampled VmRSS MB",
            f"{filt.sampled_rss_kb / 1024:.1f}",
            f"{relay.sampled_rss_kb / 1024:.1f}",
            "",
        ),
        ("VmRSS at 1/4..end MB", timeline(filt), timeline(relay), ""),
        ("log lines/message", f"{(filt.log_lines or 0) / filt.sent:.1f}", "-", ""),
        ("quarantined", str(filt.quarantined), "-", f"GTUBE-marked: {gtube_count}"),
        ("reached the sink", str(filt.reached_sink), str(relay.reached_sink), ""),
    ]
    for row in rows:
        print(f"  {row[0]:<22}{row[1]:>16}{row[2]:>16}   {row[3]}")
    for name, result in (("filter", filt), ("bare relay", relay)):
        for code, count in sorted(result.failures.items()):
            print(f"  {name} failures {code}: {count}  e.g. {result.samples.get(code, '')}")
    accounted = filt.reached_sink + (filt.quarantined or 0) + sum(filt.failures.values())
    if accounted != filt.sent:
        print(f"  note: sink + quarantined + failed = {accounted}, not {filt.sent}")


def print_memory(memory: dict[str, Any]) -> None:
    """The one-big-message memory figures."""
    increase = (memory["peak_kb"] - memory["baseline_kb"]) * 1024
    factor = increase / memory["size"]
    print(
        f"\nOne {memory['size'] / MB:.2f} MiB message (about {memory['attachment'] / 1e6:.1f} MB "
        "of random bytes in a base64 attachment data.bin), fresh filter:"
    )
    print(
        f"  VmRSS before {memory['baseline_kb'] / 1024:.1f} MB, VmHWM after "
        f"{memory['peak_kb'] / 1024:.1f} MB (max sampled VmRSS "
        f"{memory['sampled_kb'] / 1024:.1f} MB)"
        + ("" if memory["hwm_reset"] else ", VmHWM could not be reset before the message")
    )
    print(
        f"  increase {increase / MB:.1f} MB = {factor:.1f}x the message   target <= "
        f"{TARGET_MEMORY_FACTOR:.0f}x  {verdict(factor <= TARGET_MEMORY_FACTOR)}"
    )
    print(f"  reply {memory['reply']!r} after {memory['seconds']:.2f} s")


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument(
        "--connections",
        type=int,
        default=10,
        help="SMTP connections in all (10: what Postfix opens with the README's master.cf)",
    )
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--filter-workers",
        type=int,
        default=None,
        help="CLEANMAIL_FILTER_WORKERS for the filter (default: its own)",
    )
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--classifier",
        choices=("on", "off"),
        default="on",
        help="train the learning classifier on the corpus and score with it",
    )
    parser.add_argument(
        "--engine",
        choices=("rspamd", "spamassassin"),
        default=None,
        help="measure again with this external engine chained after the rules",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record the filter with py-spy into this raw (collapsed) file",
    )
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; every process and directory is gone when it returns."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cleanmail-bench-")))
        tmp.chmod(0o755)  # PostgreSQL runs as its own user and must reach its directory
        started = time.monotonic()
        messages = load_messages(args.messages)
        gtube_count = sum(m.gtube for m in messages)
        print(
            f"loaded {len(messages)} messages ({sum(len(m.data) for m in messages) / MB:.1f} "
            f"MiB, {gtube_count} with GTUBE) in {time.monotonic() - started:.1f} s"
        )
        setup = stack.enter_context(
            installation(tmp, args.database, classifier=args.classifier == "on")
        )
        counter = mp.get_context("spawn").Value("q", 0)
        sink_port = free_port()
        stack.enter_context(spawned(sink_main, sink_port, counter))
        relay = measure_relay(messages, args, sink_port, counter)
        print(f"bare relay: {relay.rate:.0f} messages/s")
        filt = measure_filter(messages, args, setup, sink_port, counter, tmp)
        print(f"filter: {filt.rate:.0f} messages/s")
        print_table(args, relay, filt, gtube_count)
        if args.engine:
            measure_engine(messages, args, setup, sink_port, counter, tmp, relay, filt)
        if not args.skip_memory:
            warmup = [m for m in messages[:20] if not m.gtube][:5]
            print_memory(measure_memory(setup, sink_port, warmup, tmp, args.filter_workers))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
