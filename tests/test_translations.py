"""The catalogs: complete in bokmål and Danish, compiled, up to date with the code, and in use."""

from __future__ import annotations

import gettext
import io
import os
import re
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog, Message
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

from cleanmail import mailer
from cleanmail.models import Mailbox
from cleanmail.web import i18n
from tests.conftest import login_as

ROOT = Path(__file__).resolve().parent.parent
TRANSLATIONS = ROOT / "cleanmail" / "translations"
TRANSLATED = ("nb", "da")
PLURAL_FORMS = "nplurals=2; plural=(n != 1);"
# What a translation must carry over unchanged: %(name)s, %%, {name} and HTML tags.
TOKEN = re.compile(r"%\(\w+\)[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]|%%|\{\w*\}|<[^<>]+>")
# Only cleanmail/ and templates/ hold user-facing text; the rest need not be walked.
SOURCE_DIRS = ("cleanmail", "templates")

# Web tests: the language does not depend on the database backend, so SQLite is enough.
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def read_catalog(path: Path, locale: str | None = None) -> Catalog:
    """A .po or .pot file."""
    with path.open("rb") as handle:
        return read_po(handle, locale=locale)


def template_ids() -> set[str]:
    """The msgids of messages.pot (the singular msgid of a plural entry)."""
    return {key_of(m) for m in read_catalog(TRANSLATIONS / "messages.pot") if m.id}


def key_of(message: Message) -> str:
    """The singular msgid, for plain and plural entries alike."""
    return message.id[0] if isinstance(message.id, tuple) else message.id


def tokens(text: str) -> set[str]:
    """The placeholders and tags in one text."""
    return set(TOKEN.findall(text))


