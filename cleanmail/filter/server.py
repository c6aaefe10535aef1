"""The SMTP content filter daemon: Postfix hands mail over here after its queue.

Reply strings are constants; any unexpected trouble is logged and answered 451
so that Postfix keeps the message and tries again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import signal
import socket
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax
from sqlalchemy.exc import SQLAlchemyError

from cleanmail import logs, mime, stats
from cleanmail.config import Config, ConfigError
from cleanmail.filter.engines import EngineError
from cleanmail.filter.engines import Envelope as CheckEnvelope
from cleanmail.filter.pipeline import Analysis, Decision, Pipeline
from cleanmail.relay import RelayError
from cleanmail.store import StoreError

log = logging.getLogger(__name__)

REPLY_OK = "250 2.0.0 Ok: {id}"
REPLY_TOO_BIG = "552 5.3.4 Message too big for this system"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_BAD_RCPT = "501 5.1.3 Bad recipient address syntax"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_TIMEOUT = "451 4.4.5 Timed out while checking the message, try again later"
REPLY_STORE_FAILED = "451 4.3.0 Cannot store the message now, try again later"
REPLY_DB_FAILED = "451 4.3.0 Database unavailable, try again later"
REPLY_RELAY_FAILED = "451 4.4.1 Next hop unavailable, try again later"
REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"
REPLY_ENGINE_FAILED = "451 4.7.1 Spam check unavailable, try again later"
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO")
LINE_LIMIT = 64 * 1024
COUNTED = {"pass": "passed", "quarantine": "quarantined", "reject": "rejected"}
LOCAL_THREADS = 2  # checking threads per process with the embedded engines only
EXTERNAL_THREADS = 8  # with rspamd or spamd, whose answers are waited for
# Anything but a plain address inside <...> goes to aiosmtpd's full parser.
_UNUSUAL = re.compile(r'[\s"\\(),:;<\[\]]')


def _forwarded(name: str, value: str) -> str:
    """An XFORWARD value made safe to store; ADDR only when it is an IP address."""
    value = mime.clean_text(value.removeprefix("IPV6:"), 255)
    if name == "ADDR":
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return ""
    return value


class _Job:
    """One message in a worker thread: abandoned by a timeout, or delivering; never both."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "checking"

    def begin_delivery(self) -> bool:
        """Move on to storing and relaying, unless the message was abandoned."""
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "delivering"
            return True

    def abandon(self) -> bool:
        """Give up on a message still being checked; False once delivery has begun."""
        with self._lock:
            if self._state == "delivering":
                return False
            self._state = "abandoned"
            return True


class _Held(NamedTuple):
    """A message checked and quarantined where it had to be, ready to be passed on."""

    analysis: Analysis
    decisions: list[Decision]
    refused: str | None  # the reply when every recipient is rejected


