"""Languages: the owner's choice, else the browser's; Norwegian bokmål by default."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from babel import Locale
from flask import Flask, g, request
from flask_babel import Babel, get_locale, get_translations
from flask_login import current_user
from jinja2 import pass_context
from jinja2.runtime import Context
from markupsafe import Markup

LANGUAGES = ("nb", "da", "en")
DEFAULT = "nb"
# Browsers send "no" or "nn" for Norwegian; bokmål is what we have.
ALIASES = {"no": "nb", "nn": "nb", "nb": "nb", "da": "da", "en": "en"}


def select_locale() -> Locale:
    """The language of this request."""
    if current_user and current_user.is_authenticated:
        language = current_user.language if current_user.language in LANGUAGES else DEFAULT
    else:
        best = request.accept_languages.best_match(list(ALIASES))
        language = ALIASES.get(best or "", DEFAULT)
    return _locale(language)


@lru_cache(maxsize=len(LANGUAGES))
def _locale(language: str) -> Locale:
    # Flask-Babel parses a returned name anew on each request, and Babel then checks
    # the disk for the locale's data: a tenth of a millisecond per page.
    return Locale.parse(language)


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


@pass_context
def template_gettext(context: Context, string: str, **variables: Any) -> str:
    """A template's ``_()``: Jinja's newstyle gettext in one call instead of three.

    A page has dozens of these; the same result as Jinja's own (``%`` formatting
    always applied, Markup under autoescape).
    """
    text = catalog().ugettext(string)
    if context.eval_ctx.autoescape:
        text = Markup(text)  # noqa: S704 - the catalog's text, as Jinja's own gettext does
    return text % variables


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
    app.jinja_env.globals.update(_=template_gettext, gettext=template_gettext)
    app.context_processor(lambda: {"get_locale": get_locale})
