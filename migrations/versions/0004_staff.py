"""staff: domain admins' domains, bulk jobs, indexes for the operators' search

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from alembic import op
import sqlalchemy as sa


import cleanmail.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _has_trigram(bind) -> bool:
    """pg_trgm is in contrib (trusted since PostgreSQL 13): use it when the server has it."""
    query = sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")
    return bind.execute(query).first() is not None


def upgrade() -> None:
    op.create_table(
        "domain_admins",
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("domain_id", sa.Integer(), nullable=False),
        sa.Column("created_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["domain_id"],
            ["domains.id"],
            name=op.f("fk_domain_admins_domain_id_domains"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_domain_admins_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("mailbox_id", "domain_id", name=op.f("pk_domain_admins")),
    )
    op.create_index("ix_domain_admins_domain_id", "domain_admins", ["domain_id"], unique=False)

    op.create_table(
        "bulk_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("criteria", sa.JSON(), nullable=False),
        sa.Column("domain_ids", sa.JSON(), nullable=True),
        sa.Column("staff_id", sa.Integer(), nullable=True),
        sa.Column("actor_type", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=320), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("worker", sa.String(length=64), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["staff_id"],
            ["mailboxes.id"],
            name=op.f("fk_bulk_jobs_staff_id_mailboxes"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bulk_jobs")),
    )
    op.create_index(
        "ix_bulk_jobs_status_heartbeat", "bulk_jobs", ["status", "heartbeat_at"], unique=False
    )

    # The operators' search: a sender's address (From or envelope), sorting by score.
    op.create_index(
        "ix_messages_from_address_received", "messages", ["from_address", "received_at"]
    )
    op.create_index(
        "ix_messages_envelope_sender_received",
        "messages",
        [sa.text("lower(substr(envelope_sender, 1, 320))"), "received_at"],
    )
    op.create_index("ix_messages_score_id", "messages", ["score", "id"])

    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    # Words in subjects: ILIKE '%word%' through a trigram index; reason codes through
    # JSONB containment. SQLite scans, within the other conditions (see search.py).
    if _has_trigram(bind):
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.execute(
            "CREATE INDEX ix_messages_subject_trgm ON messages USING gin (subject gin_trgm_ops)"
        )
    op.execute(
        "CREATE INDEX ix_messages_reasons_gin ON messages USING gin ((reasons::jsonb) jsonb_path_ops)"
    )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_messages_reasons_gin")
        op.execute("DROP INDEX IF EXISTS ix_messages_subject_trgm")
    op.drop_index("ix_messages_score_id", table_name="messages")
    op.drop_index("ix_messages_envelope_sender_received", table_name="messages")
    op.drop_index("ix_messages_from_address_received", table_name="messages")
    op.drop_index("ix_bulk_jobs_status_heartbeat", table_name="bulk_jobs")
    op.drop_table("bulk_jobs")
    op.drop_index("ix_domain_admins_domain_id", table_name="domain_admins")
    op.drop_table("domain_admins")
