"""Whitelist and blacklist (placeholder until the lists area is built)."""

from flask import Blueprint
from flask_login import login_required

bp = Blueprint("lists", __name__, url_prefix="/lists")


@bp.get("/<any(allow, block):kind>")
@login_required
def index(kind: str):
    """One of the owner's lists."""
    return kind
