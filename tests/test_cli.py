"""The ``cleanmail`` command: data commands in-process, daemons as real processes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from click.testing import CliRunner

from cleanmail.cli import cli, daemons, data, demo, links  # noqa: F401 - registers the commands
from cleanmail.config import Endpoint
from tests.conftest import FilterProcess
from tests.messages import GTUBE, message
from tests.servers import SmtpSink, free_port


@pytest.fixture
def run(config):
    """Run a cleanmail command against the test's configuration."""
    env = FilterProcess(config).environment()

    def invoke(*args: str, ok: bool = True):
        result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


def test_domains_and_mailboxes(run):
    assert "serving example.no" in run("domain", "add", "Example.NO").output
    assert run("domain", "list").output == "example.no\tthreshold=5.0\treject=never\n"
    run("domain", "set", "example.no", "--threshold", "7", "--reject-threshold", "20")
    assert run("domain", "list").output == "example.no\tthreshold=7.0\treject=20.0\n"
    run("domain", "set", "example.no", "--reject-threshold", "25")  # the threshold stays 7
    assert run("domain", "list").output == "example.no\tthreshold=7.0\treject=25.0\n"
    run("domain", "set", "example.no", "--threshold", "default", "--reject-threshold", "never")
    assert run("domain", "list").output == "example.no\tthreshold=5.0\treject=never\n"
    for bad in ("nan", "inf", "-5", "abc"):
        refused = run("domain", "set", "example.no", "--threshold", bad, ok=False)
        assert refused.exit_code == 1 and refused.output.count("\n") == 1
    assert (
        "must not be below"
        in run(
            "domain", "set", "example.no", "--threshold", "9", "--reject-threshold", "3", ok=False
        ).output
    )
    assert "created ola@example.no" in run("mailbox", "add", "Ola@Example.no").output
    assert "ola@example.no\towner\tnew=0" in run("mailbox", "list").output
    shown = run("mailbox", "show", "ola@example.no").output
    assert "language: nb" in shown and "password set: False" in shown
    bad = run("mailbox", "add", "not an address", ok=False)
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "not a valid" in bad.output
    assert "not a served domain" in run("mailbox", "add", "x@other.test", ok=False).output
    assert "no longer serving" in run("domain", "remove", "example.no").output


def test_lists(run):
    run("domain", "add", "example.no")
    run("mailbox", "add", "ola@example.no")
    run(
        "lists",
        "add",
        "--mailbox",
        "ola@example.no",
        "--allow",
        "*@Friend.test",
        "--block",
        "x.test",
    )
    run("lists", "add", "--global", "--block", "*.spam.test")
    run("lists", "add", "--domain", "example.no", "--allow", "partner.test")
    assert run("lists", "show", "--mailbox", "ola@example.no").output.splitlines() == [
        "allow\tfriend.test",
        "block\tx.test",
    ]
    run("lists", "add", "--mailbox", "ola@example.no", "--block", "friend.test")  # moves it
    assert "allow" not in run("lists", "show", "--mailbox", "ola@example.no").output
    run("lists", "remove", "--mailbox", "ola@example.no", "--block", "friend.test")
    assert run("lists", "show", "--global").output == "block\t*.spam.test\n"
    assert run("lists", "show", "--domain", "example.no").output == "allow\tpartner.test\n"
    assert "exactly one of" in run("lists", "show", ok=False).output
    assert "not an address" in run("lists", "add", "--global", "--block", "a b", ok=False).output
    wrong = run("lists", "remove", "--global", "--allow", "*.spam.test", ok=False)
    assert "not on the allow list" in wrong.output


