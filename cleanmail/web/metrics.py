"""``/metrics`` in Prometheus text format, read from the database."""

from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cleanmail import metrics, web

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Response:
    """Every Cleanmail metric, for Prometheus."""
    body = generate_latest(metrics.registry(web.session()))
    return Response(body, content_type=CONTENT_TYPE_LATEST)
