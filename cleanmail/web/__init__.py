"""The Flask application factory."""

from __future__ import annotations

from pathlib import Path

from flask import Flask, g

from cleanmail import config as config_module
from cleanmail import db

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "templates"


def create_app(config: config_module.Config | None = None) -> Flask:
    """Build the web app; refuses to start on an unmigrated database."""
    config = config or config_module.load()
    app = Flask(__name__, template_folder=str(TEMPLATES))
    app.config["CLEANMAIL"] = config
    app.secret_key = config.secret_keys[-1]
    database = db.Database(config.database_url)
    db.check_migrated(database)
    app.extensions["cleanmail.db"] = database

    @app.teardown_appcontext
    def close_session(_exc: BaseException | None) -> None:
        session = g.pop("db_session", None)
        if session is not None:
            session.close()

    from cleanmail.web import health

    app.register_blueprint(health.bp)
    return app


def session():
    """The database session of the current request."""
    if "db_session" not in g:
        from flask import current_app

        g.db_session = current_app.extensions["cleanmail.db"].sessions()
    return g.db_session
