"""Headers on every response: a strict Content-Security-Policy and the usual others."""

from __future__ import annotations

from flask import Flask, Response, request

# Scripts and styles only from our own static files; nothing from anywhere else.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; form-action 'self'; frame-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def add_headers(response: Response) -> Response:
    """Set the security headers unless a view set its own policy (the preview does)."""
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers["X-Content-Type-Options"] = "nosniff"
    # same-origin, not no-referrer: Flask-WTF refuses HTTPS form posts without a Referer
    # of our own origin; other sites never see our addresses (or a login link's token).
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    response.headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
    if request.is_secure:
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    if request.endpoint != "static":
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def init_app(app: Flask) -> None:
    """Install the headers."""
    app.after_request(add_headers)
