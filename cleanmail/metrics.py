"""Prometheus metrics, computed from the database at each scrape.

Counting lives in the database (``daily_stats``, the reports and messages tables), so
every filter process and web worker on every node adds to the same numbers and any
web worker can answer a scrape: nothing to aggregate across gunicorn workers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, inspect, select, text
from sqlalchemy.orm import Session

from cleanmail import stats
from cleanmail.models import BulkJob, BulkStatus, Message, Report, ReportStatus, Status
from cleanmail.scheduler import JOBS_TABLE


def latency_buckets(totals: dict[str, int]) -> list[tuple[str, float]]:
    """Cumulative histogram buckets from the per-bucket counters."""
    buckets, running = [], 0
    for bound in stats.LATENCY_BUCKETS:
        running += totals.get(f"latency_le_{bound:g}", 0)
        buckets.append((f"{bound:g}", float(running)))
    running += totals.get("latency_le_inf", 0)
    buckets.append(("+Inf", float(running)))
    return buckets


def scheduler_lag(session: Session) -> float | None:
    """Seconds the most overdue scheduled job is late (None: the scheduler never ran)."""
    bind = session.get_bind()
    if not inspect(bind).has_table(JOBS_TABLE):
        return None
    # The table is APScheduler's; its name is our constant, not input.
    due = session.scalar(text(f"SELECT min(next_run_time) FROM {JOBS_TABLE}"))  # noqa: S608
    if due is None:
        return None
    return max(0.0, time.time() - float(due))


class DatabaseCollector(Collector):
    """Reads the numbers from the database with one short session per scrape."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def collect(self) -> Iterator[Any]:
        """Every Cleanmail metric."""
        session = self.session
        totals = stats.totals(session)
        messages = CounterMetricFamily(
            "cleanmail_messages", "Copies checked by the filter, by verdict", labels=["verdict"]
        )
        for verdict in stats.VERDICTS:
            messages.add_metric([verdict], totals.get(verdict, 0))
        yield messages
        yield CounterMetricFamily(
            "cleanmail_messages_scanned",
            "Copies checked by the filter",
            value=totals.get("scanned", 0),
        )
        yield CounterMetricFamily(
            "cleanmail_messages_ingested",
            "Messages pushed in by a site's own scanner",
            value=totals.get("ingested", 0),
        )
        buckets = latency_buckets(totals)
        yield HistogramMetricFamily(
            "cleanmail_filter_latency_seconds",
            "Time to check and deliver one message in the filter",
            buckets=buckets,
            sum_value=totals.get("latency_ms_sum", 0) / 1000,
        )
        yield CounterMetricFamily(
            "cleanmail_releases",
            "Messages released from quarantine",
            value=totals.get("released", 0),
        )
        yield CounterMetricFamily(
            "cleanmail_reports_sent", "Quarantine reports sent", value=totals.get("reports_sent", 0)
        )
        yield CounterMetricFamily(
            "cleanmail_reports_failed",
            "Attempts to send a quarantine report that failed",
            value=totals.get("reports_failed", 0),
        )
        yield from self._queues(session)

    def _queues(self, session: Session) -> Iterator[Any]:
        def count(model: Any, *where: Any) -> int:
            return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

        retries = GaugeMetricFamily(
            "cleanmail_retry_queue", "Work waiting for another attempt", labels=["kind"]
        )
        retries.add_metric(
            ["report"], count(Report, Report.status == ReportStatus.PENDING, Report.attempts > 0)
        )
        retries.add_metric(
            ["release"],
            count(Message, Message.status == Status.NEW, Message.release_error.is_not(None)),
        )
        yield retries
        yield GaugeMetricFamily(
            "cleanmail_reports_given_up",
            "Quarantine reports that failed for good",
            value=count(Report, Report.status == ReportStatus.FAILED),
        )
        yield GaugeMetricFamily(
            "cleanmail_bulk_jobs_running",
            "Bulk releases and deletes under way",
            value=count(BulkJob, BulkJob.status.in_([BulkStatus.PENDING, BulkStatus.RUNNING])),
        )
        lag = scheduler_lag(session)
        if lag is not None:
            yield GaugeMetricFamily(
                "cleanmail_scheduler_lag_seconds",
                "How late the most overdue scheduled job is (0 when none is late)",
                value=lag,
            )


def registry(session: Session) -> CollectorRegistry:
    """A registry holding only our database collector."""
    found = CollectorRegistry(auto_describe=False)
    found.register(DatabaseCollector(session))
    return found
