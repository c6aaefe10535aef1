"""api tokens and daily statistics

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from alembic import op
import sqlalchemy as sa


import cleanmail.models

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "daily_stats",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "domain", "name", name=op.f("pk_daily_stats")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("domains", sa.JSON(), nullable=False),
        sa.Column("created_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=320), nullable=False),
        sa.Column("last_used_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    # /metrics counts the releases waiting for a retry: a few rows among millions.
    op.create_index(
        "ix_messages_release_error",
        "messages",
        ["id"],
        sqlite_where=sa.text("release_error IS NOT NULL"),
        postgresql_where=sa.text("release_error IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_release_error", table_name="messages")
    op.drop_table("api_tokens")
    op.drop_table("daily_stats")
