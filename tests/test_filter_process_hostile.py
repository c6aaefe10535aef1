"""Hostile messages through ``cleanmail filter`` as its own process, with a trained classifier.

Every message must be answered within a small share of the verdict timeout: a
message that takes the whole timeout gets 451 each time Postfix retries it, and
keeps a worker busy for nothing.
"""

from __future__ import annotations

import base64
import io
import smtplib
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from cleanmail import audit, mailboxes
from cleanmail.models import Mailbox, Message
from tests.conftest import FilterProcess
from tests.messages import GTUBE, message
from tests.test_filter_hostile import raw_session
from tests.test_mime import nested

ACTOR = audit.Actor("operator", "test")
HEAD = b"From: a@example.com\r\nTo: ola@example.no\r\nSubject: hostile\r\n"
# Well within the tests' 10 s verdict timeout, with room for a loaded machine.
QUICK = 4.0


def multipart(parts: list[bytes]) -> bytes:
    """A multipart/mixed body of the given parts (headers and body each)."""
    lines = [b"Content-Type: multipart/mixed; boundary=B\r\n"]
    lines += [b"\r\n--B\r\n" + part for part in parts]
    return b"".join(lines) + b"\r\n--B--\r\n"


def zip_bomb() -> bytes:
    """100 MiB of zeros in a zip of about 100 KiB."""
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.txt", b"\0" * (100 * 1024 * 1024))
    return data.getvalue()


def attachment(name: bytes, data: bytes, ctype: bytes) -> bytes:
    """A base64 attachment part."""
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (
        b"Content-Type: "
        + ctype
        + b"; name="
        + name
        + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + encoded
    )


def rfc822_chain(depth: int) -> bytes:
    """A message inside a message, ``depth`` times."""
    raw = HEAD + b"\r\nhi\r\n"
    for _level in range(depth):
        raw = HEAD + b"Content-Type: message/rfc822\r\n\r\n" + raw
    return raw


HOSTILE = {
    "utf-7": HEAD + b'Content-Type: text/plain; charset="utf-7"\r\n\r\n+AGEAYgBj-\r\n',
    "unknown-charset": HEAD + b"Content-Type: text/plain; charset=x-unknown\r\n\r\n\xe6\xf8\r\n",
    "huge-charset": HEAD + b"Content-Type: text/plain; charset=" + b"x" * 60000 + b"\r\n\r\nx\r\n",
    "nul-in-headers-and-body": b"From: a@example.com\r\nSubject: a\x00b\r\n"
    b"X-\x00: \x00\r\n\r\n\x00\r\n",
    "8bit-headers": b"From: \xc3\xa6@example.com\r\nSubject: \xe6\xf8\xe5 \xff\r\n\r\nbody\r\n",
    "nested-10000": nested(10000),
    "parts-100000": HEAD + multipart([b"Content-Type: text/plain\r\n\r\nx"] * 100000),
    "header-line-1mb": HEAD + b"X-Long: " + b"a" * 1_000_000 + b"\r\n\r\nbody\r\n",
    "headers-100000": HEAD + b"".join(b"X-H%d: v\r\n" % n for n in range(100000)) + b"\r\nx\r\n",
    # The email package reads parameters in quadratic time: 0.5 MB of them took 6 s.
    "content-type-params": HEAD
    + b"Content-Type: text/plain; "
    + b"a=b; " * 180000
    + b"\r\n\r\nx\r\n",
    "disposition-params": HEAD + b"Content-Type: application/octet-stream\r\n"
    b"Content-Disposition: attachment; " + b"a=b; " * 180000 + b"\r\n\r\nx\r\n",
    "rfc2231-continuations": HEAD
    + b"Content-Type: application/octet-stream; "
    + b"".join(b"name*%d=a; " % n for n in range(60000))
    + b"\r\n\r\nx\r\n",
    "base64-garbage": HEAD + b"Content-Transfer-Encoding: base64\r\n\r\n" + b"!*=" * 200000,
    "qp-garbage": HEAD + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + b"=Z=\r\n" * 9999,
    "broken-boundary": HEAD + b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\nx\r\n',
    "message-rfc822-3000": rfc822_chain(3000),
    "zip-bomb": HEAD + multipart([attachment(b"a.zip", zip_bomb(), b"application/zip")]),
    "bare-lf": b"From: a@example.com\nTo: ola@example.no\nSubject: lf\n\nline\n",
    "lines-over-1000": HEAD + b"\r\n" + (b"y" * 5000 + b"\r\n") * 200,
    "empty": b"",
    "only-headers": HEAD,
}


