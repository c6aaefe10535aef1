"""Quarantine reports on both databases, sent to a real SMTP sink: once, in the owner's language."""

from __future__ import annotations

import email
import email.policy
import os
import pty
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

import cleanmail.cli.reports  # noqa: F401 - registers the commands
from cleanmail import mailboxes, mime, quarantine, reports
from cleanmail.cli import cli
from cleanmail.models import Mailbox, Message, Report, ReportRun, ReportStatus
from cleanmail.relay import Relay
from tests.conftest import FilterProcess
from tests.messages import message

# A Monday, 09:00 in Oslo: past the default report hour (07:00 local).
NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
SUBJECTS = {
    "nb": "Karantenerapport: 3 nye meldinger",
    "da": "Karantænerapport: 3 nye mails",
    "en": "Quarantine report: 3 new messages",
}
BUTTONS = {"nb": "Se oversikt", "da": "Se oversigt", "en": "See overview"}


@pytest.fixture
def relay(config):
    """The relay to the test's SMTP sink."""
    running = Relay(config.relay, timeout=10)
    yield running
    running.close()


def hold(database, store, mailbox_id, subject, at=None, sender="spammer@example.com"):
    """Hold one message for a mailbox."""
    raw = message(subject=subject, sender=sender)
    with database.session_scope(write=True) as session:
        return quarantine.hold(
            session,
            store,
            raw,
            mime.parse(raw),
            quarantine.Origin(sender),
            [quarantine.Hold(mailbox_id, 9.0, [{"code": "SUBJECT_CAPS", "text": "", "score": 9}])],
            retention_days=30,
            now=at or NOW - timedelta(hours=1),
        )


def set_mailbox(database, mailbox_id, **values):
    """Change a mailbox's report settings."""
    with database.session_scope(write=True) as session:
        mailbox = session.get(Mailbox, mailbox_id)
        for name, value in values.items():
            setattr(mailbox, name, value)


def parts(received) -> tuple[EmailMessage, str, str]:
    """A received report parsed: the message, its plain text and its HTML."""
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    assert not parsed.defects
    text = parsed.get_body(("plain",)).get_content()
    html = parsed.get_body(("html",)).get_content()
    return parsed, text, html


def send(database, relay, config, now=NOW, **options):
    """One report run."""
    return reports.run(database, relay, config, now, trigger="test", **options)


@pytest.mark.parametrize("language", ["nb", "da", "en"])
def test_a_report_lists_the_new_messages_once(
    database, store, relay, config, smtp_sink, owner, language
):
    set_mailbox(database, owner.id, language=language)
    for number in range(3):
        hold(database, store, owner.id, f"Cheap watches {number}")
    result = send(database, relay, config)
    assert (result.prepared, result.sent, result.failed) == (1, 1, 0)
    (received,) = smtp_sink.wait_for(1)
    assert received.mail_from == "<>"  # MAIL FROM:<>
    assert received.rcpt_tos == ["ola@example.no"]
    parsed, text, html = parts(received)
    assert parsed["Subject"] == SUBJECTS[language]
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["To"] == "ola@example.no"
    assert parsed["Date"] and parsed["Message-ID"]
    for number in range(3):
        assert f"Cheap watches {number}" in text
        assert f"Cheap watches {number}" in html
    assert BUTTONS[language] in text and BUTTONS[language] in html
    assert "/r/" in html and "allow=1" in html and "/settings/" in html
    assert "<script" not in html
    # Newest first.
    assert text.index("Cheap watches 0") > text.index("Cheap watches 2")

    assert send(database, relay, config, NOW + timedelta(days=1)).sent == 0
    hold(database, store, owner.id, "Fresh news", at=NOW + timedelta(hours=3))
    later = NOW + timedelta(days=1)
    assert send(database, relay, config, later).sent == 1
    _parsed, text, _html = parts(smtp_sink.wait_for(2)[1])
    assert "Fresh news" in text and "Cheap watches" not in text
    with database.session_scope() as session:
        report = session.scalars(select(Report).order_by(Report.id.desc())).first()
        assert report.status == ReportStatus.SENT and report.message_count == 1
        assert report.message_id_header == _parsed["Message-ID"]
        assert session.scalars(select(Message.report_id).distinct()).all() != [None]


