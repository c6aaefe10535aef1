"""The quarantine list's rows: filled into a compiled row template, and kept once rendered.

The list is the page owners open most, 50 rows at a time, and Jinja, Babel and the ORM
per row cost most of it. So ``quarantine/_row.html`` is rendered by Jinja once per
language and shape with stand-ins, and filled in per row with ``str.format`` (values
escaped here, as the template would have). A row's HTML depends only on the columns in
``quarantine.LISTED``, the language, the time zone and the path prefix, and it is kept
under all of exactly these (a bounded LRU per process): a message that is released,
deleted or changed in any way reads back as another key, so no stale row is served and
nothing needs to be told when a row changes, in this process or any other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from flask import render_template
from flask_babel import gettext as _
from markupsafe import Markup, escape

from cleanmail import quarantine, reasons
from cleanmail.web import preview

ROWS_KEPT = 5000  # rendered rows kept per process: 100 pages, a few MB
_MARK = "\ue000"  # a private-use character: no escaping changes it, no translation has it
_FIELDS = ("id", "date", "name", "address", "subject", "size", "path")


def render_rows(rows: Sequence[Any], language: str, zone: ZoneInfo, path: str) -> Markup:
    """Rows of ``quarantine.LISTED`` as the list's HTML; ``language`` is the request's."""
    # Safe: Jinja's own output with every filled-in value escaped in _row.
    return Markup("".join([_row(row, language, zone, path) for row in rows]))  # noqa: S704


def clear() -> None:
    """Forget every rendered row (tests, and a changed catalog)."""
    _row.cache_clear()
    _compiled.cache_clear()


@lru_cache(maxsize=ROWS_KEPT)
def _row(row: Any, language: str, zone: ZoneInfo, path: str) -> str:
    """One row's HTML. Called in a request whose locale is ``language`` (the texts' too)."""
    name, address = preview.sender(row.from_header, row.envelope_sender)
    listed = reasons.top(_decoded(row.reasons))
    texts = [_reason(str(r.get("code")), str(r.get("text")), language) for r in listed]
    form = _compiled(language, bool(name), str(row.status), bool(row.release_failed), len(texts))
    when = quarantine.received_time(row.received_at)
    return form.format(
        id=int(row.id),
        date=escape(preview.local_time(when, zone)),
        name=escape(name),
        address=escape(address or _("(no sender address)")),
        subject=escape(row.subject or _("(no subject)")),
        size=escape(preview.human_size(row.size)),
        path=escape(path),
        **{f"reason{number}": escape(text) for number, text in enumerate(texts)},
    )


def _decoded(stored: str | None) -> list[Any]:
    """The stored reasons list (JSON text on both databases, as LISTED casts it)."""
    value = json.loads(stored) if stored else []
    return value if isinstance(value, list) else []


@lru_cache(maxsize=4096)
def _reason(code: str, text: str, language: str) -> str:
    """A reason described in the request's language (``language``, the cache key)."""
    return reasons.describe({"code": code, "text": text})


@lru_cache(maxsize=256)
def _compiled(language: str, named: bool, status: str, failed: bool, count: int) -> str:
    """``quarantine/_row.html`` in a language and shape, as a ``str.format`` string."""
    stand_ins = {field: f"{_MARK}{field}{_MARK}" for field in _FIELDS}
    extra = [f"reason{number}" for number in range(count)]
    html = render_template(
        "quarantine/_row.html",
        **dict(stand_ins, name=stand_ins["name"] if named else ""),
        status=status,
        release_failed=failed,
        reasons=[f"{_MARK}{field}{_MARK}" for field in extra],
    )
    html = html.replace("{", "{{").replace("}", "}}")
    for field in (*_FIELDS, *extra):
        html = html.replace(f"{_MARK}{field}{_MARK}", "{" + field + "}")
    return html.strip() + "\n"
