"""The one engine and session factory, migrations, and the migrated-database check."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class DatabaseError(Exception):
    """The database cannot be used; the message is one line for the operator."""


class Database:
    """An engine with its session factories: deferred reads, and writes that lock early."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=pool_size)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # On SQLite a writer takes the lock at BEGIN, so that two writers never deadlock
        # upgrading read locks; PostgreSQL ignores the option.
        self.write_sessions = sessionmaker(
            self.engine.execution_options(cleanmail_immediate=True), expire_on_commit=False
        )

    @contextmanager
    def session_scope(self, *, write: bool = False) -> Iterator[Session]:
        """A session that commits when the block ends and rolls back on error."""
        factory = self.write_sessions if write else self.sessions
        with factory() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        """Close every pooled connection (before fork, and at exit)."""
        self.engine.dispose()


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """Create the engine with the settings each backend needs."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the driver, decide when transactions begin.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    options = connection.get_execution_options()
    # cleanmail_relaxed: a commit that survives our own crash but not the machine's
    # (WAL without fsync), for bookkeeping written very often, e.g. "report sent".
    synchronous = "NORMAL" if options.get("cleanmail_relaxed") else "FULL"
    info = connection.connection.info
    if info.get("synchronous", "FULL") != synchronous:
        connection.exec_driver_sql(f"PRAGMA synchronous={synchronous}")
        info["synchronous"] = synchronous
    connection.exec_driver_sql("BEGIN IMMEDIATE" if options.get("cleanmail_immediate") else "BEGIN")


def alembic_config(url: str) -> AlembicConfig:
    """An Alembic configuration for our migrations and the given database."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database to the given revision."""
    try:
        command.upgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot migrate {safe_url(url)}: {_first_line(exc)}") from None


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The newest revision this code knows."""
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


def check_migrated(database: Database) -> None:
    """Refuse to run on a database that is unreachable or not at the code's revision."""
    try:
        current = current_revision(database.engine)
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot reach the database {safe_url(database.url)}: {_first_line(exc)}"
        ) from None
    head = head_revision()
    if current != head:
        state = "not migrated" if current is None else f"at revision {current}, not {head}"
        raise DatabaseError(
            f"the database {safe_url(database.url)} is {state}: run `cleanmail db upgrade`"
        )


def check_ready(url: str) -> None:
    """Before a daemon starts: the database answers and is migrated (no pool is kept)."""
    database = Database(url)
    try:
        check_migrated(database)
    finally:
        database.dispose()


def safe_url(url: str) -> str:
    """The database address without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
