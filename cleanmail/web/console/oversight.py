"""The console's audit log (filters, CSV export), statistics with charts, and API tokens."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from flask import Response, abort, render_template, request, stream_with_context
from flask_babel import gettext as _

from cleanmail import apitokens, auditlog, stats, web
from cleanmail.web.console import access, bp, require_operator, time_zone, visible_domains
from cleanmail.web.preview import local_time

AUDIT_SHOWN = 100
PERIODS = (7, 30, 90)


def _day(value: str) -> date | None:
    try:
        day = date.fromisoformat(value.strip())
    except ValueError:
        return None
    return day if date(1900, 1, 1) <= day <= date(9000, 1, 1) else None


def _domain_names() -> list[str] | None:
    """The domains the member may see by name, or None for an operator (every domain)."""
    if access().operator:
        return None
    return [domain.name for domain in visible_domains()]


def _audit_filter() -> tuple[auditlog.Filter, dict[str, str], list[str]]:
    """The audit filter from the query string, the fields as typed, and what was wrong."""
    typed = {
        name: request.args.get(name, "").strip()[:320]
        for name in ("mailbox", "actor", "action", "since", "until")
    }
    errors = []
    bounds: dict[str, datetime | None] = {"since": None, "until": None}
    tz = time_zone()
    for name in ("since", "until"):
        if typed[name]:
            day = _day(typed[name])
            if day is None:
                errors.append(_("Write dates like 2026-11-22."))
                continue
            if name == "until":
                day += timedelta(days=1)  # the whole of the last day
            bounds[name] = datetime.combine(day, time(), tz).astimezone(UTC)
    criteria = auditlog.Filter(
        typed["mailbox"], typed["actor"], typed["action"], bounds["since"], bounds["until"]
    )
    return criteria, typed, errors


@bp.get("/audit")
def audit() -> str:
    """The audit log, newest first, filtered by mailbox, actor, action and date."""
    criteria, typed, errors = _audit_filter()
    before = request.args.get("before", "")
    before_id = int(before) if before.isdigit() and len(before) < 19 else None
    rows = []
    if not errors:
        rows = auditlog.search(
            web.session(),
            criteria,
            domains=_domain_names(),
            limit=AUDIT_SHOWN + 1,
            before_id=before_id,
        )
    more = len(rows) > AUDIT_SHOWN
    rows = rows[:AUDIT_SHOWN]
    tz = time_zone()
    for row in rows:
        row["when"] = local_time(datetime.fromisoformat(row["at"]), tz)
        row["detail_text"] = ", ".join(
            f"{k}={v}" for k, v in sorted(row["detail"].items()) if v not in (None, "", [])
        )
    return render_template(
        "console/audit.html",
        rows=rows,
        typed=typed,
        errors=errors,
        older=rows[-1]["id"] if more and rows else None,
    )


@bp.get("/audit.csv")
def audit_csv() -> Response:
    """Every event the filter matches, as CSV."""
    criteria, _typed, errors = _audit_filter()
    if errors:
        abort(400)
    session = web.session()
    names = _domain_names()
    body = auditlog.to_csv(auditlog.iterate(session, criteria, domains=names))
    response = Response(stream_with_context(body), content_type="text/csv; charset=utf-8")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    response.headers["Content-Disposition"] = f'attachment; filename="cleanmail-audit-{stamp}.csv"'
    return response


def bar_chart(days: list[dict[str, Any]], series: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Stacked bars per day as SVG rectangles (drawn server-side: no script, no service)."""
    width, height, gap = 640, 200, 2
    highest = max((sum(day[key] for key, _l, _c in series) for day in days), default=0) or 1
    step = width / max(len(days), 1)
    bars = []
    for index, day in enumerate(days):
        top = height
        for key, label, color in series:
            size = day[key] / highest * (height - 10)
            if size > 0:
                top -= size
                bars.append(
                    {
                        "x": round(index * step + gap / 2, 1),
                        "y": round(top, 1),
                        "w": round(max(step - gap, 1), 1),
                        "h": round(size, 1),
                        "color": color,
                        "title": f"{day['day']}: {label} {day[key]}",
                    }
                )
    return {"width": width, "height": height, "bars": bars, "highest": highest}


@bp.get("/stats", endpoint="stats")
def stats_page() -> str:
    """Messages scanned, passed and held per day, top reasons and senders, release rate."""
    period = request.args.get("days", "30")
    days = int(period) if period.isdigit() and int(period) in PERIODS else 30
    domains = visible_domains()
    chosen = request.args.get("domain", "")
    names = _domain_names()
    if chosen:
        if chosen not in {d.name for d in domains}:
            abort(404)
        names = [chosen]
    summary = stats.summary(web.session(), days, names)
    traffic = [
        ("passed", _("Passed"), "#2e7d32"),
        ("quarantined", _("Held"), "#ef6c00"),
        ("rejected", _("Refused"), "#c62828"),
    ]
    reports = [("reports_sent", _("Sent"), "#1565c0"), ("reports_failed", _("Failed"), "#c62828")]
    sent, failed = summary.totals["reports_sent"], summary.totals["reports_failed"]
    return render_template(
        "console/stats.html",
        summary=summary,
        days=days,
        periods=PERIODS,
        domains=domains,
        chosen=chosen,
        traffic=traffic,
        traffic_chart=bar_chart(summary.days, traffic),
        reports=reports,
        reports_chart=bar_chart(summary.days, reports),
        report_success=sent / (sent + failed) if sent + failed else None,
    )


@bp.get("/tokens")
def tokens() -> str:
    """API tokens (operators only): who has one, for which domains, when last used."""
    require_operator()
    return _tokens_page()


def _tokens_page(**extra: Any) -> str:
    session = web.session()
    tz = time_zone()
    rows = [
        {
            "name": token.name,
            "prefix": token.prefix,
            "domains": ", ".join(token.domains) or _("every domain (operator)"),
            "created": local_time(token.created_at, tz),
            "used": local_time(token.last_used_at, tz) if token.last_used_at else "",
        }
        for token in apitokens.list_tokens(session)
    ]
    return render_template("console/tokens.html", rows=rows, domains=visible_domains(), **extra)


@bp.post("/tokens")
def token_create() -> str | tuple[str, int]:
    """Make a token and show its secret once (never stored, never in a cookie)."""
    require_operator()
    session = web.session()
    name = request.form.get("name", "")
    chosen = request.form.getlist("domain")
    try:
        created = apitokens.create(session, web.actor(), name, chosen)
    except apitokens.TokenError:
        error = _(
            "Choose a new name of letters, digits, dots, dashes or underscores, "
            "and served domains only."
        )
        session.rollback()
        return _tokens_page(error=error, name=name), 400
    session.commit()
    return _tokens_page(secret=created.secret, created=created.token.name)


@bp.post("/tokens/revoke")
def token_revoke() -> str | tuple[str, int]:
    """Revoke a token: it stops working at once."""
    require_operator()
    session = web.session()
    try:
        apitokens.revoke(session, web.actor(), request.form.get("name", ""))
    except apitokens.TokenError:
        abort(404)
    session.commit()
    return _tokens_page(revoked=request.form.get("name", ""))
