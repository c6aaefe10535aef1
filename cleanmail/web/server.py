"""Runs the web app under gunicorn, configured from Cleanmail's settings."""

from __future__ import annotations

import gc
import socket
from typing import Any

from gunicorn.app.base import BaseApplication

from cleanmail.config import Config, ConfigError


class WebServer(BaseApplication):
    """gunicorn with our settings instead of its command line."""

    def __init__(self, config: Config) -> None:
        self.cleanmail_config = config
        super().__init__()

    def load_config(self) -> None:
        """Apply listen address and worker count."""
        settings: dict[str, Any] = {
            "bind": str(self.cleanmail_config.web_listen),
            "workers": self.cleanmail_config.web_workers,
            "worker_class": "gthread",
            "threads": 4,
            "accesslog": "-",
            "proc_name": "cleanmail-web",
            # gunicorn's control socket is one path per user ($HOME/.gunicorn/gunicorn.ctl):
            # a second instance on the machine would take it over.
            "control_socket_disable": True,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        """Build the app in each worker, then keep its objects out of the garbage collector.

        Without the freeze every few hundred requests a full collection walked the
        150,000 objects of the loaded libraries: about half a millisecond per list page.
        """
        from cleanmail.web import create_app

        app = create_app(self.cleanmail_config)
        gc.collect()
        gc.freeze()
        return app


def run(config: Config) -> None:
    """Serve until gunicorn is told to stop; refuses to start on an unmigrated database."""
    from cleanmail import db

    db.check_ready(config.database_url)
    config.store_dir.mkdir(parents=True, exist_ok=True)
    check_listen(config)
    WebServer(config).run()


def check_listen(config: Config) -> None:
    """Stop with one line naming the setting when the web address is taken.

    gunicorn would retry for five seconds with its own log lines, then exit.
    """
    listen = config.web_listen
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        socket.create_server((listen.host, listen.port), family=family).close()
    except OSError as exc:
        raise ConfigError(
            f"CLEANMAIL_WEB_LISTEN: cannot listen on {listen}: {exc.strerror or exc}"
        ) from None
