"""PLACEHOLDERS for the console's statistics and audit-log pages.

The other half of issue 5 (branch i5-api) implements ``console.stats`` and
``console.audit`` and replaces this file; these stubs exist only so that the
console's navigation can link to them meanwhile. They show no data.
"""

from __future__ import annotations

from flask import render_template

from cleanmail.web.console import bp


@bp.get("/stats")
def stats() -> str:
    """Placeholder for the statistics page (replaced by the i5-api branch)."""
    return render_template("console/placeholder.html", page="stats")


@bp.get("/audit")
def audit() -> str:
    """Placeholder for the audit-log page (replaced by the i5-api branch)."""
    return render_template("console/placeholder.html", page="audit")
