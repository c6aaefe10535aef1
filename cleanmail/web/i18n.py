"""Languages: the owner's choice, else the browser's; Norwegian bokmål by default."""

from __future__ import annotations

from pathlib import Path

from flask import Flask, request
from flask_babel import Babel, get_locale
from flask_login import current_user

LANGUAGES = ("nb", "da", "en")
DEFAULT = "nb"
# Browsers send "no" or "nn" for Norwegian; bokmål is what we have.
ALIASES = {"no": "nb", "nn": "nb", "nb": "nb", "da": "da", "en": "en"}


def select_locale() -> str:
    """The language of this request."""
    if current_user and current_user.is_authenticated:
        return current_user.language if current_user.language in LANGUAGES else DEFAULT
    best = request.accept_languages.best_match(list(ALIASES))
    return ALIASES.get(best or "", DEFAULT)


def init_app(app: Flask, translations: Path) -> None:
    """Attach Flask-Babel with our catalogs."""
    app.config["BABEL_DEFAULT_LOCALE"] = DEFAULT
    app.config["BABEL_TRANSLATION_DIRECTORIES"] = str(translations)
    Babel(app, locale_selector=select_locale)
    app.context_processor(lambda: {"get_locale": get_locale})
