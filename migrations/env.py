"""Alembic environment: the database address comes from Cleanmail, not from an ini file."""

from alembic import context
from sqlalchemy import create_engine, pool

from cleanmail import models

target_metadata = models.Base.metadata


def run_migrations() -> None:
    """Run the migrations on the database Cleanmail was configured with."""
    url = context.config.attributes.get("database_url")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        _migrate(conn)
    engine.dispose()


def _include(obj, name, type_, reflected, compare_to) -> bool:
    """Leave out APScheduler's own job table, which it creates and manages itself."""
    return not (type_ == "table" and name == "scheduler_jobs")


def _migrate(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=_include,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


run_migrations()