def test_no_report_for_never_not_due_or_hourly_not_allowed(
    database, store, relay, config, smtp_sink, owner
):
    hold(database, store, owner.id, "Spam")
    set_mailbox(database, owner.id, report_frequency="never")
    assert send(database, relay, config, ignore_schedule=True).prepared == 0
    set_mailbox(database, owner.id, report_frequency="hourly")
    assert send(database, relay, config).prepared == 0  # the domain does not allow hourly
    set_mailbox(
        database, owner.id, report_frequency="daily", last_report_at=NOW - timedelta(hours=20)
    )
    early = datetime(2026, 11, 23, 5, 30, tzinfo=UTC)  # 06:30 in Oslo, before 07:00
    assert send(database, relay, config, early).prepared == 0
    set_mailbox(database, owner.id, report_frequency="weekly")
    tuesday = NOW + timedelta(days=1)
    set_mailbox(database, owner.id, last_report_at=NOW)
    assert send(database, relay, config, tuesday).prepared == 0
    assert send(database, relay, config, NOW + timedelta(days=7)).prepared == 1
    assert len(smtp_sink.wait_for(1)) == 1


def test_a_run_killed_after_prepare_sends_one_report(
    database, store, relay, config, smtp_sink, owner
):
    hold(database, store, owner.id, "First")
    hold(database, store, owner.id, "Second")
    with database.session_scope(write=True) as session:
        assert reports.prepare(session, owner.id, None, NOW).message_count == 2
    # The process died here; the next run sends the pending report, and no second one.
    result = send(database, relay, config, NOW + timedelta(minutes=5), ignore_schedule=True)
    assert (result.prepared, result.sent) == (0, 1)
    assert (
        send(database, relay, config, NOW + timedelta(minutes=10), ignore_schedule=True).sent == 0
    )
    (received,) = smtp_sink.wait_for(1)
    _parsed, text, _html = parts(received)
    assert "First" in text and "Second" in text


def test_a_refusing_relay_leads_to_retries_not_loss(
    database, store, relay, config, smtp_sink, owner
):
    hold(database, store, owner.id, "Wait for it")
    smtp_sink.refuse = "451 4.3.0 try later"
    result = send(database, relay, config)
    assert (result.sent, result.failed) == (0, 1)
    with database.session_scope() as session:
        report = session.scalars(select(Report)).one()
        assert report.status == ReportStatus.PENDING
        assert report.attempts == 1 and "try later" in report.last_error
        assert report.next_attempt_at == NOW + timedelta(minutes=1)
        info = reports.status(session)
        assert info["retrying"] == 1 and info["last_run"]["failed"] == 1
        assert session.scalars(select(ReportRun)).one().failed == 1
    smtp_sink.refuse = None
    assert reports.send_pending(database.write_sessions, relay, config, NOW) == (0, 0)
    later = NOW + timedelta(minutes=2)
    assert reports.send_pending(database.write_sessions, relay, config, later) == (1, 0)
    assert len(smtp_sink.wait_for(1)) == 1
    with database.session_scope() as session:
        assert session.scalars(select(Report)).one().status == ReportStatus.SENT
        assert reports.status(session)["retrying"] == 0


def test_a_report_failing_for_two_days_is_marked_failed(
    database, store, relay, config, smtp_sink, owner
):
    hold(database, store, owner.id, "Never arrives")
    smtp_sink.refuse = "451 4.3.0 try later"
    send(database, relay, config)
    two_days = NOW + reports.GIVE_UP
    assert reports.send_pending(database.write_sessions, relay, config, two_days) == (0, 1)
    with database.session_scope() as session:
        assert session.scalars(select(Report)).one().status == ReportStatus.FAILED
        assert reports.status(session)["failed"] == 1


def test_the_overview_link_logs_in(database, store, relay, config, smtp_sink, owner, client):
    hold(database, store, owner.id, "Log me in")
    send(database, relay, config)
    _parsed, text, _html = parts(smtp_sink.wait_for(1)[0])
    url = next(line.split(": ", 1)[1] for line in text.splitlines() if "See overview" in line)
    response = client.get(urlsplit(url).path)
    assert response.status_code == 303


def test_hostile_subjects_are_escaped(database, store, relay, config, smtp_sink, owner):
    hold(database, store, owner.id, '<script>alert("x")</script><img src=http://evil.test/>')
    send(database, relay, config)
    _parsed, text, html = parts(smtp_sink.wait_for(1)[0])
    assert "<script>" not in html and "<img src=http" not in html
    assert "&lt;script&gt;" in html
    assert '<script>alert("x")</script>' in text


def test_a_long_report_shows_fifty_rows_and_the_rest_as_a_count(
    database, store, relay, config, smtp_sink, owner
):
    for number in range(60):
        hold(
            database,
            store,
            owner.id,
            f"Offer {number:02d}",
            at=NOW - timedelta(minutes=90 - number),
        )
    send(database, relay, config)
    _parsed, text, html = parts(smtp_sink.wait_for(1)[0])
    assert "Quarantine report: 60 new messages" in _parsed["Subject"]
    assert text.count("/r/") == 100 and html.count("allow=1") == 50
    assert "Offer 59" in text and "Offer 10" in text and "Offer 09" not in text
    assert "…and 10 more messages" in text and "…and 10 more messages" in html


