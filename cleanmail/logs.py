"""Structured logs: one line per event, with the message and mailbox ids as fields.

``event(log, "message.release", message_id=1, mailbox_id=2)`` logs one line; the
formatter chosen by ``CLEANMAIL_LOG_FORMAT`` writes it as plain text with the fields
appended, as ``key=value`` pairs, or as one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "keyvalue", "json")
# Attributes every LogRecord has; anything else was passed in ``extra`` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


_NEEDS_QUOTES = re.compile(r'[ "=\\\n\r\t]')
_FIELDS = "_cleanmail_fields"  # the fields of a record made by event(), kept in one dict


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The event fields a record carries."""
    given = record.__dict__.get(_FIELDS)
    if given is not None:
        return given  # type: ignore[no-any-return]
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _quoted(value: Any) -> str:
    kind = type(value)
    if kind is int or (kind is float and math.isfinite(value)):
        return repr(value)  # what json.dumps writes for these, without its set-up
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    if text and _NEEDS_QUOTES.search(text) is None:
        return text
    return json.dumps(text, ensure_ascii=False)


def _base(record: logging.LogRecord) -> dict[str, Any]:
    return {
        "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname,
        "logger": record.name,
        "pid": record.process,
    }


class TextFormatter(logging.Formatter):
    """The classic line, with the event fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The default time stamp, with its seconds part formatted once per second."""
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second  # one tuple, so that threads never see a torn pair
        if cached[0] != second:
            cached = (second, time.strftime(self.default_time_format, self.converter(second)))
            self._second = cached
        return self.default_msec_format % (cached[1], record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        """One line (plus a traceback when there is one)."""
        line = super().format(record)
        extra = fields(record)
        if extra:
            head, newline, rest = line.partition("\n")
            pairs = " ".join(f"{k}={_quoted(v)}" for k, v in extra.items())
            line = f"{head} {pairs}{newline}{rest}"
        return line


class KeyValueFormatter(logging.Formatter):
    """``at=... level=INFO logger=... msg="..." message_id=7`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """One line; a traceback goes into the ``exc`` field."""
        values = {**_base(record), "msg": record.getMessage(), **fields(record)}
        if record.exc_info:
            values["exc"] = self.formatException(record.exc_info)
        return " ".join(f"{k}={_quoted(v)}" for k, v in values.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """One line; a traceback goes into the ``exc`` field."""
        values = {**_base(record), "msg": record.getMessage(), **fields(record)}
        if record.exc_info:
            values["exc"] = self.formatException(record.exc_info)
        return json.dumps(values, default=str, ensure_ascii=False)


def formatter(name: str) -> logging.Formatter:
    """The formatter for a CLEANMAIL_LOG_FORMAT value."""
    return {"json": JsonFormatter, "keyvalue": KeyValueFormatter}.get(name, TextFormatter)()


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send every log line to stderr in the chosen format (once, like basicConfig)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)


def event(
    logger: logging.Logger, name: str, /, *, level: int = logging.INFO, **values: Any
) -> None:
    """Log one event with its fields (message_id, mailbox_id, ...).

    The filter logs a line or two per message, so the record is made directly: no
    format shows the caller's file and line, and looking them up cost more than the rest.
    """
    if not logger.isEnabledFor(level):
        return
    extra = {"event": name, **values}
    record = logger.makeRecord(logger.name, level, "(event)", 0, name, (), None, extra=extra)
    record.__dict__[_FIELDS] = extra
    logger.handle(record)
