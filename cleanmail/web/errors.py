"""Error pages in the visitor's language; never a stack trace."""

from __future__ import annotations

import logging

from flask import Flask, render_template, request
from flask_babel import gettext as _
from flask_wtf.csrf import CSRFError
from markupsafe import escape
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


def _messages() -> dict[int, str]:
    return {
        400: _("The request could not be understood."),
        403: _("You do not have access to this page."),
        404: _("The page or message was not found."),
        405: _("That action is not possible here."),
        413: _("The request was too large."),
        429: _("Too many attempts. Wait a few minutes and try again."),
        500: _("Something went wrong on our side. Please try again later."),
    }


def render_error(code: int, text: str | None = None) -> tuple[str, int]:
    """An error page with its status code."""
    text = text or _messages().get(code, _messages()[500])
    try:
        return render_template("error.html", code=code, text=text), code
    except Exception:  # a broken page must still not show a stack trace
        log.exception("rendering the error page failed")
        return escape(text), code


def init_app(app: Flask) -> None:
    """Install the handlers."""

    @app.errorhandler(CSRFError)
    def csrf_error(_error: CSRFError) -> tuple[str, int]:
        return render_error(400, _("The form had expired. Please go back and try again."))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if request.path.startswith("/api/"):
            from cleanmail.web import api  # the API answers in JSON, even for unknown paths

            return api.http_error(error)
        return render_error(error.code or 500)

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unexpected error: %s", error)
        if request.path.startswith("/api/"):
            from cleanmail.web import api

            return api.error_response(500, "internal error")
        return render_error(500)