class FilterSMTP(SMTP):
    """aiosmtpd's server with XFORWARD and RFC 3463 codes for size refusals."""

    # Mail with lines longer than RFC 5321 allows is common enough to accept rather than bounce.
    line_length_limit = LINE_LIMIT

    _deadline = 0.0

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the idle deadline on; the one timer is replaced only when it would fire late.

        aiosmtpd cancels and schedules a timer for every command, which costs more than
        most commands themselves. Here the timer, when it fires early, looks again.
        """
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_check)

    def _idle_check(self) -> None:
        """Close the connection once it has been idle until its deadline, else wait on."""
        if self.loop.time() >= self._deadline:
            self._timeout_cb()
        else:
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_check)

    _replies: list[bytes] | None = None

    async def push(self, status: Any) -> None:
        """Send a reply, giving aiosmtpd's own size refusals their enhanced status code.

        With PIPELINING, a client sends MAIL, RCPT and DATA at once; their replies go
        back in one write (RFC 2920 asks for that), rather than a write each. A reply is
        held back only while another complete command is already waiting to be read.
        """
        if isinstance(status, str):
            if status.startswith("552 Error:"):
                status = REPLY_TOO_BIG
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        if self._replies is None:
            self._replies = []
        self._replies.append(status + b"\r\n")
        if b"\n" in self._reader._buffer:  # type: ignore[attr-defined]
            return
        replies, self._replies = self._replies, []
        self._writer.write(b"".join(replies))
        await self._writer.drain()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Plain ``<user@domain> PARAMS`` without aiosmtpd's costly general parser."""
        text = arg.strip()
        end = text.find(">")
        if text.startswith("<") and end > 0 and not _UNUSUAL.search(text, 1, end):
            # aiosmtpd spells the null sender "<>" (an empty address is a syntax error).
            return text[1:end] or "<>", text[end + 1 :].strip()
        return super()._getaddr(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """Read the message in large pieces into one buffer, instead of line by line.

        The size limit is enforced while reading, so an oversized message is never
        held in memory; it is refused with 552 5.3.4 once the client has sent it all.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._read_data()
        if content is None:
            await self.push(REPLY_TOO_BIG)
            self._set_post_data_state()
            return
        self.envelope.original_content = self.envelope.content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def _read_data(self) -> bytes | None:
        """The unstuffed message, or None when it exceeded the size limit."""
        # The limit is for the message itself: stuffing dots are not counted while reading
        # (a little slack covers the final "." line), and the unstuffed size is checked last.
        limit = self.data_size_limit or 0
        reading_limit = limit + 1024 if limit else 0
        buffer = bytearray()
        size = 0
        at_line_start = True
        while True:
            try:
                piece = await self._reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:
                piece = await self._reader.read(exc.consumed)
            except asyncio.IncompleteReadError as exc:
                raise ConnectionResetError("connection closed during DATA") from exc
            size += len(piece) - piece.count(b"\n..") - (at_line_start and piece[:2] == b"..")
            at_line_start = piece.endswith(b"\n")
            if reading_limit and size > reading_limit:
                # Keep only what is needed to see the end of the data.
                buffer = bytearray(buffer[-2:])
            buffer += piece
            end = len(buffer) - 3
            if piece.endswith(b".\r\n") and (
                (end == 0 and size == 3) or buffer[end - 2 : end] == b"\r\n"
            ):
                break
        if reading_limit and size > reading_limit:
            return None
        del buffer[-3:]
        if b"\n.." in buffer or buffer.startswith(b".."):
            buffer = buffer.replace(b"\r\n..", b"\r\n.")
            if buffer.startswith(b".."):
                del buffer[0]
        if limit and len(buffer) > limit:
            return None
        return bytes(buffer)

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        """Take the original client's name, address and HELO from Postfix."""
        attributes: dict[str, str] = getattr(self.session, "xforward", {})
        for item in (arg or "").split():
            name, _eq, value = item.partition("=")
            if name.upper() in XFORWARD_ATTRIBUTES and value not in (
                "[UNAVAILABLE]",
                "[TEMPUNAVAIL]",
            ):
                attributes[name.upper()] = _forwarded(name.upper(), value)
        self.session.xforward = attributes  # type: ignore[union-attr]
        await self.push("250 2.0.0 Ok")


class Handler:
    """aiosmtpd hooks that run the pipeline off the event loop."""

    def __init__(self, config: Config, pipeline: Pipeline, executor: ThreadPoolExecutor) -> None:
        self.config = config
        self.pipeline = pipeline
        self.executor = executor
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.counters = stats.Counters()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Advertise XFORWARD and PIPELINING (aiosmtpd already advertises SIZE)."""
        session.host_name = hostname
        last = responses.pop()
        responses.append("250-PIPELINING")
        responses.append("250-XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        responses.append(last)
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Refuse new transactions while shutting down and mail that declares itself too big."""
        if self.draining:
            return REPLY_SHUTTING_DOWN
        for option in options:
            name, _eq, value = option.partition("=")
            if (
                name.upper() == "SIZE"
                and value.isdigit()
                and int(value) > self.config.max_message_size
            ):
                return REPLY_TOO_BIG
        envelope.mail_from = address  # "<>" for the null sender, as aiosmtpd expects
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Take recipients as given, up to the per-transaction limit.

        Addresses are not rewritten: one outside our domains goes on exactly as Postfix
        sent it, and the next hop judges it.
        """
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return REPLY_TOO_MANY_RCPTS
        if not address or "@" not in address:
            return REPLY_BAD_RCPT
        if address not in envelope.rcpt_tos:
            envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Check the message and carry out each recipient's verdict."""
        self.in_flight += 1
        self.idle.clear()
        started = time.monotonic()
        try:
            reply = await self._process(session, envelope)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
        logs.event(
            log,
            "message.checked",
            sender=envelope.mail_from,
            rcpts=len(envelope.rcpt_tos),
            size=len(envelope.original_content or b""),
            reply=reply,
            seconds=round(time.monotonic() - started, 3),
        )
        return reply

    async def _process(self, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        raw: bytes = envelope.original_content or b""
        forwarded = getattr(session, "xforward", {})
        check_envelope = CheckEnvelope(
            sender="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            recipients=tuple(envelope.rcpt_tos),
            client_address=forwarded.get("ADDR") or None,
            client_helo=forwarded.get("HELO"),
            mail_options=tuple(o.upper() for o in envelope.mail_options),
            client_name=forwarded.get("NAME") or None,
        )
        job = _Job()
        future = loop.run_in_executor(self.executor, self._run, job, raw, check_envelope)
        try:
            outcome = await asyncio.wait_for(asyncio.shield(future), self.config.verdict_timeout)
        except TimeoutError:
            if job.abandon():
                log.error(
                    "checking a message from <%s> took longer than %ss",
                    envelope.mail_from,
                    self.config.verdict_timeout,
                )
                return REPLY_TIMEOUT
            # Delivery had already begun: only its own outcome may be reported.
            outcome = await future
        if isinstance(outcome, str):
            return outcome
        return await self._pass_on(raw, outcome, started)

    def _run(self, job: _Job, raw: bytes, envelope: CheckEnvelope) -> str | _Held:
        """Check, decide and quarantine unless the SMTP side gave up (one thread hop).

        Returns the reply when the message is done with (refused, or trouble), else
        what the event loop needs to pass the message on.
        """
        try:
            analysis = self.pipeline.analyze(raw, envelope)
            # Deciding may ask an external engine: still within the time limit.
            decisions = self.pipeline.decide(analysis)
        except EngineError as exc:
            log.warning("no verdict for a message from <%s>: %s", envelope.sender, exc)
            return REPLY_ENGINE_FAILED
        except SQLAlchemyError as exc:
            log.error("database failed: %s", str(exc).splitlines()[0])
            return REPLY_DB_FAILED
        except Exception:
            log.exception("checking a message from <%s> failed", envelope.sender)
            return REPLY_INTERNAL
        if not job.begin_delivery():
            return REPLY_TIMEOUT  # the client was told 451 already; nothing may happen now
        try:
            refused = self.pipeline.hold(raw, analysis, decisions)
        except StoreError as exc:
            log.error("store failed: %s", exc)
            return REPLY_STORE_FAILED
        except SQLAlchemyError as exc:
            log.error("database failed: %s", str(exc).splitlines()[0])
            return REPLY_DB_FAILED
        except Exception:
            log.exception("storing a message from <%s> failed", envelope.sender)
            return REPLY_INTERNAL
        return _Held(analysis, decisions, refused)

    async def _pass_on(self, raw: bytes, held: _Held, started: float) -> str:
        """Re-inject the passed copies on the event loop; count the verdicts once all went."""
        analysis, decisions = held.analysis, held.decisions
        if held.refused is None:
            try:
                await self.pipeline.pass_on(raw, analysis, decisions)
            except RelayError as exc:
                log.warning("relay refused a message from <%s>: %s", analysis.envelope.sender, exc)
                return REPLY_RELAY_FAILED if exc.temporary else f"{exc.code} {exc.text}"
            except Exception:
                log.exception("passing on a message from <%s> failed", analysis.envelope.sender)
                return REPLY_INTERNAL
        self.counters.verdicts(
            (
                (
                    stats.address_domain(d.recipient),
                    COUNTED[d.verdict],
                    [r["code"] for r in d.reasons] if d.verdict != "pass" else [],
                )
                for d in decisions
                if d.mailbox_id is not None
            ),
            time.monotonic() - started,
        )
        if held.refused is not None:
            return held.refused
        verdicts = ",".join(f"{d.verdict}" for d in decisions)
        return REPLY_OK.format(id=f"{len(raw)} bytes, {verdicts}")


def check_threads(pipeline: Pipeline) -> int:
    """Threads that check messages in one filter process.

    The embedded checks hold the GIL, so more threads than two only add switching
    (measured: 4 threads cost 10 % more CPU per message than 1); external engines
    wait on the network, where more threads keep more messages in flight.
    """
    return EXTERNAL_THREADS if pipeline.external else LOCAL_THREADS


def bind(config: Config) -> socket.socket:
    """The filter's listening socket, bound once by the parent and shared by its workers.

    Without SO_REUSEPORT, a second filter on the same address fails here instead of
    silently taking half of the mail.
    """
    listen = config.filter_listen
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        listener = socket.create_server((listen.host, listen.port), family=family, backlog=512)
    except OSError as exc:
        raise ConfigError(
            f"CLEANMAIL_FILTER_LISTEN: cannot listen on {listen}: {exc.strerror or exc}"
        ) from None
    listener.setblocking(False)
    return listener


async def serve(
    config: Config,
    pipeline: Pipeline,
    *,
    ready: Any = None,
    stop: asyncio.Event | None = None,
    listener: socket.socket | None = None,
) -> None:
    """Run the filter until ``stop`` is set (by default on SIGTERM or SIGINT), then drain."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=check_threads(pipeline), thread_name_prefix="check")
    handler = Handler(config, pipeline, executor)
    protocols: weakref.WeakSet[FilterSMTP] = weakref.WeakSet()

    def factory() -> FilterSMTP:
        protocol = FilterSMTP(
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.hostname,
            ident="Cleanmail",
            timeout=600,
        )
        protocols.add(protocol)
        return protocol

    listen = config.filter_listen
    if listener is None:
        listener = bind(config)
    server = await loop.create_server(factory, sock=listener)
    if stop is None:
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    flusher = stats.Flusher(handler.counters, pipeline.database)
    flusher.start()
    log.info("filter listening on %s, relaying to %s", listen, config.relay)
    if ready is not None:
        ready()
    await stop.wait()
    log.info("stopping: finishing %d messages in flight", handler.in_flight)
    handler.draining = True
    server.close()
    try:
        await asyncio.wait_for(handler.idle.wait(), timeout=config.verdict_timeout + 60)
    except TimeoutError:
        log.error("gave up waiting for %d messages in flight", handler.in_flight)
    for protocol in list(protocols):
        if protocol.transport is not None:
            # Whoever is still connected hears why, and Postfix tries again later.
            protocol.transport.write(f"{REPLY_SHUTTING_DOWN}\r\n".encode())
            protocol.transport.close()
    await server.wait_closed()
    executor.shutdown(wait=False, cancel_futures=True)
    flusher.stop()
    log.info("filter stopped")
