"""Quarantine reports in the console: the last runs, failures, retries, and resending one."""

from __future__ import annotations

from typing import Any

from flask import abort, current_app, flash, redirect, render_template, url_for
from flask_babel import gettext as _
from sqlalchemy import func, select
from werkzeug.wrappers import Response

from cleanmail import audit, reports, web
from cleanmail.models import Mailbox, Report, ReportRun, ReportStatus, utcnow
from cleanmail.web.console import access, bp, time_zone
from cleanmail.web.preview import local_time

SHOWN = 50
RUNS_SHOWN = 10


def _visible_reports() -> Any:
    """Reports joined to their mailbox, within what the member may see."""
    return (
        select(Report, Mailbox.address)
        .join(Mailbox, Mailbox.id == Report.mailbox_id)
        .where(*access().mailbox_conditions())
    )


def _rows(query: Any, tz: Any) -> list[dict[str, Any]]:
    return [
        {
            "id": report.id,
            "mailbox_id": report.mailbox_id,
            "address": address,
            "created": local_time(report.created_at, tz),
            "next": local_time(report.next_attempt_at, tz) if report.next_attempt_at else "",
            "attempts": report.attempts,
            "count": report.message_count,
            "error": report.last_error or "",
            "status": report.status,
        }
        for report, address in web.session().execute(query)
    ]


@bp.get("/reports")
def reports_index() -> str:
    """The last runs (operators), and the reports that failed or wait for a retry."""
    session = web.session()
    tz = time_zone()
    base = _visible_reports()
    failed = base.where(Report.status == ReportStatus.FAILED)
    retrying = base.where(Report.status == ReportStatus.PENDING, Report.attempts > 0)
    counts = dict(
        session.execute(
            select(Report.status, func.count())
            .join(Mailbox, Mailbox.id == Report.mailbox_id)
            .where(*access().mailbox_conditions())
            .group_by(Report.status)
        ).all()
    )
    runs = []
    if access().operator:
        query = select(ReportRun).order_by(ReportRun.id.desc()).limit(RUNS_SHOWN)
        runs = [
            {
                "started": local_time(run.started_at, tz),
                "finished": local_time(run.finished_at, tz) if run.finished_at else "",
                "trigger": run.trigger,
                "node": run.node,
                "sent": run.sent,
                "failed": run.failed,
            }
            for run in session.scalars(query)
        ]
    return render_template(
        "console/reports.html",
        runs=runs,
        counts={s.value: counts.get(s.value, 0) for s in ReportStatus},
        failed=_rows(failed.order_by(Report.id.desc()).limit(SHOWN), tz),
        retrying=_rows(retrying.order_by(Report.next_attempt_at).limit(SHOWN), tz),
    )


@bp.post("/reports/<int:report_id>/resend")
def report_resend(report_id: int) -> Response:
    """Send a failed or waiting report now, once."""
    session = web.session()
    found = session.execute(_visible_reports().where(Report.id == report_id)).first()
    if found is None:
        abort(404)
    report = found[0]
    if report.status == ReportStatus.SENT:
        flash(_("This report was already sent."), "error")
        return redirect(url_for(".reports_index"), 303)
    report.status, report.next_attempt_at = ReportStatus.PENDING, None
    audit.record(
        session, web.actor(), "report.resend", mailbox_id=report.mailbox_id, report_id=report.id
    )
    session.commit()
    database = current_app.extensions["cleanmail.db"]
    sent = reports.send_one(database.write_sessions, web.relay(), web.config(), report.id, utcnow())
    if sent:
        flash(_("The report was sent."), "success")
    elif sent is None:
        flash(_("The report is being sent right now."), "success")
    else:
        flash(_("The mail server did not take the report. It will be tried again."), "error")
    return redirect(url_for(".reports_index"), 303)
