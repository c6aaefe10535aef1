"""rspamd as an external verdict engine, over its HTTP protocol.

``/checkv2`` on the normal worker scores a message; the envelope travels in the request
headers rspamd reads (``From``, ``Rcpt``, ``IP``, ``Helo``, ``Hostname``). rspamd's
action becomes our verdict (see ``ACTIONS``) and its symbols our reasons
(cleanmail/filter/symbols.py). Learning goes to the controller (``/learnspam``,
``/learnham``), which wants the controller password. One ``httpx.Client`` per filter
process keeps connections open.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import httpx

from cleanmail import mime
from cleanmail.filter import symbols
from cleanmail.filter.engines import EngineError, EngineResult, Envelope, LearnError

log = logging.getLogger(__name__)

# rspamd's action -> our verdict; None: rspamd says "try again later" (the filter answers
# 451, as rspamd's own milter would). Its greylist action only marks mail below "add
# header"; greylisting itself is an SMTP-time tool, before the queue, where we are not.
ACTIONS: dict[str, str | None] = {
    "no action": "pass",
    "greylist": "pass",
    "add header": "quarantine",
    "rewrite subject": "quarantine",
    "quarantine": "quarantine",  # a custom action some sites define
    "reject": "reject",
    "discard": "reject",  # we never drop mail: where a domain does not reject, it is held
    "soft reject": None,
}
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _header(value: str) -> bytes:
    """An envelope value as a header value: no control characters, UTF-8."""
    return _UNSAFE.sub("", value)[:1000].encode("utf-8", "replace")


class RspamdEngine:
    """Scores messages with rspamd and teaches its Bayes classifier."""

    name = "rspamd"

    def __init__(
        self,
        url: str,
        *,
        controller_url: str,
        password: str = "",
        timeout: float = 10.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.controller_url = controller_url.rstrip("/")
        self.password = password
        self.client = client or httpx.Client(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
            headers={"User-Agent": "Cleanmail"},
        )

    def check(self, message: mime.ParsedMessage, envelope: Envelope) -> EngineResult:
        """rspamd's action and symbols for one message; EngineError when it has none."""
        headers: list[tuple[str, bytes]] = [("From", _header(envelope.sender or "<>"))]
        headers += [("Rcpt", _header(recipient)) for recipient in envelope.recipients]
        if envelope.client_address:
            headers.append(("IP", _header(envelope.client_address)))
        if envelope.client_helo:
            headers.append(("Helo", _header(envelope.client_helo)))
        if envelope.client_address and envelope.client_name:
            # Postfix looked the name up already ("unknown" when there is none).
            headers.append(("Hostname", _header(envelope.client_name)))
        try:
            response = self.client.post(f"{self.url}/checkv2", content=message.raw, headers=headers)
        except httpx.HTTPError as exc:
            raise EngineError(f"rspamd at {self.url} unavailable: {_describe(exc)}") from exc
        if response.status_code != 200:
            raise EngineError(f"rspamd answered HTTP {response.status_code}: {_body(response)}")
        return _result(_json(response))

    def learn(self, raw: bytes, *, spam: bool) -> None:
        """Teach rspamd's classifier one message through the controller."""
        path = "/learnspam" if spam else "/learnham"
        headers = {"Password": self.password} if self.password else {}
        try:
            response = self.client.post(
                f"{self.controller_url}{path}", content=raw, headers=headers
            )
        except httpx.HTTPError as exc:
            raise LearnError(
                f"rspamd controller at {self.controller_url} unavailable: {_describe(exc)}"
            ) from exc
        if response.status_code == 200:
            reply = _json(response, LearnError)
            if reply.get("success") is True:
                return
            raise LearnError(f"rspamd did not learn the message: {_body(response)}")
        if response.status_code == 204:
            # rspamd chose not to learn: its classifier is already sure of this kind of
            # message, or there is too little text. Nothing to retry.
            log.info("rspamd did not need to learn a message")
            return
        if "already learned" in response.text:
            return  # the same lesson twice is no error
        if response.status_code in (401, 403):
            raise LearnError("rspamd refused to learn: wrong CLEANMAIL_RSPAMD_PASSWORD")
        raise LearnError(f"rspamd answered HTTP {response.status_code}: {_body(response)}")

    def close(self) -> None:
        """Close the kept-open connections."""
        self.client.close()


def _result(reply: dict[str, Any]) -> EngineResult:
    """Our result from rspamd's ``/checkv2`` answer."""
    action = reply.get("action")
    if action not in ACTIONS:
        raise EngineError(f"rspamd answered an unknown action {action!r}")
    verdict = ACTIONS[action]
    if verdict is None:
        raise EngineError(f"rspamd asked to try again later ({action})")
    try:
        score = float(reply.get("score") or 0.0)
        rules = [
            (str(name), float(symbol.get("score") or 0.0))
            for name, symbol in (reply.get("symbols") or {}).items()
        ]
    except (AttributeError, TypeError, ValueError) as exc:
        raise EngineError(f"rspamd answered a malformed result: {exc}") from None
    return EngineResult(score=score, hits=symbols.to_hits("rspamd", rules), verdict=verdict)


def _json(response: httpx.Response, error: type[EngineError] = EngineError) -> dict[str, Any]:
    try:
        reply = json.loads(response.content)
    except ValueError:
        raise error(f"rspamd answered something other than JSON: {_body(response)}") from None
    if not isinstance(reply, dict):
        raise error(f"rspamd answered unexpected JSON: {_body(response)}")
    return reply


def _body(response: httpx.Response) -> str:
    return " ".join(response.text[:200].split())


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return str(exc) or type(exc).__name__
