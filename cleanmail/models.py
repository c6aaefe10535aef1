"""Typed SQLAlchemy models: domains, mailboxes, quarantined messages, lists, audit."""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Names every constraint, so that Alembic migrations can refer to them on both databases.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BigId = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    """The current time, UTC-aware."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always returned timezone-aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with named constraints."""

    metadata = MetaData(naming_convention=NAMING)


class Role(enum.StrEnum):
    """What a mailbox row may do in Cleanmail."""

    OWNER = "owner"
    DOMAIN_ADMIN = "domain_admin"
    OPERATOR = "operator"


class ReportFrequency(enum.StrEnum):
    """How often an owner gets a quarantine report."""

    NEVER = "never"
    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"


class Status(enum.StrEnum):
    """The fate of a quarantined message."""

    NEW = "new"
    RELEASED = "released"
    DELETED = "deleted"
    EXPIRED = "expired"


class Scope(enum.StrEnum):
    """Whose list an entry belongs to."""

    GLOBAL = "global"
    DOMAIN = "domain"
    MAILBOX = "mailbox"


class ListAction(enum.StrEnum):
    """Allow (whitelist) or block (blacklist)."""

    ALLOW = "allow"
    BLOCK = "block"


class Domain(Base):
    """A mail domain that Cleanmail serves."""

    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    quarantine_threshold: Mapped[float | None] = mapped_column(Float)
    reject_threshold: Mapped[float | None] = mapped_column(Float)
    allow_hourly_reports: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    mailboxes: Mapped[list[Mailbox]] = relationship(back_populates="domain")


