"""A demo mailbox with a few held messages, so a first look at Cleanmail shows something.

Production installations never need this. Running it again adds nothing.
"""

from __future__ import annotations

import io
import zipfile
from email.message import EmailMessage
from email.policy import SMTP

from sqlalchemy import select
from sqlalchemy.orm import Session

from cleanmail import audit, mailboxes, mime, quarantine
from cleanmail.filter import pipeline, rules
from cleanmail.filter.engines import Envelope
from cleanmail.models import Domain, Mailbox, Message
from cleanmail.store import Store

DOMAIN = "demo.example"
ADDRESS = f"ola.nordmann@{DOMAIN}"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _message(
    sender: str,
    subject: str,
    day: int,
    text: str,
    html: str | None = None,
    attachment: tuple[str, bytes] | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = f"Ola Nordmann <{ADDRESS}>"
    msg["Subject"] = subject
    msg["Date"] = f"Mon, {day:02d} Nov 2026 09:{day:02d}:00 +0100"
    msg["Message-ID"] = f"<demo-{day}@{DOMAIN}>"
    msg.set_content(text)
    if html:
        msg.add_alternative(html, subtype="html")
    if attachment:
        msg.add_attachment(
            attachment[1], maintype="application", subtype="zip", filename=attachment[0]
        )
    return msg.as_bytes(policy=SMTP)


def _zip_with_program() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("Faktura_2026-11.pdf.exe", b"MZ" + b"\0" * 62)
    return buffer.getvalue()


def samples() -> list[bytes]:
    """The demo messages: a lottery, an invoice carrying a program, a loud newsletter."""
    return [
        _message(
            "Gevinstavdelingen <vinner@lotteri.example>",
            "Gratulerer! Du har vunnet 1 000 000 kr",
            2,
            f"Klikk her for å hente premien din i dag!\n{GTUBE}\n",
        ),
        _message(
            "Regnskap <faktura@leverandor.example>",
            "Faktura november",
            9,
            "Vedlagt er fakturaen for november.\n",
            attachment=("Faktura.zip", _zip_with_program()),
        ),
        _message(
            "Nettbutikken <nyhetsbrev@butikk.example>",
            "SALG!!! Opptil 70 % rabatt - KUN I DAG",
            15,
            "Se ukens tilbud på nett. Klikk her: http://192.0.2.10/tilbud\n",
            "<html><body><h1>SALG!!!</h1><p>Opptil <b>70 %</b> rabatt. Kun i dag!</p>"
            '<img src="https://butikk.example/banner.png" alt="Banner">'
            '<p><a href="http://192.0.2.10/tilbud">https://butikk.example/tilbud</a></p>'
            "</body></html>",
        ),
    ]


def create(session: Session, store: Store, *, retention_days: int) -> Mailbox:
    """The demo domain and mailbox, with its sample messages the first time."""
    actor = audit.Actor("system", "demo")
    if session.scalar(select(Domain).where(Domain.name == DOMAIN)) is None:
        mailboxes.add_domain(session, actor, DOMAIN)
    mailbox = session.scalar(select(Mailbox).where(Mailbox.address == ADDRESS))
    if mailbox is None:
        mailbox = mailboxes.add_mailbox(session, actor, ADDRESS, language="nb")
    if session.scalar(select(Message.id).where(Message.mailbox_id == mailbox.id).limit(1)):
        return mailbox
    engines = [rules.RulesEngine()]
    for raw in samples():
        parsed = mime.parse(raw)
        envelope = Envelope(sender=parsed.from_address, recipients=(ADDRESS,))
        analysis = pipeline.analyze(parsed, envelope, engines)
        quarantine.hold(
            session,
            store,
            raw,
            parsed,
            quarantine.Origin(parsed.from_address),
            [quarantine.Hold(mailbox.id, analysis.result.score, analysis.reasons())],
            retention_days=retention_days,
        )
    return mailbox
