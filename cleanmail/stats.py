"""Statistics: per-day counters added up by the filter, and summaries of the quarantine.

The filter counts in memory and adds its counts to ``daily_stats`` every few seconds
with one upsert per counter (``value = value + n``), so several filter processes on
several machines add up correctly and no message waits for a statistics write.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cleanmail import sql
from cleanmail.db import Database
from cleanmail.models import DailyStat, Domain, Mailbox, Message

log = logging.getLogger(__name__)

VERDICTS = ("passed", "quarantined", "rejected")
DAILY = ("scanned", *VERDICTS, "released", "reports_sent", "reports_failed")
# Upper bounds (seconds) of the filter latency histogram; the last bucket is "+Inf".
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FLUSH_SECONDS = 5.0
REASON = "reason:"  # counter-name prefix: held copies per reason code
SAMPLE = 50_000  # top sending domains are counted among the newest held messages

Key = tuple[date, str, str]  # day, domain, counter name


def today() -> date:
    """The current UTC day, the unit of every counter."""
    return datetime.now(UTC).date()


def latency_counter(seconds: float) -> str:
    """The name of the histogram bucket a check time falls in."""
    for bound in LATENCY_BUCKETS:
        if seconds <= bound:
            return f"latency_le_{bound:g}"
    return "latency_le_inf"


def reason_counter(code: str) -> str:
    """The counter of held copies that had a reason code."""
    return REASON + code[: 64 - len(REASON)]


def count_reasons(session: Session, domain: str, reasons: Iterable[dict[str, Any]]) -> None:
    """Count a held copy's reason codes inside the caller's transaction (ingest)."""
    codes = dict.fromkeys(str(r.get("code", "")) for r in reasons if isinstance(r, dict))
    add(session, {(today(), domain, reason_counter(code)): 1 for code in codes if code})


def add(session: Session, counts: Mapping[Key, int]) -> None:
    """Add counts to the daily counters (an atomic upsert per counter)."""
    rows = [
        {"day": day, "domain": domain, "name": name, "value": value}
        for (day, domain, name), value in sorted(counts.items())
        if value
    ]
    if not rows:
        return
    table = DailyStat.__table__
    statement = sql.insert(session, table)
    # Sorted rows take their row locks in one order, so two filters never deadlock.
    statement = statement.on_conflict_do_update(
        index_elements=["day", "domain", "name"],
        set_={"value": table.c.value + statement.excluded.value},
    )
    session.execute(statement, rows)


def bump(session: Session, name: str, domain: str = "", n: int = 1) -> None:
    """Add to one of today's counters inside the caller's transaction."""
    add(session, {(today(), domain, name): n})


def address_domain(address: str) -> str:
    """The lower-cased domain of an address, as counters are kept."""
    return address.rpartition("@")[2].lower()[:253]


class Counters:
    """Counts kept in memory by one process and written out now and then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[Key] = Counter()

    def count(self, name: str, domain: str = "", n: int = 1) -> None:
        """Add to one of today's counters."""
        with self._lock:
            self._counts[(today(), domain, name)] += n

    def verdicts(self, verdicts: Iterable[tuple[str, str, Iterable[str]]], seconds: float) -> None:
        """Count one checked message: per served recipient (domain, verdict, reason codes
        of a held copy), and the time it took."""
        day = today()
        with self._lock:
            for domain, verdict, codes in verdicts:
                self._counts[(day, domain, "scanned")] += 1
                self._counts[(day, domain, verdict)] += 1
                for code in dict.fromkeys(codes):
                    self._counts[(day, domain, reason_counter(code))] += 1
            self._counts[(day, "", latency_counter(seconds))] += 1
            self._counts[(day, "", "latency_ms_sum")] += round(seconds * 1000)

    def pending(self) -> dict[Key, int]:
        """What has not been written yet."""
        with self._lock:
            return dict(self._counts)

    def flush(self, database: Database) -> bool:
        """Write the counts; on failure keep them for the next try."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if not counts:
            return True
        try:
            with database.session_scope(write=True) as session:
                add(session, counts)
        except SQLAlchemyError as exc:
            log.warning("statistics not written, will retry: %s", str(exc).splitlines()[0])
            with self._lock:
                self._counts.update(counts)
            return False
        return True


class Flusher(threading.Thread):
    """Writes a process's counters every few seconds, and once more when stopped."""

    def __init__(self, counters: Counters, database: Database, every: float = FLUSH_SECONDS):
        super().__init__(name="stats-flush", daemon=True)
        self.counters, self.database, self.every = counters, database, every
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Flush until stopped."""
        while not self._stop_event.wait(self.every):
            self.counters.flush(self.database)

    def stop(self) -> None:
        """Stop and write what is left."""
        self._stop_event.set()
        if self.is_alive():
            self.join(self.every + 5)
        self.counters.flush(self.database)


# Reading: daily counters and summaries of the quarantine.


@dataclass(frozen=True)
class Summary:
    """Statistics over a period: counters per day, top reasons and senders, release rate."""

    since: date
    until: date
    days: list[dict[str, Any]]
    totals: dict[str, int]
    top_reasons: list[tuple[str, int]]
    top_sender_domains: list[tuple[str, int]]
    held: int
    released: int

    @property
    def release_rate(self) -> float:
        """Releases in the period for each copy held in it (capped at 1)."""
        return min(self.released / self.held, 1.0) if self.held else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "days": self.days,
            "totals": self.totals,
            "top_reasons": [{"code": c, "count": n} for c, n in self.top_reasons],
            "top_sender_domains": [{"domain": d, "count": n} for d, n in self.top_sender_domains],
            "held": self.held,
            "released": self.released,
            "release_rate": round(self.release_rate, 4),
        }


def daily(
    session: Session, since: date, until: date, domains: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """One row per day from ``since`` to ``until`` (inclusive) with every daily counter."""
    query = (
        select(DailyStat.day, DailyStat.name, func.sum(DailyStat.value))
        .where(DailyStat.day >= since, DailyStat.day <= until, DailyStat.name.in_(DAILY))
        .group_by(DailyStat.day, DailyStat.name)
    )
    if domains is not None:
        query = query.where(DailyStat.domain.in_(list(domains)))
    found: dict[date, dict[str, int]] = {}
    for day, name, value in session.execute(query):
        found.setdefault(day, {})[name] = int(value or 0)
    rows = []
    day = since
    while day <= until:
        counts = found.get(day, {})
        rows.append({"day": day.isoformat(), **{name: counts.get(name, 0) for name in DAILY}})
        day += timedelta(days=1)
    return rows


def totals(session: Session, domains: Iterable[str] | None = None) -> dict[str, int]:
    """Every counter summed over all days (what /metrics exposes)."""
    query = select(DailyStat.name, func.sum(DailyStat.value)).group_by(DailyStat.name)
    if domains is not None:
        query = query.where(DailyStat.domain.in_(list(domains)))
    return {name: int(value or 0) for name, value in session.execute(query)}


def by_domain(session: Session, names: Iterable[str]) -> list[tuple[str, str, int]]:
    """(domain, counter, total) for the given counters, over all days."""
    query = (
        select(DailyStat.domain, DailyStat.name, func.sum(DailyStat.value))
        .where(DailyStat.name.in_(list(names)))
        .group_by(DailyStat.domain, DailyStat.name)
    )
    return [(domain, name, int(value or 0)) for domain, name, value in session.execute(query)]


def _scope(query: Any, domains: Iterable[str] | None) -> Any:
    if domains is None:
        return query
    mailbox_ids = (
        select(Mailbox.id)
        .join(Domain, Mailbox.domain_id == Domain.id)
        .where(Domain.name.in_(list(domains)))
    )
    return query.where(Message.mailbox_id.in_(mailbox_ids))


def top_sender_domains(
    session: Session, since: datetime, domains: Iterable[str] | None = None, limit: int = 10
) -> list[tuple[str, int]]:
    """The sending domains with the most messages among the newest held since a time.

    Counted among the newest ``SAMPLE`` messages, so that the page costs the same at a
    million messages as at a thousand (an index range on received_at).
    """
    newest = _scope(select(Message.sender_domain).where(Message.received_at >= since), domains)
    newest = newest.order_by(Message.received_at.desc()).limit(SAMPLE).subquery()
    count = func.count().label("n")
    query = select(newest.c.sender_domain, count).group_by(newest.c.sender_domain)
    query = query.order_by(count.desc(), newest.c.sender_domain).limit(limit)
    return [(domain or "(none)", n) for domain, n in session.execute(query)]


def top_reasons(
    session: Session,
    since: date,
    until: date,
    domains: Iterable[str] | None = None,
    limit: int = 10,
) -> list[tuple[str, int]]:
    """The reason codes of the most held copies in a period (from the daily counters)."""
    total = func.sum(DailyStat.value).label("n")
    query = (
        select(DailyStat.name, total)
        .where(DailyStat.day >= since, DailyStat.day <= until, DailyStat.name.like(REASON + "%"))
        .group_by(DailyStat.name)
        .order_by(total.desc(), DailyStat.name)
        .limit(limit)
    )
    if domains is not None:
        query = query.where(DailyStat.domain.in_(list(domains)))
    return [(name.removeprefix(REASON), int(n or 0)) for name, n in session.execute(query)]


def summary(
    session: Session, days: int = 30, domains: Iterable[str] | None = None, *, limit: int = 10
) -> Summary:
    """Statistics for the last ``days`` days (today included)."""
    domains = None if domains is None else sorted(domains)
    until = today()
    since = until - timedelta(days=max(days, 1) - 1)
    start = datetime(since.year, since.month, since.day, tzinfo=UTC)
    rows = daily(session, since, until, domains)
    sums = {name: sum(row[name] for row in rows) for name in DAILY}
    return Summary(
        since,
        until,
        rows,
        sums,
        top_reasons(session, since, until, domains, limit),
        top_sender_domains(session, start, domains, limit),
        sums["quarantined"],
        sums["released"],
    )
