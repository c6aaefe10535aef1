"""The console's search form: query-string fields in, a ``search.Query`` and errors out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from flask_babel import gettext as _
from werkzeug.datastructures import MultiDict

from cleanmail import mime, reasons, search
from cleanmail.models import Status

FIELDS = ("recipient", "sender", "subject", "since", "until", "reason", "status", "min", "max")
MAX_TEXT = 320
ANY = "any"


def _day(value: str) -> date | None:
    try:
        day = date.fromisoformat(value)
    except ValueError:
        return None
    return day if date(1900, 1, 1) <= day <= date(9000, 1, 1) else None


def _score(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and abs(number) < 1e9 else None


@dataclass
class SearchForm:
    """The search fields as typed, and what was wrong with them."""

    values: dict[str, str]
    sort: str = "date"
    descending: bool = True
    errors: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, args: MultiDict[str, str]) -> SearchForm:
        """Read the fields from a query string (or a form carrying the same names)."""
        values = {
            name: " ".join(mime.clean_text(args.get(name, ""), MAX_TEXT).split()) for name in FIELDS
        }
        if "status" not in args:
            values["status"] = Status.NEW.value  # held mail is what operators look for
        sort = args.get("sort", "date")
        return cls(
            values,
            sort=sort if sort in search.SORTS else "date",
            descending=args.get("dir", "desc") != "asc",
        )

    def args(self) -> dict[str, str]:
        """The non-empty fields, to carry along in links and hidden inputs."""
        found = {name: value for name, value in self.values.items() if value}
        found["status"] = self.values["status"] or ANY
        return found

    def page_args(self, after: str | None = None) -> dict[str, str]:
        """The query string of a page of these results (the first, or the one after a cursor)."""
        found = {**self.args(), "sort": self.sort, "dir": "desc" if self.descending else "asc"}
        if after:
            found["after"] = after
        return found

    def order(self) -> search.Order:
        """The sort of the results."""
        return search.Order(self.sort, self.descending)

    def query(self, tz: ZoneInfo) -> search.Query:
        """The search to run; fields that cannot be read are left out and named in errors."""
        v, self.errors = self.values, []
        since = until = None
        if v["since"]:
            day = _day(v["since"])
            if day is None:
                self.errors.append(_("The from date was not understood. Use YYYY-MM-DD."))
            else:
                since = datetime.combine(day, time(), tz).astimezone(UTC)
        if v["until"]:
            day = _day(v["until"])
            if day is None:
                self.errors.append(_("The to date was not understood. Use YYYY-MM-DD."))
            else:
                until = datetime.combine(day + timedelta(days=1), time(), tz).astimezone(UTC)
        scores: dict[str, float | None] = {}
        for name in ("min", "max"):
            scores[name] = _score(v[name]) if v[name] else None
            if v[name] and scores[name] is None:
                self.errors.append(_("A score must be a number, like 5 or 7.5."))
        status = v["status"]
        statuses = (status,) if status in {s.value for s in Status} else ()
        reason = v["reason"] if v["reason"] in reasons.LABELS else ""
        return search.Query(
            recipient=v["recipient"],
            sender=v["sender"],
            subject=v["subject"],
            since=since,
            until=until,
            reason=reason,
            statuses=statuses,
            min_score=scores["min"],
            max_score=scores["max"],
        )

    def sort_args(self, sort: str) -> dict[str, Any]:
        """The query string for sorting by a column (a second click turns it around)."""
        descending = not self.descending if sort == self.sort else sort in ("date", "score", "size")
        return {**self.args(), "sort": sort, "dir": "desc" if descending else "asc"}
