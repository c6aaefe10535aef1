"""mailbox versions: a number that every change to a mailbox's listed messages bumps

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-22

The owner's list page is kept per process under the mailbox's version
(``cleanmail/web/listing.py``). Triggers bump it in the same transaction as the change,
whichever code or tool makes it: a message held, deleted, or an UPDATE of a column the
list shows or filters on (not ``report_id``, which the report run sets for many
mailboxes at once). No foreign key: a cascaded delete of a mailbox's messages bumps the
version of a mailbox that is being deleted.
"""

from alembic import op
import sqlalchemy as sa

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# Keep in step with what quarantine_list.LISTED reads and quarantine_list.search filters on.
COLUMNS = (
    "mailbox_id, status, release_error, received_at, subject, from_header, envelope_sender, "
    "size, reasons"
)
BUMP = (
    "INSERT INTO mailbox_versions (mailbox_id, version) VALUES ({row}.mailbox_id, 1)"
    " ON CONFLICT (mailbox_id) DO UPDATE SET version = mailbox_versions.version + 1"
)


def upgrade() -> None:
    op.create_table(
        "mailbox_versions",
        sa.Column("mailbox_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("mailbox_id", name=op.f("pk_mailbox_versions")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION bump_mailbox_version() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN"
            "  IF TG_OP <> 'DELETE' THEN " + BUMP.format(row="NEW") + "; END IF;"
            "  IF TG_OP = 'DELETE' THEN " + BUMP.format(row="OLD") + "; END IF;"
            "  IF TG_OP = 'UPDATE' THEN"
            "   IF OLD.mailbox_id IS DISTINCT FROM NEW.mailbox_id THEN "
            + BUMP.format(row="OLD")
            + ";   END IF;"
            "  END IF;"
            "  RETURN NULL;"
            " END $$"
        )
        op.execute(
            "CREATE TRIGGER messages_mailbox_version AFTER INSERT OR DELETE OR UPDATE OF "
            f"{COLUMNS} ON messages FOR EACH ROW EXECUTE FUNCTION bump_mailbox_version()"
        )
        return
    op.execute(
        "CREATE TRIGGER messages_mailbox_version_insert AFTER INSERT ON messages BEGIN "
        + BUMP.format(row="new")
        + "; END"
    )
    op.execute(
        "CREATE TRIGGER messages_mailbox_version_delete AFTER DELETE ON messages BEGIN "
        + BUMP.format(row="old")
        + "; END"
    )
    op.execute(
        f"CREATE TRIGGER messages_mailbox_version_update AFTER UPDATE OF {COLUMNS} ON messages"
        " BEGIN " + BUMP.format(row="new") + "; " + BUMP.format(row="old") + "; END"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS messages_mailbox_version ON messages")
        op.execute("DROP FUNCTION IF EXISTS bump_mailbox_version()")
    else:
        for name in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS messages_mailbox_version_{name}")
    op.drop_table("mailbox_versions")
