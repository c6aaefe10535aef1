"""The verdict engine interface: every engine scores a parsed message the same way.

The embedded rules engine, and later a learning classifier and the rspamd and
SpamAssassin bridges, all answer with an ``EngineResult``; the filter adds up the
scores and compares the total with the mailbox's quarantine threshold.
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


@dataclass(frozen=True)
class Hit:
    """One reason an engine found a message suspicious."""

    code: str  # stable machine name; the web UI translates reasons by code
    score: float
    text: str  # short English description a mailbox owner understands


@dataclass(frozen=True)
class EngineResult:
    """An engine's verdict: the total score and the reasons behind it."""

    score: float
    hits: tuple[Hit, ...]

    @classmethod
    def from_hits(cls, hits: Iterable[Hit]) -> EngineResult:
        """A result whose score is the sum of its hits' scores."""
        hits = tuple(hits)
        return cls(score=sum(hit.score for hit in hits), hits=hits)


class EngineError(Exception):
    """An engine could not give a verdict (the filter answers 451 so the sender retries)."""


class Engine(Protocol):
    """Anything that scores a message; higher means more likely spam."""

    name: str

    def check(self, message: mime.ParsedMessage, envelope: Envelope) -> EngineResult:
        """Score one message; raise EngineError when no verdict is possible."""
        ...