def test_quarantine_add_list_show(run, tmp_path, config):
    run("domain", "add", "example.no")
    raw = message(subject="Vinn en iPhone!", body=f"{GTUBE}\n")
    path = tmp_path / "spam.eml"
    path.write_bytes(b"From spammer@example.com Sat Jan  3 01:05:34 1996\n" + raw)
    out = run("quarantine", "add", str(path), "--rcpt", "ola@example.no").output
    message_id = int(out.split()[-1])
    again = run("quarantine", "add", str(path), "--rcpt", "ola@example.no", ok=False)
    assert "already in the quarantine" in again.output
    (row,) = json.loads(run("quarantine", "list", "--json").output)
    assert row["id"] == message_id and row["mailbox"] == "ola@example.no"
    assert row["subject"] == "Vinn en iPhone!" and row["status"] == "new"
    assert row["sender"] == "kari@example.com" and "received_at" in row
    assert {"MANUAL", "GTUBE"} <= {r["code"] for r in row["reasons"]}
    assert json.loads(run("quarantine", "list", "--json", "--status", "released").output) == []
    assert "GTUBE" in run("quarantine", "show", str(message_id)).output
    assert run("quarantine", "show", str(message_id), "--raw").stdout_bytes == raw
    empty = tmp_path / "empty.eml"
    empty.write_bytes(b"")
    assert (
        "not a mail message"
        in run("quarantine", "add", str(empty), "--rcpt", "ola@example.no", ok=False).output
    )
    bad_sender = run(
        "quarantine",
        "add",
        str(path),
        "--rcpt",
        "ola@example.no",
        "--sender",
        "bad sender",
        ok=False,
    )
    assert "not a valid mail address" in bad_sender.output
    missing = run("quarantine", "show", "999999", ok=False)
    assert missing.exit_code == 1 and "no quarantined message 999999" in missing.output


def test_demo_is_idempotent_and_its_link_logs_in(run, client):
    first = run("demo").output.splitlines()
    again = run("demo").output.splitlines()
    assert (
        first[0]
        == again[0]
        == ("Demo mailbox ola.nordmann@demo.example: open this link to see its quarantine")
    )
    rows = json.loads(run("quarantine", "list", "--json").output)
    assert len(rows) == 3 and {r["mailbox"] for r in rows} == {"ola.nordmann@demo.example"}
    assert {"GTUBE", "BLOCKED_ATTACHMENT"} <= {c["code"] for r in rows for c in r["reasons"]}
    path = first[1].split("/", 3)[3]
    assert client.get("/" + path).status_code == 303
    assert "Faktura november" in client.get("/").get_data(as_text=True)


def test_unmigrated_database_is_refused_with_one_line(tmp_path):
    env = {"CLEANMAIL_DATA_DIR": str(tmp_path), "CLEANMAIL_SECRET_KEY": "x"}
    for args in (["domain", "list"], ["filter"], ["web"]):
        result = CliRunner().invoke(cli, args, env=env)
        assert result.exit_code == 1
        assert "not migrated: run `cleanmail db upgrade`" in result.output


def test_bad_setting_exits_2_with_one_line(tmp_path):
    env = {"CLEANMAIL_DATA_DIR": str(tmp_path), "CLEANMAIL_RELAY": "nowhere"}
    result = CliRunner().invoke(cli, ["domain", "list"], env=env)
    assert result.exit_code == 2
    assert result.output == "cleanmail: error: CLEANMAIL_RELAY: expected HOST:PORT, got 'nowhere'\n"


