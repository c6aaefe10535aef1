"""``/healthz``: the database answers and the store is writable."""

from __future__ import annotations

import os

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from cleanmail import web

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Report whether the database and the store can be used."""
    config = current_app.config["CLEANMAIL"]
    problems = []
    try:
        web.session().execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        problems.append(f"database: {type(exc).__name__}")
    store = config.store_dir
    if not (store.is_dir() and os.access(store, os.W_OK)):
        problems.append("store: not writable")
    status = 503 if problems else 200
    return jsonify(ok=not problems, problems=problems), status
