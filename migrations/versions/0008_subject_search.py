"""subject search: a word index on messages.subject (full-text, not trigrams)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22

PostgreSQL: a GIN index on the subject's words (``search.SUBJECT_WORDS``, the 'simple'
configuration: no stemming, no stop words). It replaces 0004's trigram index, which only
the subject search used, so the filter's inserts keep one GIN index to update. SQLite: an FTS5 table over the subject,
with ``messages`` as its content, kept in step by triggers.
"""

from alembic import op
import sqlalchemy as sa

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Keep in step with cleanmail/search.py (SUBJECT_WORDS): the planner uses the index only
# for exactly this expression.
PG_WORDS = "to_tsvector('simple'::regconfig, translate(subject, '.@/:-_<>&+=', '           '))"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE INDEX ix_messages_subject_words ON messages USING gin (({PG_WORDS}))")
        op.execute("DROP INDEX IF EXISTS ix_messages_subject_trgm")
        return
    op.execute(
        "CREATE VIRTUAL TABLE messages_subject_fts USING fts5("
        "subject, content='messages', content_rowid='id',"
        " tokenize='unicode61 remove_diacritics 0')"
    )
    op.execute(
        "CREATE TRIGGER messages_subject_fts_insert AFTER INSERT ON messages BEGIN"
        " INSERT INTO messages_subject_fts (rowid, subject) VALUES (new.id, new.subject); END"
    )
    op.execute(
        "CREATE TRIGGER messages_subject_fts_delete AFTER DELETE ON messages BEGIN"
        " INSERT INTO messages_subject_fts (messages_subject_fts, rowid, subject)"
        " VALUES ('delete', old.id, old.subject); END"
    )
    op.execute(
        "CREATE TRIGGER messages_subject_fts_update AFTER UPDATE OF subject ON messages BEGIN"
        " INSERT INTO messages_subject_fts (messages_subject_fts, rowid, subject)"
        " VALUES ('delete', old.id, old.subject);"
        " INSERT INTO messages_subject_fts (rowid, subject) VALUES (new.id, new.subject); END"
    )
    op.execute("INSERT INTO messages_subject_fts (messages_subject_fts) VALUES ('rebuild')")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_messages_subject_words")
        trigram = sa.text("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")
        if op.get_bind().execute(trigram).first() is not None:  # as 0004 made it
            op.execute(
                "CREATE INDEX IF NOT EXISTS ix_messages_subject_trgm"
                " ON messages USING gin (subject gin_trgm_ops)"
            )
        return
    for name in ("insert", "delete", "update"):
        op.execute(f"DROP TRIGGER IF EXISTS messages_subject_fts_{name}")
    op.execute("DROP TABLE IF EXISTS messages_subject_fts")
