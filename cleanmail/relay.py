"""Re-injection over SMTP to the mail server's after-filter port.

One connection per thread is kept open between messages, since opening one per
message would cost more than the filtering itself.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import threading
from collections.abc import Sequence

from cleanmail.config import Endpoint

log = logging.getLogger(__name__)

BLOCK = 256 * 1024
PASSED_OPTIONS = {"8bitmime": "BODY=8BITMIME", "smtputf8": "SMTPUTF8"}


class RelayError(Exception):
    """The relay did not take a message; ``code`` is its SMTP reply code (451 when unreachable)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text

    @property
    def temporary(self) -> bool:
        """True when the sending server should try again later."""
        return self.code < 500


class Relay:
    """Sends messages to one SMTP server, reusing a connection per thread."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 60.0, hostname: str = "") -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.hostname = hostname or socket.getfqdn()
        self._local = threading.local()

    def send(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        prefix: bytes = b"",
        options: Sequence[str] = (),
    ) -> None:
        """Deliver ``prefix + data`` to all recipients, or raise RelayError.

        Every recipient is accepted before DATA is sent, so a refusal of some never
        delivers to the others (a retry of the whole message cannot double them).
        """
        for attempt in (1, 2):
            client = self._connection()
            try:
                self._transaction(client, sender, recipients, (prefix, data), options)
                return
            except smtplib.SMTPServerDisconnected as exc:
                self._close()
                if attempt == 1:
                    continue  # a cached connection that the server timed out; one fresh try
                raise RelayError(451, f"4.4.2 relay closed the connection: {exc}") from exc
            except RelayError:
                self._reset(client)
                raise
            except (OSError, smtplib.SMTPException) as exc:
                self._close()
                raise RelayError(451, f"4.4.1 relay {self.endpoint} unavailable: {exc}") from exc
            except UnicodeError as exc:
                # An address that is not ASCII, in a transaction without SMTPUTF8.
                self._close()
                raise RelayError(553, "5.6.7 address not allowed without SMTPUTF8") from exc
            except BaseException:
                self._close()  # a connection in an unknown state must not serve the next one
                raise

    def _transaction(
        self,
        client: smtplib.SMTP,
        sender: str,
        recipients: Sequence[str],
        chunks: Sequence[bytes],
        options: Sequence[str],
    ) -> None:
        mail_options = [
            option
            for extension, option in PASSED_OPTIONS.items()
            if option in options and client.has_extn(extension)
        ]
        client.command_encoding = "utf-8" if "SMTPUTF8" in mail_options else "ascii"
        code, reply = client.mail(sender, mail_options)
        if code != 250:
            raise RelayError(code, reply_text(reply))
        refused = {}
        for recipient in recipients:
            code, reply = client.rcpt(recipient)
            if code not in (250, 251):
                refused[recipient] = (code, reply)
        if refused:
            raise refusal(refused, partial=len(refused) < len(recipients))
        code, reply = client.docmd("DATA")
        if code != 354:
            raise RelayError(code, reply_text(reply))
        _write_data(client, chunks)
        code, reply = client.getreply()
        if code != 250:
            raise RelayError(code, reply_text(reply))

    def _connection(self) -> smtplib.SMTP:
        client: smtplib.SMTP | None = getattr(self._local, "client", None)
        if client is not None:
            return client
        try:
            client = smtplib.SMTP(
                self.endpoint.host,
                self.endpoint.port,
                local_hostname=self.hostname,
                timeout=self.timeout,
            )
            # Without this, the small final ".\r\n" waits ~40 ms on Nagle and delayed ACK.
            client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.ehlo()
        except (OSError, smtplib.SMTPException) as exc:
            raise RelayError(451, f"4.4.1 relay {self.endpoint} unavailable: {exc}") from exc
        self._local.client = client
        return client

    def _reset(self, client: smtplib.SMTP) -> None:
        try:
            client.rset()
        except (OSError, smtplib.SMTPException):
            self._close()

    def _close(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            try:
                client.close()
            except OSError as exc:
                log.debug("closing relay connection: %s", exc)

    def close(self) -> None:
        """Close this thread's connection."""
        self._close()


def _write_data(client: smtplib.SMTP, chunks: Sequence[bytes]) -> None:
    """Send the message body dot-stuffed, a block at a time, without copying it whole."""
    sock = client.sock
    if sock is None:
        raise smtplib.SMTPServerDisconnected("relay connection closed")
    at_line_start = True
    last = b"\n"
    for chunk in chunks:
        view = memoryview(chunk)
        for start in range(0, len(view), BLOCK):
            block = bytes(view[start : start + BLOCK])
            if not block:
                continue
            # Postfix also ends a line at a bare LF, so a dot after any LF is stuffed.
            block = block.replace(b"\n.", b"\n..")
            if at_line_start and block.startswith(b"."):
                block = b"." + block
            sock.sendall(block)
            last = block[-1:]
            at_line_start = last == b"\n"
    sock.sendall(b".\r\n" if last == b"\n" else b"\r\n.\r\n")


def reply_text(value: bytes | str) -> str:
    """A reply's text on one line, at most 400 characters."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return " ".join(text.split())[:400]


def refusal(refused: dict, *, partial: bool = False) -> RelayError:
    """The error for refused recipients: 451 when some were taken or any refusal was temporary."""
    codes = [code for code, _text_ in refused.values()]
    first_code, first_text = next(iter(refused.values()))
    if partial or any(code < 500 for code in codes):
        return RelayError(
            451, f"4.4.0 relay refused {len(refused)} recipients: {reply_text(first_text)}"
        )
    return RelayError(first_code, reply_text(first_text))
