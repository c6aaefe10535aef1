"""Statistics from a real filter run, /metrics, /healthz, `cleanmail stats` and log lines."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import smtplib
import threading
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from cleanmail import apitokens, audit, logs, stats
from cleanmail.cli import cli, operations  # noqa: F401 - registers the commands
from tests.conftest import FilterProcess, hold_message
from tests.messages import GTUBE, message

ACTOR = audit.Actor("operator", "test")


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus scrape."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the scrape")


def test_a_filter_run_with_two_processes_is_counted_per_domain(config, owner, smtp_sink, client):
    cfg = dataclasses.replace(config, filter_workers=2)
    daemon = FilterProcess(cfg)
    daemon.environment = lambda: {  # type: ignore[method-assign]
        **FilterProcess(cfg).environment(),
        "CLEANMAIL_FILTER_WORKERS": "2",
    }
    daemon.start()
    try:
        for n in range(6):
            with smtplib.SMTP("127.0.0.1", cfg.filter_listen.port, timeout=10) as smtp:
                smtp.sendmail("a@example.com", ["ola@example.no"], message(subject=f"Hello {n}"))
        for n in range(3):
            with smtplib.SMTP("127.0.0.1", cfg.filter_listen.port, timeout=10) as smtp:
                spam = message(subject=f"Offer {n}", body=GTUBE)
                smtp.sendmail("a@spam.example", ["ola@example.no", "x@elsewhere.test"], spam)
        smtp_sink.wait_for(9)
    finally:
        assert daemon.stop() == 0  # each process writes what it counted as it stops
    result = CliRunner().invoke(
        cli, ["stats", "--json", "--days", "2"], env=FilterProcess(config).environment()
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    today = summary["days"][-1]
    assert (today["scanned"], today["passed"], today["quarantined"]) == (9, 6, 3)
    assert summary["held"] == 3 and summary["release_rate"] == 0
    assert summary["top_sender_domains"] == [{"domain": "example.com", "count": 3}]
    assert summary["top_reasons"][0] == {"code": "GTUBE", "count": 3}
    scrape = client.get("/metrics").get_data(as_text=True)
    assert metric(scrape, 'cleanmail_messages_total{verdict="quarantined"}') == 3
    assert metric(scrape, 'cleanmail_messages_total{verdict="passed"}') == 6
    # One latency observation per message (9), whatever its number of recipients.
    assert metric(scrape, "cleanmail_filter_latency_seconds_count") == 9
    assert metric(scrape, 'cleanmail_filter_latency_seconds_bucket{le="+Inf"}') == 9
    assert metric(scrape, "cleanmail_filter_latency_seconds_sum") > 0


def test_counters_add_up_from_concurrent_writers(database):
    """Several processes' flushes of the same counters never lose an increment."""

    def flush_many() -> None:
        counters = stats.Counters()
        for _ in range(25):
            counters.count("scanned", "example.no")
            counters.verdicts([("example.no", "passed", [])], 0.02)
            assert counters.flush(database)

    threads = [threading.Thread(target=flush_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with database.session_scope() as session:
        totals = stats.totals(session)
    assert totals["scanned"] == 4 * 25 * 2
    assert totals["passed"] == 100
    assert totals["latency_le_0.025"] == 100


def test_a_failed_flush_keeps_the_counts(database, tmp_path):
    from cleanmail import db

    counters = stats.Counters()
    counters.count("scanned", "example.no", 3)
    broken = db.Database(f"sqlite:///{tmp_path}")  # a folder, not a database file
    assert counters.flush(broken) is False
    assert sum(counters.pending().values()) == 3
    assert counters.flush(database)
    with database.session_scope() as session:
        assert stats.totals(session)["scanned"] == 3


def test_releases_and_reports_are_counted(client, database, store, owner, smtp_sink):
    held = hold_message(database, store, owner.id, message(subject="Invoice"))
    with database.session_scope(write=True) as session:
        stats.bump(session, "quarantined", "example.no")  # as the filter counts it
    with database.session_scope(write=True) as session:
        secret = apitokens.create(session, ACTOR, "ops").secret
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.post(f"/api/v1/messages/{held}/release", headers=headers).status_code == 200
    summary = client.get("/api/v1/stats?days=1", headers=headers).json
    assert summary["days"][0]["released"] == 1
    assert summary["released"] == 1 and summary["release_rate"] == 1.0
    scrape = client.get("/metrics").get_data(as_text=True)
    assert metric(scrape, "cleanmail_releases_total") == 1
    assert 'cleanmail_retry_queue{kind="report"} 0.0' in scrape


def test_a_refused_release_waits_in_the_retry_queue(client, database, store, owner, smtp_sink):
    from cleanmail import quarantine
    from cleanmail.models import Message
    from cleanmail.relay import Relay

    held = hold_message(database, store, owner.id, message(subject="Invoice"))
    smtp_sink.refuse = "550 5.1.1 no such user"
    config = client.application.config["CLEANMAIL"]
    relay = Relay(config.relay, timeout=5, hostname="test")
    with database.session_scope(write=True) as session:
        with pytest.raises(quarantine.ReleaseFailed):
            quarantine.release(session, store, relay, session.get(Message, held), ACTOR)
    scrape = client.get("/metrics").get_data(as_text=True)
    assert 'cleanmail_retry_queue{kind="release"} 1.0' in scrape


def test_healthz_checks_the_store(client, config):
    assert client.get("/healthz").json == {"ok": True, "problems": []}
    config.store_dir.chmod(0o500)
    try:
        broken = client.get("/healthz")
    finally:
        config.store_dir.chmod(0o700)
    import os

    if os.geteuid() == 0:  # root writes anywhere: take the folder away instead
        config.store_dir.rename(config.store_dir.with_name("moved"))
        try:
            broken = client.get("/healthz")
        finally:
            config.store_dir.with_name("moved").rename(config.store_dir)
    assert broken.status_code == 503
    assert broken.json["problems"] == ["store: not writable"]


def test_stats_table_prints_every_day(config, database, store, owner):
    hold_message(
        database, store, owner.id, message(subject="x"), at=datetime.now(UTC) - timedelta(days=1)
    )
    with database.session_scope(write=True) as session:
        stats.bump(session, "quarantined", "example.no", 4)
        stats.bump(session, stats.reason_counter("SUBJECT_CAPS"), "example.no", 4)
    result = CliRunner().invoke(
        cli, ["stats", "--days", "3"], env=FilterProcess(config).environment()
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["day", "scanned", "passed"]
    assert len([line for line in lines if line[:4].isdigit()]) == 3
    assert "held since" in result.output and "SUBJECT_CAPS" in result.output


@pytest.mark.parametrize("fmt", ["text", "keyvalue", "json"])
def test_log_events_carry_their_ids(fmt):
    record = logging.LogRecord(
        "cleanmail.quarantine", logging.INFO, "", 0, "message.release", (), None
    )
    record.event, record.message_id, record.mailbox_id = "message.release", 7, 3
    record.actor = "api:ops team"
    line = logs.formatter(fmt).format(record)
    assert "\n" not in line
    if fmt == "json":
        assert json.loads(line)["message_id"] == 7
        assert json.loads(line)["actor"] == "api:ops team"
    else:
        assert "message_id=7" in line and "mailbox_id=3" in line
        assert 'actor="api:ops team"' in line


@pytest.mark.parametrize("fmt", ["text", "keyvalue", "json"])
def test_logged_events_keep_every_field_and_the_time_stamp(fmt):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter(fmt))
    logger = logging.getLogger("cleanmail.test_events")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logs.event(
            logger,
            "message.checked",
            size=5234,
            seconds=0.012,
            reply="250 2.0.0 Ok: 5234 bytes, pass",
            ids=[1, 2],
            ratio=float("nan"),
            ok=True,
        )
        logs.event(logger, "not.logged", level=logging.DEBUG, size=1)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    line = lines[0]
    if fmt == "json":
        values = json.loads(line)
        assert values["event"] == "message.checked" and values["size"] == 5234
        assert values["seconds"] == 0.012 and values["ids"] == [1, 2] and values["ok"] is True
        return
    assert "event=message.checked size=5234 seconds=0.012" in line
    assert 'reply="250 2.0.0 Ok: 5234 bytes, pass"' in line
    assert 'ids="[1, 2]"' in line and "ratio=NaN" in line and "ok=true" in line
    if fmt == "text":
        # The classic time stamp, as logging's own formatter writes it.
        stamp = " ".join(line.split()[:2])
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", stamp)
