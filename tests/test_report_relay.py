"""The report senders' pipelining relay against an SMTP server that offers PIPELINING."""

from __future__ import annotations

import pytest

from cleanmail import report_relay
from cleanmail.config import Endpoint
from cleanmail.relay import Relay, RelayError
from tests.servers import SmtpSink

MESSAGE = b"Subject: hello\r\n\r\n.a line with a leading dot\r\nbody\r\n"


class PipeliningSink(SmtpSink):
    """The test sink, offering PIPELINING (as Postfix does) and refusing ``refused@`` addresses."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        """Offer PIPELINING, and count the connections."""
        self.sessions += 1
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        """Refuse the recipients whose address starts with ``refused``."""
        if address.startswith("refused"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"


@pytest.fixture
def sink():
    """A pipelining sink on loopback."""
    server = PipeliningSink().start()
    yield server
    server.stop()


@pytest.fixture
def relay(sink):
    """The pipelining relay to the sink."""
    plain = Relay(Endpoint("127.0.0.1", sink.port), timeout=10)
    running = report_relay.pipelined(plain)
    yield running
    running.close()


def test_messages_go_out_pipelined_on_one_connection(sink, relay):
    """Several messages over one kept connection, with the envelope pipelined, dots intact."""
    for n in range(3):
        relay.send("", [f"user{n}@example.no"], MESSAGE)
    received = sink.wait_for(3)
    assert [message.rcpt_tos for message in received] == [[f"user{n}@example.no"] for n in range(3)]
    assert all(message.mail_from == "<>" for message in received)
    assert received[0].data.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")
    assert sink.sessions == 1
    assert relay._connection().has_extn("pipelining")


def test_a_refused_recipient_raises_and_the_connection_stays_in_step(sink, relay):
    """A refusal read from the pipelined replies is an error; the next message still goes out."""
    with pytest.raises(RelayError) as refused:
        relay.send("", ["refused@example.no"], MESSAGE)
    assert refused.value.code == 550
    assert sink.messages == []
    relay.send("", ["next@example.no"], MESSAGE)
    assert [message.rcpt_tos for message in sink.wait_for(1)] == [["next@example.no"]]


def test_a_partly_refused_envelope_delivers_to_nobody(sink, relay):
    """One refused recipient of two: nothing delivered (a retry cannot double it), a 4xx."""
    with pytest.raises(RelayError) as refused:
        relay.send("", ["ok@example.no", "refused@example.no"], MESSAGE)
    assert refused.value.temporary
    relay.send("", ["after@example.no"], MESSAGE)
    assert [message.rcpt_tos for message in sink.wait_for(1)] == [["after@example.no"]]


def test_a_refused_message_is_a_temporary_error_then_the_next_goes_out(sink, relay):
    """The DATA refusal comes back as the relay's code; the connection serves the next one."""
    sink.refuse = "451 4.3.0 try later"
    with pytest.raises(RelayError) as refused:
        relay.send("", ["user@example.no"], MESSAGE)
    assert refused.value.code == 451 and refused.value.temporary
    sink.refuse = None
    relay.send("", ["user@example.no"], MESSAGE)
    assert len(sink.wait_for(1)) == 1
