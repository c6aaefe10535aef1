"""Statements that need each backend's own dialect (upserts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session


def insert(session: Session, table: Any) -> Any:
    """An INSERT that knows ``on_conflict_do_nothing/update`` on SQLite and PostgreSQL."""
    return insert_for(session.get_bind().dialect.name, table)


def insert_for(dialect: str, table: Any) -> Any:
    """The INSERT with upsert clauses for the backend named ``dialect``."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported database {dialect}")


class DriverStatement:
    """A Core statement compiled once for one dialect, to run on a driver cursor.

    For the filter's writes, which run hundreds of times a second: SQLAlchemy's own
    execution (the Session, then the Core connection) costs more than the statement.
    Values go through the same type processors SQLAlchemy would apply, so the rows
    are exactly those a Session would write. ``keys``: the columns given.
    """

    def __init__(self, statement: Any, dialect: Any, keys: Sequence[str]) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        self.sql = str(compiled)
        positional = compiled.positiontup
        self.names: tuple[str, ...] = tuple(positional if positional else compiled.binds)
        self.positional = bool(positional)
        self.processors = [
            (name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
            for name in self.names
        ]
        self._error = dialect.loaded_dbapi.Error

    def parameters(self, values: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """The driver's parameters for one row of ``values``, processed by type."""
        processed = [
            (name, process(values[name]) if process is not None else values[name])
            for name, process in self.processors
        ]
        if self.positional:
            return tuple(value for _name, value in processed)
        return dict(processed)

    def execute(self, cursor: Any, values: dict[str, Any]) -> Any:
        """Run it on a driver cursor; returns the cursor (for RETURNING rows).

        A driver error is raised as SQLAlchemy's, like every other database failure.
        """
        parameters = self.parameters(values)
        try:
            cursor.execute(self.sql, parameters)
        except self._error as exc:
            raise DBAPIError.instance(self.sql, parameters, exc, self._error) from exc
        return cursor
