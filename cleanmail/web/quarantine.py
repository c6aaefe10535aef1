"""The owner's quarantine (placeholder until the quarantine area is built)."""

from flask import Blueprint
from flask_login import login_required

bp = Blueprint("quarantine", __name__)


@bp.get("/")
@login_required
def index():
    """The list of held messages."""
    return "quarantine"
