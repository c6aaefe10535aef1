"""Getting in and out (placeholder until the auth area is built)."""

from flask import Blueprint, redirect, url_for
from flask_login import logout_user

bp = Blueprint("auth", __name__)


@bp.get("/login")
def login():
    """The login page."""
    return "login"


@bp.post("/logout")
def logout():
    """Log out."""
    logout_user()
    return redirect(url_for("auth.login"))
