"""The operators' search across every mailbox, limited by the searcher's ``staff.Access``.

Pages are keyset-paginated on (sort value, id), so page 1,000 costs what page 1 does.
The indexes behind it (migration 0004): recipient through ``mailbox_id`` (mailbox,
received_at, id); sender domain (sender_domain, received_at); sender address on the
From address and on the lower-cased envelope sender; score (score, id); dates
(received_at). Subject words (``subject_words``) use a word index (migration 0008): a
GIN index on a tsvector on PostgreSQL, an FTS5 table on SQLite. Reason codes use a JSONB
GIN index on PostgreSQL; SQLite scans within the other conditions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal_column, or_, select, text
from sqlalchemy.orm import Session

from cleanmail import mailboxes, quarantine_list
from cleanmail.models import Domain, Mailbox, Message, Status
from cleanmail.staff import Access

MAX_WORDS = 8
# Exactly the expression of ix_messages_envelope_sender_received, with literal numbers:
# bound parameters in their place would keep either database from using the index.
ENVELOPE_SENDER = func.lower(
    func.substr(Message.envelope_sender, literal_column("1"), literal_column("320"))
)
MAX_IDS = 10_000
# The subject's words on PostgreSQL, exactly as migration 0008 indexes them. Punctuation
# that the text parser would glue into e-mail, host, URL, version or tag tokens becomes a
# space first, so that "shop.example.com" holds the words "shop", "example" and "com" as
# FTS5 (SQLite) sees it.
SUBJECT_WORDS = literal_column(
    "to_tsvector('simple'::regconfig, translate(messages.subject, '.@/:-_<>&+=', '           '))"
)
SUBJECT_FTS = "SELECT rowid FROM messages_subject_fts WHERE messages_subject_fts MATCH :words"
# SQLite: words matching at most this many messages are looked up by id and sorted; more
# (a common word) and the search walks its sort order, checking each row against FTS5.
RARE = 5_000


class SearchError(ValueError):
    """A search that cannot be run; the message says which field is wrong."""


@dataclass(frozen=True)
class Query:
    """What to look for; every field left empty matches everything."""

    recipient: str = ""  # an address, or a domain: all of its mailboxes
    sender: str = ""  # an address (From or envelope sender), or a domain
    subject: str = ""  # words that must all appear in the subject (``subject_words``)
    since: datetime | None = None
    until: datetime | None = None
    reason: str = ""
    statuses: tuple[str, ...] = ()  # empty: any status
    min_score: float | None = None
    max_score: float | None = None
    ids: tuple[int, ...] = field(default=())  # a selection of messages

    def to_json(self) -> dict[str, Any]:
        """The query as JSON-safe values (kept with a bulk job)."""
        values = asdict(self)
        for name in ("since", "until"):
            values[name] = values[name].isoformat() if values[name] else None
        values["statuses"], values["ids"] = list(self.statuses), list(self.ids)
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> Query:
        """The query that ``to_json`` gave."""
        values = dict(values)
        for name in ("since", "until"):
            values[name] = datetime.fromisoformat(values[name]) if values.get(name) else None
        values["statuses"] = tuple(values.get("statuses") or ())
        values["ids"] = tuple(int(i) for i in values.get("ids") or ())
        return cls(**values)

    def is_empty(self) -> bool:
        """True when nothing narrows the search."""
        return self == Query(statuses=self.statuses)


# What a page can be sorted by; the recipient sorts through the joined mailbox.
SORTS: dict[str, Any] = {
    "date": Message.received_at,
    "score": Message.score,
    "sender": Message.from_address,
    "size": Message.size,
    "recipient": Mailbox.address,
}


@dataclass(frozen=True)
class Order:
    """How a page is sorted."""

    sort: str = "date"
    descending: bool = True

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise SearchError(f"cannot sort by {self.sort!r}")


@dataclass(frozen=True)
class Cursor:
    """The sort value and id of the last row of a page: where the next page starts."""

    value: Any
    id: int

    def encode(self) -> str:
        """The cursor as a query-string value."""
        value = self.value.isoformat() if isinstance(self.value, datetime) else self.value
        return json.dumps([value, self.id], separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | None, order: Order) -> Cursor | None:
        """The cursor in a query-string value, or None for anything malformed."""
        try:
            value, ident = json.loads(text or "")
            if not isinstance(ident, int) or not 0 <= ident < 2**63:
                return None
            if order.sort == "date":
                value = datetime.fromisoformat(value)
                if value.tzinfo is None:
                    return None
            elif order.sort in ("score", "size"):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    return None
            elif not isinstance(value, str):
                return None
        except (ValueError, TypeError):
            return None
        return cls(value, ident)


@dataclass(frozen=True)
class Row:
    """One search result: the message and its recipient's address."""

    message: Message
    recipient: str


@dataclass(frozen=True)
class Page:
    """One page of results and the cursor of the next one (None on the last page)."""

    rows: list[Row]
    next: Cursor | None