def wait_for_http(url: str, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_serve_migrates_the_embedded_database_and_runs_every_daemon(tmp_path):
    filter_port, web_port = free_port(), free_port()
    env = {
        **os.environ,
        "CLEANMAIL_DATA_DIR": str(tmp_path / "instance"),
        "CLEANMAIL_FILTER_LISTEN": f"127.0.0.1:{filter_port}",
        "CLEANMAIL_WEB_LISTEN": f"127.0.0.1:{web_port}",
    }
    serve = subprocess.Popen([sys.executable, "-m", "cleanmail", "serve"], env=env)
    try:
        health = json.loads(wait_for_http(f"http://127.0.0.1:{web_port}/healthz"))
        assert health == {"ok": True, "problems": []}
        # The web app may answer before the filter's socket is bound: wait for it too.
        deadline = time.monotonic() + 30
        while True:
            try:
                client = smtplib.SMTP("127.0.0.1", filter_port, timeout=10)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with client:
            assert client.noop()[0] == 250
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    assert (tmp_path / "instance" / "cleanmail.db").exists()


def test_serve_says_it_is_running_only_once_both_ports_answer(tmp_path):
    filter_port, web_port = free_port(), free_port()
    env = {
        **os.environ,
        "CLEANMAIL_DATA_DIR": str(tmp_path / "instance"),
        "CLEANMAIL_FILTER_LISTEN": f"127.0.0.1:{filter_port}",
        "CLEANMAIL_WEB_LISTEN": f"127.0.0.1:{web_port}",
        "HOME": str(tmp_path),
    }
    env.pop("XDG_RUNTIME_DIR", None)
    serve = subprocess.Popen(
        [sys.executable, "-m", "cleanmail", "serve"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert serve.stderr is not None
        for line in serve.stderr:
            if line.startswith("Cleanmail is running"):
                break
        # What a newcomer does next: open the web app and talk to the filter, no waiting.
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=5) as page:
            assert page.status == 200
        with smtplib.SMTP("127.0.0.1", filter_port, timeout=10) as client:
            assert client.noop()[0] == 250
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=30)
    assert serve.returncode == 0
    # No gunicorn control socket that another instance on the machine would share.
    assert not (tmp_path / ".gunicorn").exists()


@pytest.mark.parametrize("setting", ["CLEANMAIL_WEB_LISTEN", "CLEANMAIL_FILTER_LISTEN"])
def test_serve_names_the_setting_of_a_port_that_is_taken(tmp_path, setting):
    env = {
        **os.environ,
        "CLEANMAIL_DATA_DIR": str(tmp_path / "instance"),
        "CLEANMAIL_FILTER_LISTEN": f"127.0.0.1:{free_port()}",
        "CLEANMAIL_WEB_LISTEN": f"127.0.0.1:{free_port()}",
    }
    with socket.create_server(("127.0.0.1", 0)) as taken:
        env[setting] = f"127.0.0.1:{taken.getsockname()[1]}"
        done = subprocess.run(
            [sys.executable, "-m", "cleanmail", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert done.stderr.startswith(f"cleanmail: error: {setting}: cannot listen on")
    assert "running" not in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_routine_scheduler_runs_are_not_logged(tmp_path):
    env = {**os.environ, "CLEANMAIL_DATA_DIR": str(tmp_path / "instance")}
    assert CliRunner().invoke(cli, ["db", "current"], env=env).exit_code == 0
    # The executor's "Running job ..." lines: a dozen a minute in `cleanmail serve`'s output.
    assert logging.getLogger("apscheduler.executors").level == logging.WARNING


def test_sigterm_finishes_mail_in_flight(config, database):
    with database.session_scope(write=True):
        pass
    slow = SmtpSink(on_message=lambda _m: time.sleep(2)).start()
    try:
        cfg = dataclasses.replace(config, relay=Endpoint("127.0.0.1", slow.port))
        daemon = FilterProcess(cfg).start()
        replies: list[int] = []

        def send() -> None:
            client = smtplib.SMTP("127.0.0.1", cfg.filter_listen.port, timeout=30)
            try:
                client.ehlo("x")
                client.mail("a@example.com")
                client.rcpt("someone@elsewhere.test")
                replies.append(client.data(message())[0])
            finally:
                client.close()  # no QUIT: the draining filter answers anything more with 421

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.7)  # the message is now waiting on the slow relay
        assert daemon.stop() == 0
        sender.join(10)
        assert replies == [250]
        assert len(slow.messages) == 1
    finally:
        slow.stop()


def test_several_filter_workers_share_the_port(config, smtp_sink):
    cfg = dataclasses.replace(config, filter_workers=2)
    daemon = FilterProcess(cfg)
    daemon.environment = lambda: {  # type: ignore[method-assign]
        **FilterProcess(cfg).environment(),
        "CLEANMAIL_FILTER_WORKERS": "2",
    }
    daemon.start()
    try:
        time.sleep(1)
        workers = subprocess.run(
            ["pgrep", "-P", str(daemon.process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(workers) == 2
        for n in range(10):
            with smtplib.SMTP("127.0.0.1", cfg.filter_listen.port, timeout=10) as client:
                client.sendmail("a@example.com", ["x@elsewhere.test"], message(subject=f"m{n}"))
        assert len(smtp_sink.wait_for(10)) == 10
    finally:
        assert daemon.stop() == 0


def test_a_second_filter_on_the_same_address_refuses_to_start(config):
    first = FilterProcess(config).start()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "cleanmail", "filter"],
            env=FilterProcess(config).environment(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 2
        assert second.stderr.strip().startswith("cleanmail: error: CLEANMAIL_FILTER_LISTEN:")
        assert second.stderr.count("\n") == 1
    finally:
        assert first.stop() == 0


def test_usage_errors_are_one_line(config):
    env = FilterProcess(config).environment()
    for args in (
        ["quarantine", "show", "abc"],
        ["quarantine", "list", "--status", "bogus"],
        ["login-link"],
        ["no-such-command"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "cleanmail", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, args
        assert result.stderr.startswith("cleanmail: error: ") and result.stderr.count("\n") == 1
