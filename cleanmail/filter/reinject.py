"""Re-injection of passed mail from the filter's event loop, with SMTP pipelining.

``cleanmail.relay.Relay`` sends from a thread with smtplib: a thread hop and three
blocking round trips per message. The filter passes most of its mail, so it sends
from the event loop instead, over connections kept open between messages, with the
envelope pipelined where the next hop offers PIPELINING (Postfix does). The rules
are Relay's: every recipient is accepted before the data goes, a refusal raises
RelayError with the next hop's code, and any trouble reaching it is a 451.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence

from cleanmail.config import Endpoint
from cleanmail.relay import BLOCK, PASSED_OPTIONS, RelayError, refusal, reply_text

log = logging.getLogger(__name__)

KEEP = 16  # idle connections kept per process
IDLE_SECONDS = 30.0  # a connection idle longer is closed rather than reused (Postfix: 300 s)
LINE_LIMIT = 64 * 1024


class _Closed(Exception):
    """The next hop closed the connection (or said 421) before answering."""


class _Abandoned(Exception):
    """A refusal that left the connection in the middle of DATA: it must be closed."""

    def __init__(self, error: RelayError) -> None:
        super().__init__(str(error))
        self.error = error


class _Broken(ConnectionError):
    """The next hop's reply was not SMTP: the connection cannot be trusted any more."""


class _Connection:
    """One SMTP connection to the next hop, after EHLO."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.extensions: set[str] = set()
        self.used = time.monotonic()
        self.answered = False  # whether the current transaction has had a reply yet
        self.lines: list[bytes] = []  # the last reply's lines, without code and line end

    async def reply(self, timeout: float) -> tuple[int, str]:
        """The next (possibly multi-line) reply: its code and its text."""
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    line = await self.reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    raise _Closed("connection closed") from exc
                code = line[:3]
                if not code.isdigit() or len(line) < 5:
                    raise _Broken(f"bad reply {reply_text(line)!r}")
                lines.append(line[4:])
                if line[3:4] != b"-":
                    break
        self.lines = lines
        if code == b"421" and not self.answered:
            raise _Closed(reply_text(b" ".join(lines)))
        self.answered = True
        return int(code), reply_text(b" ".join(lines))

    async def command(self, line: bytes, timeout: float) -> tuple[int, str]:
        """Send one command line and read its reply."""
        self.writer.write(line)
        return await self.reply(timeout)

    def close(self) -> None:
        """Close without a word: used when the connection's state is unknown."""
        self.writer.close()