def forms(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """A msgid or msgstr as a tuple of its forms."""
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def extracted_ids() -> set[str]:
    """Every msgid that babel.cfg finds in the code and templates right now."""
    with (ROOT / "babel.cfg").open() as handle:
        method_map, options_map = parse_mapping_cfg(handle, "babel.cfg")

    def wanted(path: str) -> bool:
        relative = Path(os.path.relpath(path, ROOT)).parts
        return relative[0] in SOURCE_DIRS and not relative[-1].startswith((".", "_"))

    found = extract_from_dir(ROOT, method_map, options_map, directory_filter=wanted)
    return {message[0] if isinstance(message, tuple) else message for _f, _l, message, *_ in found}


def test_babel_cfg_finds_python_html_and_mail_templates() -> None:
    ids = extracted_ids()
    assert "Blocked attachment" in ids  # lazy_gettext as _l, in a dict (cleanmail/reasons.py)
    assert "%(num)d message deleted." in ids  # ngettext (cleanmail/web/quarantine_actions.py)
    assert "Your password" in ids  # an HTML template
    assert "Your login link for Cleanmail" in ids  # a .txt mail template


def test_template_is_up_to_date_with_the_code() -> None:
    missing = extracted_ids() - template_ids()
    assert not missing, (
        "new strings are not in messages.pot; see cleanmail/translations/README.md: "
        f"{sorted(missing)}"
    )


@pytest.mark.parametrize("language", TRANSLATED)
def test_every_message_is_translated_with_its_placeholders(language: str) -> None:
    catalog = read_catalog(TRANSLATIONS / language / "LC_MESSAGES" / "messages.po", language)
    assert catalog.plural_forms == PLURAL_FORMS
    entries = {key_of(m): m for m in catalog if m.id}
    assert not template_ids() - set(entries), "run pybabel update (see the README)"
    problems = []
    for key in sorted(template_ids()):
        message = entries[key]
        wanted = set().union(*(tokens(text) for text in forms(message.id)))
        texts = forms(message.string)
        if message.fuzzy or len(texts) != len(forms(message.id)) or not all(texts):
            problems.append(f"untranslated or fuzzy: {key!r}")
        for text in texts:
            if tokens(text) != wanted:
                problems.append(f"placeholders differ: {key!r} -> {text!r}")
            # Jinja %-formats every template string: a stray % would break the page.
            if "%" in TOKEN.sub("", text):
                problems.append(f"stray %: {key!r} -> {text!r}")
    problems += [f"{m.id!r}: {errors}" for m, errors in catalog.check()]
    assert not problems, "\n".join(problems)


def test_english_catalog_has_every_message() -> None:
    catalog = read_catalog(TRANSLATIONS / "en" / "LC_MESSAGES" / "messages.po", "en")
    assert not template_ids() - {key_of(m) for m in catalog if m.id}


@pytest.mark.parametrize("language", ("nb", "da", "en"))
def test_compiled_catalog_matches_its_source(language: str) -> None:
    folder = TRANSLATIONS / language / "LC_MESSAGES"
    compiled = io.BytesIO()
    write_mo(compiled, read_catalog(folder / "messages.po", language))
    compiled.seek(0)
    with (folder / "messages.mo").open("rb") as handle:
        committed = gettext.GNUTranslations(handle)
    fresh = gettext.GNUTranslations(compiled)
    assert committed._catalog == fresh._catalog, (  # type: ignore[attr-defined]
        f"{folder / 'messages.mo'} is stale: run pybabel compile (see the README)"
    )


@sqlite_only
def test_password_page_in_bokmal(client, database, owner) -> None:
    with database.session_scope(write=True) as session:
        session.get(Mailbox, owner.id).language = "nb"
    login_as(client, owner)
    page = client.get("/settings/password").get_data(as_text=True)
    assert '<html lang="nb">' in page
    assert "<title>Ditt passord " in page
    assert "<h1>Ditt passord</h1>" in page
    assert '<label for="password">Passord</label>' in page
    assert '<label for="confirm">Passord bekreftelse</label>' in page
    assert "Minst 8 tegn" in page and "Karantene" in page and "Hviteliste" in page


@sqlite_only
def test_pages_follow_a_danish_owner_whatever_the_browser(client, database, owner) -> None:
    with database.session_scope(write=True) as session:
        session.get(Mailbox, owner.id).language = "da"
    login_as(client, owner)
    page = client.get("/settings/", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert '<html lang="da">' in page
    assert "<h1>Indstillinger</h1>" in page and "Karantænerapport" in page
    assert "Hvidliste" in page and "Sortliste" in page and "Log ud" in page


@sqlite_only
@pytest.mark.parametrize(
    "accept, language, words",
    [
        ("da", "da", ("<h1>Log ind</h1>", "Adgangskode", "karantænerapport")),
        ("da-DK,da;q=0.9", "da", ("<h1>Log ind</h1>",)),
        ("en", "en", ("<h1>Log in</h1>", "Password", "quarantine report")),
        ("no", "nb", ("<h1>Logg inn</h1>", "Passord", "karantenerapport")),
        ("nb-NO,nb;q=0.9,en;q=0.5", "nb", ("<h1>Logg inn</h1>",)),
        ("sv", "nb", ("<h1>Logg inn</h1>",)),
        (None, "nb", ("<h1>Logg inn</h1>",)),
    ],
)
def test_login_page_follows_the_browser(client, accept, language, words) -> None:
    client.environ_base.pop("HTTP_ACCEPT_LANGUAGE", None)  # the fixture's English browser
    headers = {"Accept-Language": accept} if accept else {}
    page = client.get("/login", headers=headers).get_data(as_text=True)
    assert f'<html lang="{language}">' in page
    for word in words:
        assert word in page


def test_every_language_has_a_catalog() -> None:
    for language in i18n.LANGUAGES:
        assert (TRANSLATIONS / language / "LC_MESSAGES" / "messages.mo").is_file()


@pytest.mark.parametrize(
    "language, subject, words",
    [
        ("nb", "Din innloggingslenke til Cleanmail", ("Hei,", "15 dager", "karantenen din")),
        ("da", "Dit login-link til Cleanmail", ("Hej", "15 dage", "din karantæne")),
        ("en", "Your login link for Cleanmail", ("Hello,", "15 days", "your quarantine")),
    ],
)
def test_mail_is_written_in_the_owner_language(language, subject, words) -> None:
    rendered = mailer.render(
        "login_link",
        language,
        url="https://cleanmail.test/l/x",
        address="ola@example.no",
        days=15,
        lang=language,
    )
    assert rendered.subject == subject
    for word in words:
        assert word in rendered.text and word in rendered.html
