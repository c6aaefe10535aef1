"""The WSGI entry point for gunicorn: ``gunicorn wsgi:app``."""

from cleanmail.web import create_app

app = create_app()
