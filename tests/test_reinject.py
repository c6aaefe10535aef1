"""The filter's re-injection from the event loop, against a real SMTP server.

Every test runs with the next hop offering PIPELINING (as Postfix does) and without it
(aiosmtpd's default), so that both ways of sending the envelope are covered.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from cleanmail.config import Endpoint
from cleanmail.filter.reinject import Reinjector
from cleanmail.relay import RelayError
from tests.servers import SmtpSink, free_port

RAW = b"From: a@example.org\r\nSubject: hi\r\n\r\n.leading dot\r\n..two\r\nend\r\n"


@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
def sink(request: pytest.FixtureRequest) -> Iterator[SmtpSink]:
    """A recording SMTP server, offering PIPELINING or not."""
    with SmtpSink(pipelining=request.param) as server:
        yield server


def reinjector(port: int, timeout: float = 5.0) -> Reinjector:
    return Reinjector(Endpoint("127.0.0.1", port), timeout=timeout, hostname="filter.test")


def send(relay: Reinjector, *args: object, **kwargs: object) -> None:
    asyncio.run(_send_and_close(relay, *args, **kwargs))


async def _send_and_close(relay: Reinjector, *args: object, **kwargs: object) -> None:
    try:
        await relay.send(*args, **kwargs)  # type: ignore[arg-type]
    finally:
        await relay.close()


def test_delivers_the_bytes_with_the_prefix_and_dots_intact(sink):
    send(reinjector(sink.port), "a@example.org", ["b@example.no"], RAW, prefix=b"X-Added: 1\r\n")
    (received,) = sink.wait_for(1)
    assert received.mail_from == "a@example.org"
    assert received.rcpt_tos == ["b@example.no"]
    assert received.data == b"X-Added: 1\r\n" + RAW


def test_null_sender_goes_as_empty_path(sink):
    send(reinjector(sink.port), "", ["b@example.no"], RAW)
    assert sink.wait_for(1)[0].mail_from == "<>"


def test_many_messages_share_one_connection(sink):
    relay = reinjector(sink.port)

    async def several() -> None:
        for number in range(5):
            await relay.send("a@example.org", [f"b{number}@example.no"], RAW)
        assert len(relay._idle) == 1
        await relay.close()

    asyncio.run(several())
    assert len(sink.wait_for(5)) == 5


def test_one_refused_recipient_delivers_to_none_and_says_451(sink):
    sink.refuse_rcpt["gone@example.no"] = "550 5.1.1 no such user"
    relay = reinjector(sink.port)

    async def refused_then_fine() -> None:
        with pytest.raises(RelayError) as caught:
            await relay.send("a@example.org", ["b@example.no", "gone@example.no"], RAW)
        assert caught.value.code == 451 and "no such user" in caught.value.text
        # The connection (or a new one) serves the next message.
        await relay.send("a@example.org", ["b@example.no"], RAW)
        await relay.close()

    asyncio.run(refused_then_fine())
    (received,) = sink.wait_for(1)
    assert received.rcpt_tos == ["b@example.no"]
    time.sleep(0.2)
    assert len(sink.messages) == 1


def test_every_recipient_refused_passes_the_code_back(sink):
    sink.refuse_rcpt["gone@example.no"] = "550 5.1.1 no such user"
    with pytest.raises(RelayError) as caught:
        send(reinjector(sink.port), "a@example.org", ["gone@example.no"], RAW)
    assert caught.value.code == 550 and not caught.value.temporary
    assert sink.messages == []


def test_refused_data_is_passed_back(sink):
    sink.refuse = "554 5.7.1 no thanks"
    with pytest.raises(RelayError) as caught:
        send(reinjector(sink.port), "a@example.org", ["b@example.no"], RAW)
    assert (caught.value.code, caught.value.text) == (554, "5.7.1 no thanks")


def test_non_ascii_address_without_smtputf8_is_refused_for_good(sink):
    with pytest.raises(RelayError) as caught:
        send(reinjector(sink.port), "a@example.org", ["bø@example.no"], RAW)
    assert caught.value.code == 553


def test_smtputf8_is_passed_on_when_the_client_used_it(sink):
    send(reinjector(sink.port), "å@example.org", ["bø@example.no"], RAW, options=["SMTPUTF8"])
    (received,) = sink.wait_for(1)
    assert received.rcpt_tos == ["bø@example.no"]


def test_relay_down_is_451():
    with pytest.raises(RelayError) as caught:
        send(reinjector(free_port()), "a@example.org", ["b@example.no"], RAW)
    assert caught.value.code == 451 and caught.value.temporary


def test_a_kept_connection_the_server_closed_is_replaced_once():
    with SmtpSink(pipelining=True, timeout=0.3) as sink:
        relay = reinjector(sink.port)

        async def twice() -> None:
            await relay.send("a@example.org", ["b@example.no"], RAW)
            await asyncio.sleep(0.8)  # the server says 421 and hangs up meanwhile
            await relay.send("a@example.org", ["c@example.no"], RAW)
            await relay.close()

        asyncio.run(twice())
        assert [m.rcpt_tos for m in sink.wait_for(2)] == [["b@example.no"], ["c@example.no"]]


def test_a_relay_that_never_answers_times_out_with_451():
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(RelayError) as caught:
            send(reinjector(listener.getsockname()[1], timeout=0.3), "a@x.org", ["b@x.no"], RAW)
        assert caught.value.code == 451
        assert time.monotonic() - started < 5
    finally:
        for connection in accepted:
            connection.close()
        listener.close()
