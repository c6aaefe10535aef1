"""external engines: learning events on their way to rspamd and spamd

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from alembic import op
import sqlalchemy as sa


import cleanmail.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "engine_lessons",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("engine", sa.String(length=32), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_try_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("done_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["learning_events.id"],
            name=op.f("fk_engine_lessons_event_id_learning_events"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_engine_lessons")),
        sa.UniqueConstraint("event_id", "engine", name="uq_engine_lessons_event_engine"),
    )
    with op.batch_alter_table("engine_lessons", schema=None) as batch_op:
        batch_op.create_index(
            "ix_engine_lessons_due", ["engine", "outcome", "next_try_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("engine_lessons", schema=None) as batch_op:
        batch_op.drop_index("ix_engine_lessons_due")
    op.drop_table("engine_lessons")
