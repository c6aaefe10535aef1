"""The quarantine list: its rows filled into a compiled row template, and its pages kept.

The list is the page owners open most, 50 rows at a time, and Jinja, Babel and the ORM
per row cost most of it. So ``quarantine/_row.html`` is rendered by Jinja once per
language and shape with stand-ins, and filled in per row with ``str.format`` (values
escaped here, as the template would have). A row's HTML depends only on the columns in
``quarantine_list.LISTED``, the language, the time zone and the path prefix, and it is kept
under all of exactly these (a bounded LRU per process): a message that is released,
deleted or changed in any way reads back as another key, so no stale row is served and
nothing needs to be told when a row changes, in this process or any other.

Whole pages are kept too (``Pages``), under the mailbox's version that database
triggers bump in the same transaction as any change to its listed messages (migration
0009), read with the logged-in user before the page's own queries, and under everything
else the page shows. The session's CSRF token is put in as a page is served.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from flask import current_app, render_template, request, session
from flask_babel import get_locale
from flask_babel import gettext as _
from markupsafe import Markup, escape

from cleanmail import quarantine_list, reasons
from cleanmail.web import preview

ROWS_KEPT = 5000  # rendered rows kept per process: 100 pages, a few MB
PAGES_KEPT = 200  # whole list pages kept per process, about 45 kB each
_MARK = "\ue000"  # a private-use character: no escaping changes it, no translation has it
_FIELDS = ("id", "date", "name", "address", "subject", "size", "path")


def render_rows(rows: Sequence[Any], language: str, zone: ZoneInfo, path: str) -> Markup:
    """Rows of ``quarantine_list.LISTED`` as the list's HTML; ``language`` is the request's."""
    # Safe: Jinja's own output with every filled-in value escaped in _row.
    return Markup("".join([_row(row, language, zone, path) for row in rows]))  # noqa: S704


class Pages:
    """Rendered pages under keys that cover all they show; the least recently used go first."""

    def __init__(self, size: int = PAGES_KEPT) -> None:
        self.size = size
        self._pages: OrderedDict[Hashable, str] = OrderedDict()
        self._lock = threading.Lock()
        # Stands in for the session's CSRF token in a kept page: random, so that no
        # message's text can contain it.
        self.csrf_stand_in = secrets.token_urlsafe(24)

    def get(self, key: Hashable) -> str | None:
        """A kept page, or None."""
        with self._lock:
            page = self._pages.get(key)
            if page is not None:
                self._pages.move_to_end(key)
            return page

    def put(self, key: Hashable, page: str) -> None:
        """Keep a page, forgetting the least recently used beyond the size."""
        with self._lock:
            self._pages[key] = page
            self._pages.move_to_end(key)
            while len(self._pages) > self.size:
                self._pages.popitem(last=False)


def pages() -> Pages:
    """This app's (this process's) kept list pages."""
    return current_app.extensions.setdefault("cleanmail.list_pages", Pages())


def page_key(user: Any) -> Hashable | None:
    """What the list page at this request's address shows depends on; None: do not keep.

    The mailbox's version stands for its messages (the rows and the count); the rest
    is the owner, the language and time zone, and the address with its query string.
    A page that shows a flashed message is neither kept nor served from the keep.
    """
    if user.version is None or "_flashes" in session:
        return None
    return (
        user.mailbox_id,
        user.version,
        user.address,
        user.role,
        user.key_version,
        str(get_locale()),
        user.timezone,
        request.script_root,
        request.full_path,
    )


def kept_page(key: Hashable | None, csrf: Callable[[], str], render: Callable[[], str]) -> str:
    """The page under ``key``, rendered and kept when missing; the session's token put in."""
    if key is None:
        return render()
    keep = pages()
    page = keep.get(key)
    if page is not None:
        return page.replace(keep.csrf_stand_in, csrf())
    page = render()
    keep.put(key, page.replace(csrf(), keep.csrf_stand_in))
    return page


@lru_cache(maxsize=ROWS_KEPT)
def _row(row: Any, language: str, zone: ZoneInfo, path: str) -> str:
    """One row's HTML. Called in a request whose locale is ``language`` (the texts' too)."""
    name, address = preview.sender(row.from_header, row.envelope_sender)
    listed = reasons.top(_decoded(row.reasons))
    texts = [_reason(str(r.get("code")), str(r.get("text")), language) for r in listed]
    form = _compiled(language, bool(name), str(row.status), bool(row.release_failed), len(texts))
    when = quarantine_list.received_time(row.received_at)
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
