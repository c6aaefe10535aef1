"""The relay as the report senders use it: SMTP PIPELINING (RFC 2920) where the server offers it.

A report is one small transaction, and without pipelining each of MAIL, RCPT and DATA
waits for its own reply: four round trips a report, each a wake-up of a sender thread.
Pipelined, MAIL, RCPT and DATA go in one write and their replies are read together,
then the message: two round trips. Errors, retries and reconnects are ``Relay``'s.
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence

from cleanmail import relay as relay_module
from cleanmail.relay import Relay, RelayError


class PipelinedRelay(Relay):
    """A ``Relay`` that sends the envelope pipelined when the server offers PIPELINING."""

    def _transaction(
        self,
        client: smtplib.SMTP,
        sender: str,
        recipients: Sequence[str],
        chunks: Sequence[bytes],
        options: Sequence[str],
    ) -> None:
        if not client.has_extn("pipelining"):
            super()._transaction(client, sender, recipients, chunks, options)
            return
        mail_options = [
            option
            for extension, option in relay_module.PASSED_OPTIONS.items()
            if option in options and client.has_extn(extension)
        ]
        client.command_encoding = "utf-8" if "SMTPUTF8" in mail_options else "ascii"
        envelope = [f"MAIL FROM:{smtplib.quoteaddr(sender)}{_options(mail_options)}"]
        envelope += [f"RCPT TO:{smtplib.quoteaddr(recipient)}" for recipient in recipients]
        client.send("\r\n".join([*envelope, "DATA", ""]))
        # Every reply is read, whatever the first said, so that the connection stays in step.
        mail = client.getreply()
        refused = {}
        for recipient in recipients:
            code, reply = client.getreply()
            if code not in (250, 251):
                refused[recipient] = (code, reply)
        data = client.getreply()
        if mail[0] != 250 or refused or data[0] != 354:
            if data[0] == 354:  # a server that took DATA anyway: drop the connection, and
                client.close()  # the message with it (an empty one ended would be delivered)
            if mail[0] != 250:
                raise RelayError(mail[0], relay_module.reply_text(mail[1]))
            if refused:
                raise relay_module.refusal(refused, partial=len(refused) < len(recipients))
            raise RelayError(data[0], relay_module.reply_text(data[1]))
        relay_module._write_data(client, chunks)
        code, reply = client.getreply()
        if code != 250:
            raise RelayError(code, relay_module.reply_text(reply))


def pipelined(relay: Relay) -> PipelinedRelay:
    """A pipelining relay to the same server, with connections of its own."""
    if isinstance(relay, PipelinedRelay):
        return relay
    return PipelinedRelay(relay.endpoint, timeout=relay.timeout, hostname=relay.hostname)


def _options(options: Sequence[str]) -> str:
    return "".join(f" {option}" for option in options)
