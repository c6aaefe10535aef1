"""Bulk releases and deletes from the console: preview, confirmation, progress.

The confirmation page counts what the action will touch; the POST records a
``bulk`` job and starts it in a thread of this web process, and the progress page
polls the job. Leaving the page does not stop the job, and the scheduler resumes
one whose web worker died (see cleanmail/bulk.py).
"""

from __future__ import annotations

from typing import Any

from flask import abort, current_app, flash, jsonify, redirect, render_template, request, url_for
from flask_babel import gettext as _
from werkzeug.wrappers import Response

from cleanmail import bulk, search, web
from cleanmail.models import BulkJob, BulkStatus
from cleanmail.web.console import access, bp, parse_ids, time_zone
from cleanmail.web.console.forms import SearchForm
from cleanmail.web.console.messages import status_names
from cleanmail.web.preview import local_time

MAX_SELECTED = 1000
PREVIEW_CAP = 1_000_000  # counting beyond this would make the confirmation page slow


def _action() -> str:
    action = request.values.get("action", "")
    if action not in bulk.ACTIONS:
        abort(400)
    return action


def _selection() -> list[int]:
    ids = parse_ids(request.form.getlist("ids"), MAX_SELECTED)
    if ids is None:
        abort(400)
    return ids


@bp.route("/bulk/confirm", methods=["GET", "POST"])
def bulk_confirm() -> str | tuple[str, int] | Response:
    """How many messages an action would touch, and a button to go ahead.

    GET carries a search (everything matching it); POST carries a selection of ids.
    """
    action = _action()
    form = SearchForm.parse(request.args)
    if request.method == "POST":
        ids = _selection()
        if not ids:
            flash(_("Select at least one message first."), "error")
            return redirect(web.safe_next(request.form.get("next")) or url_for(".index"))
        query = search.Query(ids=tuple(ids))
    else:
        query = form.query(time_zone())
        if form.errors:
            return redirect(url_for(".index", **form.args()))
    target = bulk.target(action, query)
    try:
        count = search.count(web.session(), access(), target, cap=PREVIEW_CAP)
    except search.SearchError:
        abort(400)
    return render_template(
        "console/bulk_confirm.html",
        action=action,
        count=count,
        capped=count > PREVIEW_CAP,
        ids=list(query.ids),
        form=form,
        everything=query.is_empty() and not query.ids,
    )


@bp.post("/bulk")
def bulk_start() -> Response:
    """Record the job and start it; then show its progress."""
    action = _action()
    if request.form.get("ids"):
        query = search.Query(ids=tuple(_selection()))
    else:
        form = SearchForm.parse(request.form)
        query = form.query(time_zone())
        if form.errors:
            abort(400)
    session = web.session()
    try:
        job = bulk.create(session, access(), web.actor(), action, query)
    except search.SearchError:
        abort(400)
    session.commit()
    database = current_app.extensions["cleanmail.db"]
    bulk.start(database, web.store(), web.relay(), job.id)
    return redirect(url_for(".job", job_id=job.id), 303)


def _job(job_id: int) -> BulkJob:
    try:
        return bulk.get(web.session(), access(), job_id)
    except bulk.BulkError:
        abort(404)


def progress(job: BulkJob) -> dict[str, Any]:
    """What the progress page shows, and what it polls for."""
    handled = job.done + job.failed + job.skipped
    return {
        "id": job.id,
        "status": job.status,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "skipped": job.skipped,
        "handled": handled,
        "percent": 100
        if job.status == BulkStatus.DONE
        else min(99, int(100 * handled / job.total))
        if job.total
        else 0,
        "finished": job.status in (BulkStatus.DONE, BulkStatus.CANCELLED),
        "last_error": job.last_error,
    }


@bp.get("/jobs")
def jobs() -> str:
    """The newest bulk jobs."""
    tz = time_zone()
    rows = [
        {
            **progress(job),
            "action": job.action,
            "actor": job.actor,
            "created": local_time(job.created_at, tz),
        }
        for job in bulk.recent(web.session(), access())
    ]
    return render_template("console/jobs.html", rows=rows)


@bp.get("/jobs/<int:job_id>")
def job(job_id: int) -> str:
    """A job's progress; the page polls until it is finished, and can be left at any time."""
    found = _job(job_id)
    return render_template(
        "console/job.html",
        job=found,
        progress=progress(found),
        created=local_time(found.created_at, time_zone(), "medium"),
        criteria=_criteria(found),
    )


def _criteria(job: BulkJob) -> list[tuple[str, str]]:
    """What the job works on, field by field, in words."""
    labels = {
        "recipient": _("Recipient"),
        "sender": _("Sender"),
        "subject": _("Words in the subject"),
        "since": _("From"),
        "until": _("Until"),
        "reason": _("Reason"),
        "statuses": _("Status"),
        "min_score": _("Score from"),
        "max_score": _("Score to"),
        "ids": _("Selected messages"),
    }
    shown = []
    for name, value in job.criteria.items():
        if value in (None, "", []) or name not in labels:
            continue
        if name == "ids":
            text = str(len(value))
        elif name == "statuses":
            names = status_names()
            text = ", ".join(names.get(str(v), str(v)) for v in value)
        elif isinstance(value, list):
            text = ", ".join(str(v) for v in value)
        else:
            text = str(value)
        shown.append((labels[name], text))
    return shown


@bp.get("/jobs/<int:job_id>/progress")
def job_progress(job_id: int) -> Response:
    """A job's progress as JSON, for the progress page's script."""
    return jsonify(progress(_job(job_id)))


@bp.post("/jobs/<int:job_id>/cancel")
def job_cancel(job_id: int) -> Response:
    """Stop a job after the message in hand."""
    session = web.session()
    try:
        bulk.cancel(session, access(), web.actor(), job_id)
    except bulk.BulkError:
        abort(404)
    session.commit()
    flash(_("The job was stopped. What was done stays done."), "success")
    return redirect(url_for(".job", job_id=job_id), 303)