def test_due_mailboxes_streams_in_batches(database, store, owner, monkeypatch):
    with database.session_scope(write=True) as session:
        extra = [
            mailboxes.add_mailbox(session, quarantine_actor(), f"u{n}@example.no").id
            for n in range(5)
        ]
    for mailbox_id in [owner.id, *extra]:
        hold(database, store, mailbox_id, f"Spam for {mailbox_id}")
    monkeypatch.setattr(reports, "BATCH", 2)
    with database.sessions() as session:
        assert list(reports.due_mailboxes(session, NOW)) == [owner.id, *extra]
        assert list(reports.due_mailboxes(session, NOW, mailbox="u1@example.no")) == [extra[1]]


def quarantine_actor():
    """An operator actor for setting up mailboxes."""
    from cleanmail import audit

    return audit.Actor("operator", "test")


def test_the_command_line(database, store, config, smtp_sink, owner):
    hold(database, store, owner.id, "From the command line")
    env = FilterProcess(config).environment()
    runner = CliRunner()
    dry = runner.invoke(cli, ["reports", "send", "--now", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "ola@example.no\t1" in dry.output
    assert smtp_sink.messages == []
    sent = runner.invoke(cli, ["reports", "send", "--now", "--mailbox", "ola@example.no"], env=env)
    assert sent.exit_code == 0, sent.output
    assert "sent 1, failed 0" in sent.output
    assert len(smtp_sink.wait_for(1)) == 1
    status = runner.invoke(cli, ["reports", "status"], env=env)
    assert status.exit_code == 0, status.output
    assert "pending: 0 (retrying: 0)" in status.output and "sent: 1" in status.output


def test_a_release_link_asks_before_it_releases(
    database, store, relay, config, smtp_sink, owner, client
):
    """Link scanners open every link: the GET shows the message, only the POST releases."""
    import re

    (message_id,) = hold(database, store, owner.id, "Release me from the report")
    send(database, relay, config)
    _parsed, _text, html = parts(smtp_sink.wait_for(1)[0])
    smtp_sink.clear()
    link = re.search(r'href="([^"]+/r/[^"?]+\?allow=1)"', html).group(1).replace("&amp;", "&")
    opened = client.get(urlsplit(link).path + "?" + urlsplit(link).query)
    assert opened.status_code == 303 and "confirm=sender" in opened.headers["Location"]
    page = client.get(opened.headers["Location"]).get_data(as_text=True)
    assert "Yes, release it and always allow spammer@example.com" in page
    with database.session_scope() as session:
        assert session.get(Message, message_id).status == "new"  # the GET did nothing
    assert smtp_sink.messages == []
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    client.post(f"/messages/{message_id}/release", data={"csrf_token": token, "allow": "sender"})
    assert len(smtp_sink.wait_for(1)) == 1
    with database.session_scope() as session:
        assert session.get(Message, message_id).status == "released"
    assert client.get("/r/not-a-token").status_code == 400


@pytest.mark.parametrize("refusal", ["451 4.3.0 try later", "554 5.7.1 not now"])
def test_refused_reports_show_in_status_and_go_out_later(
    database, store, config, smtp_sink, owner, refusal
):
    """A relay that refuses (for now or for good) leaves the report waiting, visibly."""
    hold(database, store, owner.id, "Patience")
    env = FilterProcess(config).environment()
    runner = CliRunner()
    smtp_sink.refuse = refusal
    refused = runner.invoke(cli, ["reports", "send", "--now"], env=env)
    assert refused.exit_code == 1 and "prepared 1, sent 0, failed 1" in refused.output
    shown = runner.invoke(cli, ["reports", "status"], env=env).output
    assert "(cli), finished " in shown and "sent 0, failed 1" in shown
    assert "pending: 1 (retrying: 1)" in shown and "sent: 0" in shown
    assert "1 attempts, next " in shown and refusal in shown
    # Too early for the next attempt: the run sends nothing and loses nothing.
    smtp_sink.refuse = None
    early = runner.invoke(cli, ["reports", "send", "--now"], env=env)
    assert "prepared 0, sent 0, failed 0" in early.output and smtp_sink.messages == []
    # A minute later (the first backoff), the next run sends it.
    with database.session_scope(write=True) as session:
        report = session.scalars(select(Report)).one()
        report.next_attempt_at -= reports.BACKOFF[0]
    later = runner.invoke(cli, ["reports", "send", "--now"], env=env)
    assert later.exit_code == 0 and "prepared 0, sent 1, failed 0" in later.output
    (received,) = smtp_sink.wait_for(1)
    _parsed, text, _html = parts(received)
    assert "Patience" in text
    shown = runner.invoke(cli, ["reports", "status"], env=env).output
    assert "sent 1, failed 0" in shown and "pending: 0 (retrying: 0)" in shown
    assert "sent: 1" in shown


def run_command(args: list[str], env: dict[str, str], *, terminal: bool) -> tuple[int, str]:
    """``python -m cleanmail ARGS`` as a process, in a pseudo-terminal or on pipes."""
    command = [sys.executable, "-m", "cleanmail", *args]
    if not terminal:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout + done.stderr
    main, child = pty.openpty()
    process = subprocess.Popen(
        command, env={**env, "TERM": "xterm"}, stdin=child, stdout=child, stderr=child
    )
    os.close(child)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    return process.wait(60), output.decode("utf-8", "replace")


@pytest.mark.parametrize("terminal", [True, False])
def test_a_progress_bar_only_in_a_terminal(database, store, config, smtp_sink, owner, terminal):
    with database.session_scope(write=True) as session:
        extra = [
            mailboxes.add_mailbox(session, quarantine_actor(), f"p{n}@example.no").id
            for n in range(4)
        ]
    for mailbox_id in [owner.id, *extra]:
        hold(database, store, mailbox_id, f"Spam for {mailbox_id}")
    env = FilterProcess(config).environment()
    code, output = run_command(["reports", "send", "--now"], env, terminal=terminal)
    assert code == 0, output
    assert "prepared 5, sent 5, failed 0" in output
    assert len(smtp_sink.wait_for(5)) == 5
    if terminal:
        assert "Sending reports" in output and "100%" in output
        assert re.search(r"\[#+\]", output), output
    else:
        assert "Sending reports" not in output and "%" not in output and "#" not in output


def test_a_run_killed_mid_send_and_restarted_sends_each_owner_one_report(
    database, store, config, smtp_sink, owner
):
    """SIGKILL while the relay takes the 40th report; the restart sends the rest, once each."""
    with database.session_scope(write=True) as session:
        extra = [
            mailboxes.add_mailbox(session, quarantine_actor(), f"k{n}@example.no").id
            for n in range(99)
        ]
    for mailbox_id in [owner.id, *extra]:
        hold(database, store, mailbox_id, f"Spam for {mailbox_id}")
    env = {**FilterProcess(config).environment(), "CLEANMAIL_REPORT_SENDERS": "1"}
    command = [sys.executable, "-m", "cleanmail", "reports", "send", "--now"]
    arrived = 0
    first: subprocess.Popen[bytes] | None = None

    def kill_at_the_40th(_message) -> None:
        nonlocal arrived
        arrived += 1
        if arrived == 40:
            assert first is not None
            first.kill()  # SIGKILL while the sender waits for our answer to its DATA
            first.wait(10)
            raise RuntimeError("killed")  # the sink answers 451: this one was not taken

    smtp_sink.on_message = kill_at_the_40th
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert first.wait(60) == -9, first.stdout.read()
    smtp_sink.on_message = None
    assert len(smtp_sink.messages) == 39
    with database.session_scope() as session:
        info = reports.status(session)
        assert (info["sent"], info["pending"]) == (39, 61)
        claimed = session.scalars(
            select(Report).where(Report.status == "pending", Report.next_attempt_at.is_not(None))
        ).all()
        assert len(claimed) == 1  # the one the relay was taking: claimed, not sent

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "prepared 0, sent 60, failed 0" in again.stdout
    # The claimed one goes out once its claim has run out.
    relay = Relay(config.relay, timeout=10)
    try:
        later = datetime.now(UTC) + reports.CLAIM + timedelta(seconds=1)
        assert reports.send_pending(database.write_sessions, relay, config, later) == (1, 0)
    finally:
        relay.close()
    recipients = [rcpt for received in smtp_sink.wait_for(100) for rcpt in received.rcpt_tos]
    assert len(recipients) == 100 and len(set(recipients)) == 100
    with database.session_scope() as session:
        assert reports.status(session)["sent"] == 100
        assert session.scalar(select(func.count()).where(Message.report_id.is_(None))) == 0


def test_the_fast_link_signer_makes_the_tokens_the_app_reads():
    """Reports sign links with Tokens.dumper: the same tokens as dump, read back by load."""
    from cleanmail import tokens

    signer = tokens.Tokens(["old key", "new key"])
    payload = {"m": 7, "v": 2, "id": 123456}
    fast = signer.dumper("release")(payload)
    assert signer.load("release", fast) == payload
    assert tokens.Tokens(["new key"]).load("release", fast) == payload  # signed by the newest
    with pytest.raises(tokens.TokenInvalid):
        signer.load("login", fast)  # another purpose, another salt
    with pytest.raises(tokens.TokenInvalid):
        tokens.Tokens(["old key"]).load("release", fast)
    assert fast.rsplit(".", 1)[0].count(".") == 1  # payload.timestamp.signature
