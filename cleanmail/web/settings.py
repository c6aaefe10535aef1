"""Settings and password (placeholder until the settings area is built)."""

from flask import Blueprint
from flask_login import login_required

bp = Blueprint("settings", __name__, url_prefix="/settings")


@bp.get("/")
@login_required
def index():
    """The owner's settings."""
    return "settings"