class Mailbox(Base):
    """A mailbox owner (or a member of staff) who can use Cleanmail."""

    __tablename__ = "mailboxes"

    id: Mapped[int] = mapped_column(primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    domain_id: Mapped[int | None] = mapped_column(
        ForeignKey("domains.id", ondelete="CASCADE"), index=True
    )
    password_hash: Mapped[str | None] = mapped_column(String(255))
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    language: Mapped[str] = mapped_column(String(8), default="nb")
    report_frequency: Mapped[str] = mapped_column(String(16), default=ReportFrequency.DAILY)
    timezone: Mapped[str] = mapped_column(String(64), default="Europe/Oslo")
    key_version: Mapped[int] = mapped_column(Integer, default=1)
    role: Mapped[str] = mapped_column(String(16), default=Role.OWNER)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_report_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    report_hour: Mapped[int] = mapped_column(Integer, default=7)  # local hour reports go out

    domain: Mapped[Domain | None] = relationship(back_populates="mailboxes")


class RawMessage(Base):
    """One stored raw message file, shared by every recipient row that refers to it."""

    __tablename__ = "raw_messages"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Message(Base):
    """A quarantined message for one recipient mailbox."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_mailbox_received", "mailbox_id", "received_at", "id"),
        Index("ix_messages_mailbox_status_received", "mailbox_id", "status", "received_at"),
        Index("ix_messages_status_expires", "status", "expires_at"),
        Index("ix_messages_sender_domain_received", "sender_domain", "received_at"),
        Index("ix_messages_received", "received_at"),
        # A message that Postfix retries after a 4xx is stored once per mailbox.
        Index("uq_messages_mailbox_raw", "mailbox_id", "raw_sha256", unique=True),
        Index("ix_messages_raw_sha256", "raw_sha256"),
        # The operators' search (cleanmail/search.py). On PostgreSQL migration 0004 also adds
        # trigram (subject words) and JSONB (reason codes) GIN indexes.
        Index("ix_messages_from_address_received", "from_address", "received_at"),
        Index(
            "ix_messages_envelope_sender_received",
            func.lower(func.substr(text("envelope_sender"), 1, 320)),
            "received_at",
        ),
        Index("ix_messages_score_id", "score", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    raw_sha256: Mapped[str | None] = mapped_column(
        ForeignKey("raw_messages.sha256", ondelete="SET NULL")
    )
    envelope_sender: Mapped[str] = mapped_column(String(998), default="")
    from_header: Mapped[str] = mapped_column(Text, default="")
    from_address: Mapped[str] = mapped_column(String(320), default="")
    sender_domain: Mapped[str] = mapped_column(String(253), default="")
    subject: Mapped[str] = mapped_column(Text, default="")
    message_id_header: Mapped[str] = mapped_column(String(998), default="")
    date_header: Mapped[datetime | None] = mapped_column(UTCDateTime)
    size: Mapped[int] = mapped_column(BigInteger)
    score: Mapped[float] = mapped_column(Float, default=0.0)
    reasons: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), default=Status.NEW)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    release_error: Mapped[str | None] = mapped_column(Text)
    release_attempts: Mapped[int] = mapped_column(Integer, default=0)
    client_address: Mapped[str | None] = mapped_column(String(64))
    client_helo: Mapped[str | None] = mapped_column(String(255))
    # The quarantine report that told the owner about this message (None: not yet told).
    report_id: Mapped[int | None] = mapped_column(
        ForeignKey("reports.id", ondelete="SET NULL"), index=True
    )

    mailbox: Mapped[Mailbox] = relationship()


class ListEntry(Base):
    """An allow or block pattern, owned by one mailbox, one domain or everyone."""

    __tablename__ = "list_entries"
    __table_args__ = (
        # One pattern is on at most one of an owner's two lists.
        Index(
            "uq_list_entries_mailbox_pattern",
            "mailbox_id",
            "pattern",
            unique=True,
            sqlite_where=text("scope = 'mailbox'"),
            postgresql_where=text("scope = 'mailbox'"),
        ),
        Index(
            "uq_list_entries_domain_pattern",
            "domain_id",
            "pattern",
            unique=True,
            sqlite_where=text("scope = 'domain'"),
            postgresql_where=text("scope = 'domain'"),
        ),
        Index(
            "uq_list_entries_global_pattern",
            "pattern",
            unique=True,
            sqlite_where=text("scope = 'global'"),
            postgresql_where=text("scope = 'global'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(16))
    pattern: Mapped[str] = mapped_column(String(320))
    mailbox_id: Mapped[int | None] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    domain_id: Mapped[int | None] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    comment: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AuditEvent(Base):
    """One change of a message's fate or of a setting: who, what, when, from where."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_at", "at"),
        Index("ix_audit_events_mailbox_at", "mailbox_id", "at"),
        Index("ix_audit_events_action_at", "action", "at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor_type: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(320), default="")
    action: Mapped[str] = mapped_column(String(64))
    mailbox_id: Mapped[int | None] = mapped_column(ForeignKey("mailboxes.id", ondelete="SET NULL"))
    message_id: Mapped[int | None] = mapped_column(BigInteger)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    remote_addr: Mapped[str | None] = mapped_column(String(64))


class RateLimit(Base):
    """A counter of attempts under one key in a fixed time window (shared by all web nodes)."""

    __tablename__ = "rate_limits"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    count: Mapped[int] = mapped_column(Integer, default=0)


class RecoveryCode(Base):
    """A one-time code that stands in for the authenticator app, stored hashed."""

    __tablename__ = "recovery_codes"

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(
        ForeignKey("mailboxes.id", ondelete="CASCADE"), index=True
    )
    code_hash: Mapped[str] = mapped_column(String(64))
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ReportStatus(enum.StrEnum):
    """Where a quarantine report is on its way to the owner."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class ReportRun(Base):
    """One pass of the report job over the mailboxes that are due."""

    __tablename__ = "report_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    trigger: Mapped[str] = mapped_column(String(16), default="schedule")
    node: Mapped[str] = mapped_column(String(255), default="")
    sent: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)


class Report(Base):
    """One quarantine report for one mailbox: which messages it covers and whether it went."""

    __tablename__ = "reports"
    __table_args__ = (
        Index("ix_reports_status_next_attempt", "status", "next_attempt_at"),
        Index("ix_reports_mailbox_created", "mailbox_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("report_runs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default=ReportStatus.PENDING)
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    message_id_header: Mapped[str] = mapped_column(String(255), default="")


class DomainAdmin(Base):
    """A domain that a domain admin looks after: they see and act on its mail only."""

    __tablename__ = "domain_admins"
    __table_args__ = (Index("ix_domain_admins_domain_id", "domain_id"),)

    mailbox_id: Mapped[int] = mapped_column(
        ForeignKey("mailboxes.id", ondelete="CASCADE"), primary_key=True
    )
    domain_id: Mapped[int] = mapped_column(
        ForeignKey("domains.id", ondelete="CASCADE"), primary_key=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BulkStatus(enum.StrEnum):
    """Where a bulk release or delete is."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class BulkJob(Base):
    """A release or delete of many messages, worked through in the background with progress."""

    __tablename__ = "bulk_jobs"
    __table_args__ = (Index("ix_bulk_jobs_status_heartbeat", "status", "heartbeat_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    action: Mapped[str] = mapped_column(String(16))
    # The search (search.Query as a dict) or the selected ids the job works through.
    criteria: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The staff member's domains at the time (None: every domain); checked again per message.
    domain_ids: Mapped[list[int] | None] = mapped_column(JSON)
    staff_id: Mapped[int | None] = mapped_column(ForeignKey("mailboxes.id", ondelete="SET NULL"))
    actor_type: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(320), default="")
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=BulkStatus.PENDING)
    worker: Mapped[str | None] = mapped_column(String(64))  # the runner that claimed it
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    last_id: Mapped[int] = mapped_column(BigInteger, default=0)  # the keyset cursor: resumable
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Label(enum.StrEnum):
    """What a person's decision says a message is, for the learning classifier."""

    HAM = "ham"
    SPAM = "spam"


class LearningEvent(Base):
    """One decision to learn from: a release (ham), a block or a spam mark (spam).

    Written in the same transaction as the action itself; the scheduler's learning job
    folds the pending ones into a new classifier model. The tokens are kept so that the
    lesson survives the raw file's purge; the hash lets external engines re-read it.
    """

    __tablename__ = "learning_events"
    __table_args__ = (Index("ix_learning_events_applied_id", "applied_version", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    label: Mapped[str] = mapped_column(String(8))
    source: Mapped[str] = mapped_column(String(32))  # release, block, operator, cli ...
    actor_type: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(320), default="")
    raw_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    message_id: Mapped[int | None] = mapped_column(BigInteger)
    mailbox_id: Mapped[int | None] = mapped_column(
        ForeignKey("mailboxes.id", ondelete="SET NULL"), index=True
    )
    tokens: Mapped[str] = mapped_column(Text, default="")
    # The model version that took this event in (None: waiting for the learning job).
    applied_version: Mapped[int | None] = mapped_column(Integer)


class ClassifierModel(Base):
    """One version of the learned classifier's state; filters load the newest."""

    __tablename__ = "classifier_models"

    id: Mapped[int] = mapped_column(primary_key=True)  # the version
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    source: Mapped[str] = mapped_column(String(32))  # train, learn
    actor: Mapped[str] = mapped_column(String(320), default="")
    ham_count: Mapped[int] = mapped_column(Integer, default=0)
    spam_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[bytes] = mapped_column(LargeBinary)


class EngineLesson(Base):
    """A learning event on its way to one external engine (rspamd, spamd).

    ``outcome`` is None while the lesson waits (``next_try_at`` says when it is tried
    again), then "learned", or "failed" once the feedback job gave up; ``last_error``
    keeps the engine's last answer for operators.
    """

    __tablename__ = "engine_lessons"
    __table_args__ = (
        UniqueConstraint("event_id", "engine", name="uq_engine_lessons_event_engine"),
        Index("ix_engine_lessons_due", "engine", "outcome", "next_try_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("learning_events.id", ondelete="CASCADE"),
    )
    engine: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str | None] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DailyStat(Base):
    """One counter for one day and domain ("" when no domain applies), added to atomically."""

    __tablename__ = "daily_stats"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    domain: Mapped[str] = mapped_column(String(253), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class ApiToken(Base):
    """A bearer token for the REST API, stored as a hash; no domains means operator scope."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    domains: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(320), default="")
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class MailboxVersion(Base):
    """A number that database triggers bump with every change to a mailbox's listed messages.

    Migration 0009 keeps it; the web app keeps rendered list pages under it.
    """

    __tablename__ = "mailbox_versions"

    mailbox_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class EndedSession(Base):
    """A login session ended by logging out: a copy of its cookie logs nobody in."""

    __tablename__ = "ended_sessions"

    sid: Mapped[str] = mapped_column(String(64), primary_key=True)
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
