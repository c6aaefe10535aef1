"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from alembic import op
import sqlalchemy as sa


import cleanmail.models

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "domains",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.Column("quarantine_threshold", sa.Float(), nullable=True),
        sa.Column("reject_threshold", sa.Float(), nullable=True),
        sa.Column("created_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_domains")),
        sa.UniqueConstraint("name", name=op.f("uq_domains_name")),
    )
    op.create_table(
        "raw_messages",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_raw_messages")),
    )
    op.create_table(
        "mailboxes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("domain_id", sa.Integer(), nullable=True),
        sa.Column("password_hash", sa.String(length=255), nullable=True),
        sa.Column("totp_secret", sa.String(length=64), nullable=True),
        sa.Column("language", sa.String(length=8), nullable=False),
        sa.Column("report_frequency", sa.String(length=16), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_report_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["domain_id"],
            ["domains.id"],
            name=op.f("fk_mailboxes_domain_id_domains"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mailboxes")),
        sa.UniqueConstraint("address", name=op.f("uq_mailboxes_address")),
    )
    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_mailboxes_domain_id"), ["domain_id"], unique=False)

    op.create_table(
        "audit_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("actor_type", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=320), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=True),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_audit_events_mailbox_id_mailboxes"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index("ix_audit_events_action_at", ["action", "at"], unique=False)
        batch_op.create_index("ix_audit_events_at", ["at"], unique=False)
        batch_op.create_index("ix_audit_events_mailbox_at", ["mailbox_id", "at"], unique=False)

    op.create_table(
        "list_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("pattern", sa.String(length=320), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=True),
        sa.Column("domain_id", sa.Integer(), nullable=True),
        sa.Column("comment", sa.String(length=255), nullable=False),
        sa.Column("created_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["domain_id"],
            ["domains.id"],
            name=op.f("fk_list_entries_domain_id_domains"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_list_entries_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_list_entries")),
    )
    with op.batch_alter_table("list_entries", schema=None) as batch_op:
        batch_op.create_index(
            "uq_list_entries_domain_pattern",
            ["domain_id", "pattern"],
            unique=True,
            sqlite_where=sa.text("scope = 'domain'"),
            postgresql_where=sa.text("scope = 'domain'"),
        )
        batch_op.create_index(
            "uq_list_entries_global_pattern",
            ["pattern"],
            unique=True,
            sqlite_where=sa.text("scope = 'global'"),
            postgresql_where=sa.text("scope = 'global'"),
        )
        batch_op.create_index(
            "uq_list_entries_mailbox_pattern",
            ["mailbox_id", "pattern"],
            unique=True,
            sqlite_where=sa.text("scope = 'mailbox'"),
            postgresql_where=sa.text("scope = 'mailbox'"),
        )

    op.create_table(
        "messages",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("raw_sha256", sa.String(length=64), nullable=True),
        sa.Column("envelope_sender", sa.String(length=998), nullable=False),
        sa.Column("from_header", sa.Text(), nullable=False),
        sa.Column("from_address", sa.String(length=320), nullable=False),
        sa.Column("sender_domain", sa.String(length=253), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("message_id_header", sa.String(length=998), nullable=False),
        sa.Column("date_header", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("received_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", cleanmail.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("released_at", cleanmail.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("release_error", sa.Text(), nullable=True),
        sa.Column("release_attempts", sa.Integer(), nullable=False),
        sa.Column("client_address", sa.String(length=64), nullable=True),
        sa.Column("client_helo", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_messages_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["raw_sha256"],
            ["raw_messages.sha256"],
            name=op.f("fk_messages_raw_sha256_raw_messages"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_messages_mailbox_received", ["mailbox_id", "received_at", "id"], unique=False
        )
        batch_op.create_index(
            "ix_messages_mailbox_status_received",
            ["mailbox_id", "status", "received_at"],
            unique=False,
        )
        batch_op.create_index("ix_messages_raw_sha256", ["raw_sha256"], unique=False)
        batch_op.create_index("ix_messages_received", ["received_at"], unique=False)
        batch_op.create_index(
            "ix_messages_sender_domain_received", ["sender_domain", "received_at"], unique=False
        )
        batch_op.create_index("ix_messages_status_expires", ["status", "expires_at"], unique=False)
        batch_op.create_index("uq_messages_mailbox_raw", ["mailbox_id", "raw_sha256"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("uq_messages_mailbox_raw")
        batch_op.drop_index("ix_messages_status_expires")
        batch_op.drop_index("ix_messages_sender_domain_received")
        batch_op.drop_index("ix_messages_received")
        batch_op.drop_index("ix_messages_raw_sha256")
        batch_op.drop_index("ix_messages_mailbox_status_received")
        batch_op.drop_index("ix_messages_mailbox_received")

    op.drop_table("messages")
    with op.batch_alter_table("list_entries", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_list_entries_mailbox_pattern",
            sqlite_where=sa.text("scope = 'mailbox'"),
            postgresql_where=sa.text("scope = 'mailbox'"),
        )
        batch_op.drop_index(
            "uq_list_entries_global_pattern",
            sqlite_where=sa.text("scope = 'global'"),
            postgresql_where=sa.text("scope = 'global'"),
        )
        batch_op.drop_index(
            "uq_list_entries_domain_pattern",
            sqlite_where=sa.text("scope = 'domain'"),
            postgresql_where=sa.text("scope = 'domain'"),
        )

    op.drop_table("list_entries")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_mailbox_at")
        batch_op.drop_index("ix_audit_events_at")
        batch_op.drop_index("ix_audit_events_action_at")

    op.drop_table("audit_events")
    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mailboxes_domain_id"))

    op.drop_table("mailboxes")
    op.drop_table("raw_messages")
    op.drop_table("domains")
