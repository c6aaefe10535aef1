"""quarantine reports

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from alembic import op
import sqlalchemy as sa


import cleanmail.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "report_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("started_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("sent", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_report_runs")),
    )
    with op.batch_alter_table("report_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_report_runs_started_at"), ["started_at"], unique=False)

    op.create_table(
        "reports",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("message_count", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("message_id_header", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_reports_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["report_runs.id"],
            name=op.f("fk_reports_run_id_report_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reports")),
    )
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.create_index(
            "ix_reports_mailbox_created", ["mailbox_id", "created_at"], unique=False
        )
        batch_op.create_index(
            "ix_reports_status_next_attempt", ["status", "next_attempt_at"], unique=False
        )

    with op.batch_alter_table("domains", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "allow_hourly_reports", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )

    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("report_hour", sa.Integer(), nullable=False, server_default="7")
        )

    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "report_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
            )
        )
        batch_op.create_index(batch_op.f("ix_messages_report_id"), ["report_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_messages_report_id_reports"),
            "reports",
            ["report_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_messages_report_id_reports"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_messages_report_id"))
        batch_op.drop_column("report_id")

    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.drop_column("report_hour")

    with op.batch_alter_table("domains", schema=None) as batch_op:
        batch_op.drop_column("allow_hourly_reports")

    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_index("ix_reports_status_next_attempt")
        batch_op.drop_index("ix_reports_mailbox_created")

    op.drop_table("reports")
    with op.batch_alter_table("report_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_report_runs_started_at"))

    op.drop_table("report_runs")
