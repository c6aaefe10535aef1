"""The verdict engine interface: every engine scores a parsed message the same way.

The embedded rules engine, the learning classifier and the rspamd and SpamAssassin
bridges all answer with an ``EngineResult``; the filter adds up the embedded engines'
scores and compares the total with the mailbox's thresholds, and asks the external
engines (chained after them) only about mail that is still undecided.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from cleanmail import mime


@dataclass(frozen=True)
class Envelope:
    """What the SMTP session said about a message, as opposed to its headers."""

    sender: str  # envelope MAIL FROM, "" for the null sender
    recipients: tuple[str, ...]
    client_address: str | None = None
    client_helo: str | None = None
    mail_options: tuple[str, ...] = ()  # MAIL FROM parameters, e.g. BODY=8BITMIME, SMTPUTF8
    client_name: str | None = None  # the client's reverse-DNS name as Postfix found it


@dataclass(frozen=True)
class Hit:
    """One reason an engine found a message suspicious."""

    code: str  # stable machine name; the web UI translates reasons by code
    score: float
    text: str  # short English description a mailbox owner understands


@dataclass(frozen=True)
class EngineResult:
    """An engine's verdict: the total score and the reasons behind it.

    External engines also say what they would do with the message (``verdict``: pass,
    quarantine or reject, on their own scale); engines that only score leave it None.
    """

    score: float
    hits: tuple[Hit, ...]
    verdict: str | None = None

    @classmethod
    def from_hits(cls, hits: Iterable[Hit]) -> EngineResult:
        """A result whose score is the sum of its hits' scores."""
        hits = tuple(hits)
        return cls(score=sum(hit.score for hit in hits), hits=hits)


class EngineError(Exception):
    """An engine could not give a verdict (the filter answers 451 so the sender retries)."""


class LearnError(EngineError):
    """An engine could not take a lesson now; the feedback job tries again later."""


class Engine(Protocol):
    """Anything that scores a message; higher means more likely spam."""

    name: str

    def check(self, message: mime.ParsedMessage, envelope: Envelope) -> EngineResult:
        """Score one message; raise EngineError when no verdict is possible."""
        ...


class Learner(Protocol):
    """An engine that learns from people's decisions (releases are ham, blocks spam)."""

    name: str

    def learn(self, raw: bytes, *, spam: bool) -> None:
        """Teach the engine one message; raise LearnError when it cannot now."""
        ...


class ExternalEngine(Engine, Learner, Protocol):
    """An engine outside Cleanmail (rspamd, spamd): it scores, and learns from decisions."""

    def close(self) -> None:
        """Let go of kept-open connections."""
        ...