class Reinjector:
    """Sends passed messages to one SMTP server from the event loop."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 60.0, hostname: str = "") -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.hostname = hostname or socket.getfqdn()
        self._idle: list[_Connection] = []

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        prefix: bytes = b"",
        options: Sequence[str] = (),
    ) -> None:
        """Deliver ``prefix + data`` to all recipients, or raise RelayError."""
        for attempt in (1, 2):
            connection, reused = self._take(), True
            if connection is None:
                connection, reused = await self._open(), False
            try:
                await self._transaction(connection, sender, recipients, (prefix, data), options)
            except _Closed as exc:
                connection.close()
                if reused and attempt == 1 and not connection.answered:
                    continue  # a kept connection that the server had closed: one fresh try
                raise RelayError(451, f"4.4.2 relay closed the connection: {exc}") from None
            except RelayError:
                await self._reset(connection)
                raise
            except _Abandoned as exc:
                connection.close()
                raise exc.error from None
            except OSError as exc:  # TimeoutError included
                connection.close()
                raise RelayError(
                    451, f"4.4.1 relay {self.endpoint} unavailable: {exc or 'timed out'}"
                ) from exc
            except UnicodeError as exc:
                connection.close()
                raise RelayError(553, "5.6.7 address not allowed without SMTPUTF8") from exc
            except BaseException:
                connection.close()  # cancelled, or worse: its state is unknown
                raise
            self._keep(connection)
            return

    async def close(self) -> None:
        """Say QUIT on every kept connection."""
        idle, self._idle = self._idle, []
        for connection in idle:
            try:
                await connection.command(b"QUIT\r\n", 5.0)
            except (OSError, _Closed) as exc:
                log.debug("closing relay connection: %s", exc)
            connection.close()

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.used < IDLE_SECONDS and not connection.reader.at_eof():
                return connection
            connection.close()
        return None

    def _keep(self, connection: _Connection) -> None:
        connection.used = time.monotonic()
        if len(self._idle) < KEEP:
            self._idle.append(connection)
        else:
            connection.close()

    async def _open(self) -> _Connection:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(
                    self.endpoint.host, self.endpoint.port, limit=LINE_LIMIT
                )
        except OSError as exc:
            raise RelayError(
                451, f"4.4.1 relay {self.endpoint} unavailable: {exc or 'timed out'}"
            ) from exc
        connection = _Connection(reader, writer)
        try:
            code, text = await connection.reply(self.timeout)
            if code == 220:
                code, text = await connection.command(
                    f"EHLO {self.hostname}\r\n".encode("ascii", "replace"), self.timeout
                )
        except (OSError, _Closed) as exc:
            connection.close()
            raise RelayError(
                451, f"4.4.1 relay {self.endpoint} unavailable: {exc or 'timed out'}"
            ) from exc
        except BaseException:
            connection.close()
            raise
        if code != 250:
            connection.close()
            raise RelayError(451, f"4.4.1 relay {self.endpoint} unavailable: {code} {text}")
        # One extension per line after the greeting: "PIPELINING", "SIZE 10240000", ...
        connection.extensions = {
            line.split()[0].decode("ascii", "replace").lower()
            for line in connection.lines[1:]
            if line.split()
        }
        connection.answered = False
        return connection

    async def _transaction(
        self,
        connection: _Connection,
        sender: str,
        recipients: Sequence[str],
        chunks: Sequence[bytes],
        options: Sequence[str],
    ) -> None:
        connection.answered = False
        mail_options = [
            option
            for extension, option in PASSED_OPTIONS.items()
            if option in options and extension in connection.extensions
        ]
        encoding = "utf-8" if "SMTPUTF8" in mail_options else "ascii"
        addresses = [sender.strip("<>"), *recipients]
        if any("\r" in a or "\n" in a for a in addresses):
            raise RelayError(553, "5.1.3 address with a line break refused")
        lines = [
            "".join([f"MAIL FROM:<{addresses[0]}>", *(f" {o}" for o in mail_options), "\r\n"]),
            *(f"RCPT TO:<{recipient}>\r\n" for recipient in recipients),
        ]
        encoded = [line.encode(encoding) for line in lines]
        pipelining = "pipelining" in connection.extensions
        if pipelining:
            # MAIL, every RCPT and DATA in one write, as Postfix does (RFC 2920).
            connection.writer.write(b"".join(encoded) + b"DATA\r\n")
            replies = [await connection.reply(self.timeout) for _line in range(len(encoded) + 1)]
        else:
            replies = [await connection.command(line, self.timeout) for line in encoded]
        code, text = replies[0]
        refused = {
            recipient: reply
            for recipient, reply in zip(recipients, replies[1:], strict=False)
            if reply[0] not in (250, 251)
        }
        if code != 250 or refused:
            error = (
                RelayError(code, text)
                if code != 250
                else refusal(refused, partial=len(refused) < len(recipients))
            )
            if pipelining and replies[-1][0] == 354:
                # The server now waits for data that must not reach the others: only
                # hanging up ends the transaction without delivering it.
                raise _Abandoned(error)
            raise error
        if pipelining:
            code, text = replies[-1]
        else:
            code, text = await connection.command(b"DATA\r\n", self.timeout)
        if code != 354:
            raise RelayError(code, text)
        await self._write_data(connection, chunks)
        code, text = await connection.reply(self.timeout)
        if code != 250:
            raise RelayError(code, text)

    async def _write_data(self, connection: _Connection, chunks: Sequence[bytes]) -> None:
        """The message dot-stuffed (as Relay does) and its terminator, a block per write."""
        writer = connection.writer
        pending: list[bytes] = []
        size = 0
        at_line_start, last = True, b"\n"
        for chunk in chunks:
            view = memoryview(chunk)
            for start in range(0, len(view), BLOCK):
                block = bytes(view[start : start + BLOCK]).replace(b"\n.", b"\n..")
                if not block:
                    continue
                if at_line_start and block.startswith(b"."):
                    block = b"." + block
                pending.append(block)
                size += len(block)
                last = block[-1:]
                at_line_start = last == b"\n"
                if size >= BLOCK:
                    writer.write(b"".join(pending))
                    pending, size = [], 0
                    async with asyncio.timeout(self.timeout):
                        await writer.drain()
        pending.append(b".\r\n" if last == b"\n" else b"\r\n.\r\n")
        writer.write(b"".join(pending))

    async def _reset(self, connection: _Connection) -> None:
        """RSET after a refusal so the connection serves the next message, else close it."""
        try:
            code, _text = await connection.command(b"RSET\r\n", self.timeout)
        except (OSError, _Closed):
            code = 0
        if code == 250:
            self._keep(connection)
        else:
            connection.close()
