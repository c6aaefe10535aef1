"""SpamAssassin as an external verdict engine, through spamd with aiospamc.

``REPORT`` gives spamd's verdict, score and the table of rules that hit, with their
points (the "Content analysis details" part of every stock report template); ``TELL``
teaches its Bayes database, which spamd allows only when started with ``--allow-tell``.
The filter's checks run in worker threads, so each request runs its own short event loop.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine
from typing import Any

import aiospamc
from aiospamc.exceptions import ClientException, TimeoutException
from aiospamc.responses import NoPermissionException, Response, ResponseException

from cleanmail import mime
from cleanmail.filter import symbols
from cleanmail.filter.engines import EngineError, EngineResult, Envelope, LearnError

# One row of the report's rule table: " 1.2 RULE_NAME   description".
_ROW = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+([A-Z][A-Z0-9_]{1,60})\s", re.M)
_TABLE_START = "---- ----"
_ERRORS = (ClientException, ResponseException, TimeoutError, OSError)


class SpamAssassinEngine:
    """Scores messages with spamd; spamd's own "is spam" means quarantine."""

    name = "spamassassin"

    def __init__(
        self, host: str, port: int, *, timeout: float = 10.0, reject_score: float = 15.0
    ) -> None:
        self.host = host
        self.port = port
        self.reject_score = reject_score
        self.timeout = aiospamc.Timeout(total=timeout, connection=timeout, response=timeout)

    def check(self, message: mime.ParsedMessage, envelope: Envelope) -> EngineResult:
        """spamd's verdict, score and rules for one message; EngineError when it has none."""
        try:
            response = self._run(
                aiospamc.report(message.raw, host=self.host, port=self.port, timeout=self.timeout)
            )
            spam = response.headers["Spam"]
            is_spam, score = bool(spam.value), float(spam.score)
        except _ERRORS as exc:
            raise EngineError(f"spamd at {self.where} unavailable: {_describe(exc)}") from exc
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise EngineError(f"spamd answered without a usable Spam header: {exc!r}") from None
        if score >= self.reject_score:
            verdict = "reject"
        else:
            verdict = "quarantine" if is_spam else "pass"
        rules = _rules(response)
        if not rules and score > 0:
            rules = [("SPAMASSASSIN_SCORE", score)]  # a site's report template without the table
        return EngineResult(
            score=score, hits=symbols.to_hits("spamassassin", rules), verdict=verdict
        )

    def learn(self, raw: bytes, *, spam: bool) -> None:
        """Teach spamd's Bayes database one message (``TELL``)."""
        try:
            self._run(
                aiospamc.tell(
                    raw,
                    "spam" if spam else "ham",
                    set_action="local",
                    host=self.host,
                    port=self.port,
                    timeout=self.timeout,
                )
            )
        except NoPermissionException:
            raise LearnError(
                f"spamd at {self.where} refused TELL: start spamd with --allow-tell"
            ) from None
        except _ERRORS as exc:
            raise LearnError(f"spamd at {self.where} could not learn: {_describe(exc)}") from exc

    def close(self) -> None:
        """Nothing to let go of: spamd takes one request per connection."""

    @property
    def where(self) -> str:
        """spamd's address, for messages."""
        return f"{self.host}:{self.port}"

    def _run(self, request: Coroutine[Any, Any, Response]) -> Response:
        # aiospamc's total time limit raises TimeoutError, one of _ERRORS.
        return asyncio.run(request)


def _rules(response: Response) -> list[tuple[str, float]]:
    """The (rule, points) rows of the report's table."""
    text = bytes(response.body).decode("utf-8", "replace")
    start = text.find(_TABLE_START)
    if start < 0:
        return []
    return [(name, float(points)) for points, name in _ROW.findall(text, start)]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | TimeoutException):
        return "timed out"
    if isinstance(exc, ResponseException):
        return f"{type(exc).__name__}: {exc}"
    return str(exc) or type(exc).__name__