@pytest.fixture
def trained_filter(config, database, tmp_path: Path):
    """A served domain, a classifier trained by ``cleanmail engine train``, the filter running."""
    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, ACTOR, "example.no")
    folders = {kind: tmp_path / kind for kind in ("ham", "spam")}
    for n in range(12):
        folders["ham"].mkdir(exist_ok=True)
        folders["spam"].mkdir(exist_ok=True)
        (folders["ham"] / f"{n}.eml").write_bytes(
            message(subject=f"Minutes of meeting {n}", body=f"Agenda item {n} and lunch.\n")
        )
        (folders["spam"] / f"{n}.eml").write_bytes(
            message(subject=f"Cheap pills {n}", body=f"Buy viagra now, offer {n}!!!\n")
        )
    process = FilterProcess(config)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cleanmail",
            "engine",
            "train",
            "--ham",
            str(folders["ham"]),
            "--spam",
            str(folders["spam"]),
        ],
        env=process.environment(),
        check=True,
        capture_output=True,
    )
    config.store_dir.mkdir(parents=True, exist_ok=True)
    process.start()
    yield process
    assert process.stop() == 0


def send(port: int, raw: bytes, rcpt: str = "ola@example.no") -> tuple[int, float]:
    """The reply code to one message and the seconds it took after the data was sent."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("x")
        client.mail("a@example.com")
        client.rcpt(rcpt)
        started = time.monotonic()
        code = client.data(raw)[0]
        return code, time.monotonic() - started


def test_hostile_messages_are_answered_quickly_by_the_filter_process(trained_filter):
    port = trained_filter.config.filter_listen.port
    answers = {name: send(port, raw) for name, raw in HOSTILE.items()}
    slow = {name: round(took, 1) for name, (_code, took) in answers.items() if took > QUICK}
    assert slow == {}
    assert {name: code for name, (code, _took) in answers.items()} == dict.fromkeys(HOSTILE, 250)
    assert trained_filter.process.poll() is None


GTUBE_MAIL = b"Subject: x\r\n\r\n" + GTUBE.encode() + b"\r\n"
ENVELOPES = {
    "smtputf8": (
        b"MAIL FROM:<send\xc3\xa9r@ex\xc3\xa4mple.com> SMTPUTF8",
        b"\xc3\xa6\xc3\xb8@example.no",
    ),
    "nul-in-sender": (b"MAIL FROM:<a\x00b@example.com>", b"ola@example.no"),
    "8bit-sender-without-smtputf8": (b"MAIL FROM:<\xff\xfe@example.com>", b"ola@example.no"),
    "upper-case-recipient": (b"MAIL FROM:<>", b"OLA@EXAMPLE.NO"),
}


def test_hostile_envelopes_are_held_in_the_recipients_mailbox(trained_filter, database):
    port = trained_filter.config.filter_listen.port
    replies = {
        name: raw_session(
            port,
            [b"EHLO mx", mail_from, b"RCPT TO:<" + rcpt + b">", b"DATA"],
            b"X-Case: " + name.encode() + b"\r\n" + GTUBE_MAIL,
        )[-1][:3]
        for name, (mail_from, rcpt) in ENVELOPES.items()
    }
    assert replies == dict.fromkeys(ENVELOPES, b"250")
    with database.session_scope() as session:
        held = session.execute(
            select(Mailbox.address, Message.envelope_sender).join(Message.mailbox)
        ).all()
    assert sorted(address for address, _sender in held) == [
        "ola@example.no",
        "ola@example.no",
        "ola@example.no",
        "æø@example.no",
    ]
    # Stored without NUL (PostgreSQL refuses it) and without lone surrogates.
    for _address, sender in held:
        assert "\x00" not in sender
        sender.encode("utf-8")