def subject_words(text: str) -> list[str]:
    """The words a subject search looks for: runs of letters and digits, lower-cased.

    A message matches when its subject holds every one of them as a whole word, in any
    order and any case ("invoice 223" does not find "Invoice 2231"). Punctuation only
    separates words, so "100%_" looks for the word "100". At most ``MAX_WORDS`` count.
    """
    return re.findall(r"[^\W_]+", text.lower())[:MAX_WORDS]


def _subject(session: Session, words: list[str]) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        query = func.to_tsquery(literal_column("'simple'::regconfig"), " & ".join(words))
        return SUBJECT_WORDS.op("@@")(query)
    match = " ".join(f'"{word}"' for word in words)
    found = list(session.scalars(text(f"{SUBJECT_FTS} LIMIT {RARE + 1}"), {"words": match}))
    if len(found) <= RARE:
        return Message.id.in_(found)
    # "+id": not an index on the id, so SQLite keeps the sort column's index for the order.
    matching = text(SUBJECT_FTS).bindparams(words=match).columns(rowid=Message.id.type)
    return literal_column("+messages.id").in_(matching)


def _recipient(text: str) -> Any:
    if "@" in text:
        wanted = select(Mailbox.id).where(Mailbox.address == mailboxes.normalize_address(text))
    else:
        name = mailboxes.normalize_domain(text)
        wanted = select(Mailbox.id).join(Domain, Domain.id == Mailbox.domain_id)
        wanted = wanted.where(Domain.name == name)
    return Message.mailbox_id.in_(wanted)


def _sender(text: str) -> Any:
    value = text.strip().strip("<>").strip().lower()
    if "@" in value:
        return or_(Message.from_address == value, ENVELOPE_SENDER == value)
    return Message.sender_domain == mailboxes.normalize_domain(value)


def conditions(session: Session, access: Access, query: Query) -> list[Any]:
    """The WHERE conditions of a search, always within what ``access`` may see."""
    found: list[Any] = list(access.message_conditions())
    try:
        if query.recipient.strip():
            found.append(_recipient(query.recipient))
        if query.sender.strip():
            found.append(_sender(query.sender))
    except mailboxes.MailboxError as exc:
        raise SearchError(str(exc)) from None
    words = subject_words(query.subject)
    if words:
        found.append(_subject(session, words))
    if query.reason:
        found.append(quarantine_list.has_reason(session, query.reason))
    if query.statuses:
        statuses = [Status(status) for status in query.statuses]
        found.append(Message.status.in_(statuses))
    if query.since is not None:
        found.append(Message.received_at >= query.since)
    if query.until is not None:
        found.append(Message.received_at < query.until)
    if query.min_score is not None:
        found.append(Message.score >= query.min_score)
    if query.max_score is not None:
        found.append(Message.score <= query.max_score)
    if query.ids:
        found.append(Message.id.in_(list(query.ids[:MAX_IDS])))
    return found


def _past(column: Any, cursor: Cursor, descending: bool) -> list[Any]:
    """Rows after a cursor, written so that an index range on the sort column is used."""
    if descending:
        return [column <= cursor.value, (column < cursor.value) | (Message.id < cursor.id)]
    return [column >= cursor.value, (column > cursor.value) | (Message.id > cursor.id)]


def page(
    session: Session,
    access: Access,
    query: Query,
    order: Order | None = None,
    *,
    after: Cursor | None = None,
    limit: int = 50,
) -> Page:
    """One page of matches, sorted, starting after a cursor."""
    order = order or Order()
    column = SORTS[order.sort]
    statement = (
        select(Message, Mailbox.address)
        .join(Mailbox, Mailbox.id == Message.mailbox_id)
        .where(*conditions(session, access, query))
    )
    if after is not None:
        statement = statement.where(*_past(column, after, order.descending))
    if order.descending:
        statement = statement.order_by(column.desc(), Message.id.desc())
    else:
        statement = statement.order_by(column.asc(), Message.id.asc())
    found = session.execute(statement.limit(limit + 1)).all()
    rows = [Row(message, address) for message, address in found[:limit]]
    more = len(found) > limit
    if not more or not rows:
        return Page(rows, None)
    last = rows[-1]
    value = last.recipient if order.sort == "recipient" else getattr(last.message, column.key)
    return Page(rows, Cursor(value, last.message.id))


def count(session: Session, access: Access, query: Query, *, cap: int | None = None) -> int:
    """How many messages match (counting at most ``cap`` + 1, to keep a preview quick)."""
    matches = select(Message.id).where(*conditions(session, access, query))
    if cap is not None:
        matches = matches.limit(cap + 1)
    return session.scalar(select(func.count()).select_from(matches.subquery())) or 0


def batches(
    session: Session, access: Access, query: Query, *, after_id: int = 0, size: int = 500
) -> Iterator[list[int]]:
    """The ids of every match in ascending batches, from ``after_id`` on (for bulk work).

    Each batch is its own keyset query, so rows that change status meanwhile do not
    shift the batches, and the caller may commit between them.
    """
    where = conditions(session, access, query)
    while True:
        statement = select(Message.id).where(*where, Message.id > after_id)
        ids = list(session.scalars(statement.order_by(Message.id).limit(size)))
        if not ids:
            return
        yield ids
        after_id = ids[-1]
