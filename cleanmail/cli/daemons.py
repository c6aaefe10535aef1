"""Commands that run daemons and migrate: serve, filter, web, db."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import click

from cleanmail import db
from cleanmail.cli import State, cli, pass_state


@cli.group("db")
def db_group() -> None:
    """Migrate the database."""


@db_group.command("upgrade")
@pass_state
def db_upgrade(state: State) -> None:
    """Migrate the database to the newest schema."""
    db.upgrade(state.config.database_url)
    click.echo(f"database at revision {db.head_revision()}")


@db_group.command("current")
@pass_state
def db_current(state: State) -> None:
    """Print the database's schema revision."""
    revision = db.current_revision(state.database(check=False).engine)
    click.echo(revision or "not migrated")


@cli.command("filter")
@pass_state
def filter_command(state: State) -> None:
    """Run the SMTP content filter on CLEANMAIL_FILTER_LISTEN."""
    from cleanmail.filter import daemon

    sys.exit(daemon.run(state.config))


@cli.command("web")
@pass_state
def web_command(state: State) -> None:
    """Run the web app under gunicorn on CLEANMAIL_WEB_LISTEN."""
    from cleanmail.web import server

    server.run(state.config)


@cli.command("serve")
@pass_state
def serve_command(state: State) -> None:
    """Run every daemon on this machine (migrating the embedded database first)."""
    config = state.config
    if config.is_embedded_database:
        db.upgrade(config.database_url)
    db.check_migrated(state.database())
    from cleanmail.filter import server as filter_server
    from cleanmail.web import server as web_server

    filter_server.bind(config).close()  # a taken port stops here, with its setting named
    web_server.check_listen(config)
    children = {
        name: subprocess.Popen([sys.executable, "-m", "cleanmail", name])
        for name in ("filter", "web", "scheduler")
    }
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Say "running" only once both ports answer: a newcomer opens the link at once.
    deadline = time.monotonic() + 60
    waiting = [config.filter_listen, config.web_listen]
    while waiting and not stopping and time.monotonic() < deadline:
        if any(child.poll() is not None for child in children.values()):
            break
        waiting = [listen for listen in waiting if not _answers(listen.host, listen.port)]
        time.sleep(0.2)
    if not waiting:
        click.echo(
            f"Cleanmail is running: filter on {config.filter_listen}, web on {config.base_url}/"
            " (Ctrl-C stops it)",
            err=True,
        )
    exit_code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                click.echo(f"cleanmail: {name} exited with {child.returncode}", err=True)
                exit_code, stopping = 1, True
        time.sleep(0.5)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children.values():
        child.wait()
    os._exit(exit_code)


def _answers(host: str, port: int) -> bool:
    """True when something accepts connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True
