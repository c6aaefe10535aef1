"""The Flask application factory, the request's database session, and shared helpers."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, current_app, g, request
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import Session
from werkzeug.middleware.proxy_fix import ProxyFix

from cleanmail import audit, db, logins
from cleanmail import config as config_module
from cleanmail.relay import Relay
from cleanmail.store import Store
from cleanmail.tokens import Tokens

ROOT = Path(__file__).resolve().parent.parent.parent
TEMPLATES = ROOT / "templates"
TRANSLATIONS = Path(__file__).resolve().parent.parent / "translations"
csrf = CSRFProtect()


def create_app(config: config_module.Config | None = None) -> Flask:
    """Build the web app; refuses to start on an unmigrated database."""
    config = config or config_module.load()
    app = Flask(__name__, template_folder=str(TEMPLATES))
    secure = config.base_url.startswith("https://")
    app.config.update(
        CLEANMAIL=config,
        SECRET_KEY=config.secret_keys[-1],
        SECRET_KEY_FALLBACKS=list(config.secret_keys[:-1]),
        SESSION_COOKIE_NAME="cleanmail_session",
        SESSION_COOKIE_SECURE=secure,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=logins.LIFETIME,
        PREFERRED_URL_SCHEME="https" if secure else "http",
        WTF_CSRF_TIME_LIMIT=None,  # tied to the session: a page left open on a phone still works
        MAX_CONTENT_LENGTH=1024 * 1024,
    )
    if config.trusted_proxies:
        hops = config.trusted_proxies
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops
        )
    database = db.Database(config.database_url)
    db.check_migrated(database)
    config.store_dir.mkdir(parents=True, exist_ok=True)
    app.extensions["cleanmail.db"] = database
    app.extensions["cleanmail.store"] = Store(config.store_dir)
    app.extensions["cleanmail.relay"] = Relay(
        config.relay, timeout=config.relay_timeout, hostname=config.hostname
    )
    app.extensions["cleanmail.tokens"] = Tokens(config.secret_keys)
    csrf.init_app(app)

    from cleanmail.web import errors, health, i18n, security, users

    i18n.init_app(app, TRANSLATIONS)
    users.init_app(app)
    security.init_app(app)
    errors.init_app(app)
    app.teardown_appcontext(_close_session)
    app.register_blueprint(health.bp)
    _register_areas(app)
    return app


def _register_areas(app: Flask) -> None:
    """The blueprints of each area of the app that exists."""
    import importlib

    for name in ("auth", "quarantine", "lists", "settings", "console", "api", "metrics"):
        try:
            module = importlib.import_module(f"cleanmail.web.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cleanmail.web.{name}":
                raise
            continue
        app.register_blueprint(module.bp)


def _close_session(_exc: BaseException | None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        session.close()


def session(*, write: bool = False) -> Session:
    """The database session of this request.

    POST requests, and GETs that say they write, take SQLite's write lock at BEGIN: a
    read transaction that later writes can fail under load.
    """
    if "db_session" not in g:
        database: db.Database = current_app.extensions["cleanmail.db"]
        writes = write or request.method not in ("GET", "HEAD")
        g.db_session = (database.write_sessions if writes else database.sessions)()
    return g.db_session


def store() -> Store:
    """The raw-message store."""
    return current_app.extensions["cleanmail.store"]


def relay() -> Relay:
    """Where released mail goes."""
    return current_app.extensions["cleanmail.relay"]


def tokens() -> Tokens:
    """The signed-link maker."""
    return current_app.extensions["cleanmail.tokens"]


def actor() -> audit.Actor:
    """Who is acting in this request, for the audit log."""
    from flask_login import current_user

    if current_user and current_user.is_authenticated:
        return audit.Actor(current_user.role, current_user.address, request.remote_addr)
    return audit.Actor("anonymous", "", request.remote_addr)


def config() -> config_module.Config:
    """Cleanmail's configuration."""
    return current_app.config["CLEANMAIL"]


def safe_next(target: str | None) -> str | None:
    """A same-site path to go to after login, or None: never another site."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    # Browsers read "\" as "/" and drop control characters, so "/\evil" would leave the site.
    if "\\" in target or any(ord(c) < 32 or ord(c) == 127 for c in target):
        return None
    parts = urlsplit(target)
    return None if parts.scheme or parts.netloc else target
