"""Languages: the owner's choice, else the browser's; Norwegian bokmål by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Flask, g, request
from flask_babel import Babel, get_locale, get_translations
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


def catalog() -> Any:
    """This request's translations, found once per locale rather than once per string.

    Flask-Babel looks the catalog up anew for each string (a dozen context lookups),
    which was a third of the list page's template time. The catalog is kept beside the
    locale object it belongs to, so ``refresh()`` and ``force_locale()`` still switch it.
    """
    context = g.get("_flask_babel")
    kept = getattr(context, "cleanmail_catalog", None)
    if kept is not None and kept[0] is getattr(context, "babel_locale", None):
        return kept[1]
    translations = get_translations()
    context = g.get("_flask_babel")
    locale = getattr(context, "babel_locale", None)
    if locale is not None:
        context.cleanmail_catalog = (locale, translations)
    return translations


def init_app(app: Flask, translations: Path) -> None:
    """Attach Flask-Babel with our catalogs."""
    app.config["BABEL_DEFAULT_LOCALE"] = DEFAULT
    app.config["BABEL_TRANSLATION_DIRECTORIES"] = str(translations)
    Babel(app, locale_selector=select_locale)
    # Flask-Babel's own template callables, with the catalog found once per request.
    app.jinja_env.install_gettext_callables(
        gettext=lambda s: catalog().ugettext(s),
        ngettext=lambda s, p, n: catalog().ungettext(s, p, n),
        pgettext=lambda c, s: catalog().upgettext(c, s),
        npgettext=lambda c, s, p, n: catalog().unpgettext(c, s, p, n),
        newstyle=True,
    )
    app.context_processor(lambda: {"get_locale": get_locale})
