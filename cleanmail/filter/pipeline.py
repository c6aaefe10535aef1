"""The verdict pipeline: lists, attachments, the scoring engines, then external ones.

The external engines (rspamd, spamd) are chained after the embedded ones and asked only
about recipients still *undecided*: no list entry decided (a block, or an allow that
SPF/DMARC did not refute), no blocked attachment, and the embedded engines' score below
the domain's reject threshold (always, for domains that do not reject).

``analyze`` is pure computation on the message; ``decide`` reads the database and asks
the external engines (both bounded by the filter's time limit); ``hold`` stores the
quarantined copies and then ``pass_on`` re-injects the passed ones, so that a 250 is only
ever given for mail that is safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from cleanmail import lists, logs, mailboxes, mime, quarantine
from cleanmail.config import Config
from cleanmail.db import Database
from cleanmail.filter import attachments, auth
from cleanmail.filter.committer import Committer
from cleanmail.filter.engines import Engine, EngineError, EngineResult, Envelope, Hit
from cleanmail.filter.reinject import Reinjector
from cleanmail.models import Domain, ListAction
from cleanmail.store import Store, digest

log = logging.getLogger(__name__)

PASS, QUARANTINE, REJECT = "pass", "quarantine", "reject"
SEVERITY = {PASS: 0, QUARANTINE: 1, REJECT: 2}
ENGINE_UNAVAILABLE = "ENGINE_UNAVAILABLE"
DOMAIN_CACHE_SECONDS = 5.0
LIST_REASONS = {
    "mailbox": ("LIST_BLOCK_MAILBOX", "sender blocked by you"),
    "domain": ("LIST_BLOCK_DOMAIN", "sender blocked for your domain"),
    "global": ("LIST_BLOCK_GLOBAL", "sender blocked for everyone"),
}


@dataclass(frozen=True)
class ServedDomain:
    """A served domain's id and thresholds."""

    id: int
    quarantine_threshold: float | None
    reject_threshold: float | None


@dataclass
class Analysis:
    """What the message itself says, the same for every recipient."""

    parsed: mime.ParsedMessage
    envelope: Envelope
    findings: list[attachments.Finding]
    result: EngineResult

    def reasons(self) -> list[dict[str, Any]]:
        """Blocked attachments if any, else the engines' hits, as stored reasons."""
        if self.findings:
            return [
                reason(
                    "BLOCKED_ATTACHMENT",
                    f"blocked attachment {f.filename or '(unnamed)'}: {f.reason}",
                )
                for f in self.findings
            ]
        return [reason(hit.code, hit.text, hit.score) for hit in self.result.hits]


def analyze(parsed: mime.ParsedMessage, envelope: Envelope, engines: Sequence[Engine]) -> Analysis:
    """Attachments and every engine's score for one parsed message."""
    hits: list[Hit] = []
    for engine in engines:
        hits.extend(engine.check(parsed, envelope).hits)
    return Analysis(parsed, envelope, attachments.scan(parsed.parts), EngineResult.from_hits(hits))


@dataclass
class Decision:
    """The verdict for one recipient."""

    recipient: str
    verdict: str
    score: float = 0.0
    reasons: list[dict[str, Any]] = field(default_factory=list)
    mailbox_id: int | None = None
    # Decided by score alone, below the reject threshold: the external engines may weigh in.
    undecided: bool = False


def reason(code: str, text: str, score: float = 0.0) -> dict[str, Any]:
    """A reason as stored with a message and shown to its owner."""
    return {"code": code, "text": text, "score": round(score, 2)}


class Pipeline:
    """Decides each recipient's verdict and carries it out."""

    def __init__(
        self,
        config: Config,
        database: Database,
        store: Store,
        reinjector: Reinjector,
        engines: Sequence[Engine],
        authenticator: auth.Authenticator,
        *,
        external: Sequence[Engine] = (),
    ) -> None:
        self.config = config
        self.database = database
        self.store = store
        self.reinjector = reinjector
        self.engines = list(engines)
        self.external = list(external)
        self.authenticator = authenticator
        self.committer = Committer(database)
        self._domains: dict[str, ServedDomain] = {}
        self._shared_rules: list[lists.Rule] = []
        self._domains_loaded = 0.0
        self._domains_lock = threading.Lock()

    def served_domains(self) -> dict[str, ServedDomain]:
        """The served domains, re-read every few seconds so that new ones take effect."""
        return self._directory()[0]

    def _directory(self) -> tuple[dict[str, ServedDomain], list[lists.Rule]]:
        """Domains and the global and domain list entries, cached for a few seconds.

        Operators change these rarely; a mailbox's own entries are read with every
        message instead, so an owner's change applies to the very next one.
        """
        with self._domains_lock:
            if time.monotonic() - self._domains_loaded > DOMAIN_CACHE_SECONDS:
                with self.database.session_scope() as session:
                    rows = session.execute(
                        select(
                            Domain.name,
                            Domain.id,
                            Domain.quarantine_threshold,
                            Domain.reject_threshold,
                        )
                    )
                    self._domains = {name: ServedDomain(*rest) for name, *rest in rows}
                    self._shared_rules = lists.shared_rules(session)
                self._domains_loaded = time.monotonic()
            return self._domains, self._shared_rules

    def forget_cache(self) -> None:
        """Read domains and shared list entries afresh with the next message."""
        with self._domains_lock:
            self._domains_loaded = 0.0

    def analyze(self, raw: bytes, envelope: Envelope) -> Analysis:
        """Parse the message and run the checks that do not depend on the recipient."""
        return analyze(mime.parse(raw), envelope, self.engines)

    def decide(self, analysis: Analysis) -> list[Decision]:
        """The verdict for every recipient, from lists, attachments and score."""
        served, shared = self._directory()
        envelope = analysis.envelope
        ours = _served_mailboxes(envelope.recipients, served)
        # Recipients elsewhere pass as given: their address is not ours to rewrite.
        decisions = [Decision(r, PASS) for r in envelope.recipients if r not in ours]
        if not ours:
            return decisions
        domain_ids = {name: served[name].id for name in served}
        addresses = set(ours.values())
        ids, own = self._mailbox_rules(addresses)
        if len(ids) < len(addresses):
            with self.database.session_scope(write=True) as session:
                mailboxes.ensure_mailboxes(session, addresses, domain_ids)
                ids, own = lists.mailbox_rules(session.connection(), addresses)
        rules = shared + own
        senders = [("envelope", envelope.sender.lower()), ("from", analysis.parsed.from_address)]
        auth_cache: list[auth.AuthResults] = []
        undecided: list[tuple[Decision, ServedDomain]] = []
        for recipient, address in ours.items():
            domain = served[address.rpartition("@")[2]]
            mine = [
                r
                for r in rules
                if r.scope == "global"
                or (r.scope == "domain" and r.domain_id == domain.id)
                or (r.scope == "mailbox" and r.mailbox_id == ids[address])
            ]
            matches = lists.decide(mine, senders)
            decision = self._verdict(analysis, domain, matches, auth_cache)
            decision.recipient, decision.mailbox_id = recipient, ids[address]
            decisions.append(decision)
            if decision.undecided:
                undecided.append((decision, domain))
        if undecided and self.external:
            self._consult(analysis, undecided)
        return decisions

    def _mailbox_rules(self, addresses: set[str]) -> tuple[dict[str, int], list[lists.Rule]]:
        """Read the recipients' mailboxes and own list entries on a pooled driver connection.

        A driver error is raised as SQLAlchemy's, like every other database failure.
        """
        engine = self.database.engine
        connection = engine.raw_connection()
        try:
            return lists.read_mailbox_rules(connection, engine.dialect.paramstyle, addresses)
        except engine.dialect.loaded_dbapi.Error as exc:
            connection.invalidate(exc)
            raise DBAPIError.instance(None, None, exc, engine.dialect.loaded_dbapi.Error) from exc
        finally:
            connection.close()

    def _consult(self, analysis: Analysis, pending: list[tuple[Decision, ServedDomain]]) -> None:
        """Ask the external engines, in order, about the recipients still undecided.

        An engine that fails raises EngineError (the filter answers 451), unless the site
        chose to fail open: then the message goes on with the other engines' verdict and
        a reason saying which engine was unavailable. The next engine is asked only about
        recipients that would still pass. Mail over ``engine_max_size`` is not sent.
        """
        size = len(analysis.parsed.raw)
        if size > self.config.engine_max_size:
            # As spamc does: big mail is slow to scan and rarely spam; a timeout would
            # keep it in Postfix's queue for good.
            log.info("not sending %d bytes to the external engines", size)
            return
        for engine in self.external:
            try:
                result = engine.check(analysis.parsed, analysis.envelope)
            except EngineError as exc:
                if not self.config.engine_fail_open:
                    raise
                log.warning("%s unavailable, going on without it: %s", engine.name, exc)
                text = f"{engine.name} unavailable: {exc}"[:300]
                for decision, _domain in pending:
                    decision.reasons.append(reason(ENGINE_UNAVAILABLE, text))
                continue
            for decision, domain in pending:
                _weigh(decision, domain, result)
            pending = [(d, domain) for d, domain in pending if d.verdict == PASS]
            if not pending:
                break

    def _verdict(
        self,
        analysis: Analysis,
        domain: ServedDomain,
        matches: list[lists.Match],
        auth_cache: list[auth.AuthResults],
    ) -> Decision:
        reasons: list[dict[str, Any]] = []
        for match in matches:
            if match.action == ListAction.BLOCK:
                code, text = LIST_REASONS[match.scope]
                return Decision("", QUARANTINE, 0.0, [reason(code, f"{text}: {match.pattern}")])
            if self._claim_refuted(analysis, match, auth_cache):
                reasons.append(
                    reason(
                        "ALLOW_IGNORED_SPOOFED",
                        f"allow entry {match.pattern} ignored: the sender failed SPF or DMARC",
                    )
                )
                continue
            if analysis.findings:
                break  # allowed senders may still not send executables
            return Decision(
                "", PASS, 0.0, [reason("LIST_ALLOW", f"sender allowed: {match.pattern}")]
            )
        if analysis.findings:
            reasons += analysis.reasons()
            return Decision("", QUARANTINE, analysis.result.score, reasons)
        result = analysis.result
        reasons += analysis.reasons()
        threshold = domain.quarantine_threshold
        if threshold is None:
            threshold = self.config.quarantine_threshold
        if domain.reject_threshold is not None and result.score >= domain.reject_threshold:
            return Decision("", REJECT, result.score, reasons)
        verdict = QUARANTINE if result.score >= threshold else PASS
        return Decision("", verdict, result.score, reasons, undecided=True)

    def _claim_refuted(
        self, analysis: Analysis, match: lists.Match, cache: list[auth.AuthResults]
    ) -> bool:
        """Whether SPF/DMARC refute the sender an allow entry matched (looked up lazily)."""
        if not cache:
            envelope = analysis.envelope
            cache.append(
                self.authenticator.check(
                    analysis.parsed, envelope.sender, envelope.client_address, envelope.client_helo
                )
            )
        return cache[0].fails_for(mime.address_domain(match.address), match.via)

    def hold(self, raw: bytes, analysis: Analysis, decisions: list[Decision]) -> str | None:
        """Quarantine the held copies; a reject reply when every recipient is rejected.

        Runs in a worker thread, before ``pass_on``. Raises StoreError or SQLAlchemyError;
        the server answers 4xx for those.
        """
        envelope = analysis.envelope
        rejected = [d for d in decisions if d.verdict == REJECT]
        if rejected and len(rejected) == len(decisions):
            return REPLY_REJECTED
        # SMTP has one reply for all recipients: where others are taken, rejects are held.
        held = [d for d in decisions if d.verdict in (QUARANTINE, REJECT)]
        if not held:
            return None
        origin = quarantine.Origin(envelope.sender, envelope.client_address, envelope.client_helo)
        holds = [quarantine.Hold(d.mailbox_id, d.score, d.reasons) for d in held]
        sha = digest(raw)
        # Written and fsynced before the transaction, in this thread, so that no
        # write lock is held while the disk works; hold() only checks it is there.
        self.store.ensure(sha, raw)
        dialect = self.database.engine.dialect
        ids = self.committer.run(
            lambda connection: quarantine.hold_on_driver(
                connection,
                dialect,
                self.store,
                raw,
                analysis.parsed,
                origin,
                holds,
                retention_days=self.config.retention_days,
                sha256=sha,
            ),
            key=sha,
        )
        logs.event(
            log,
            "message.quarantine",
            message_ids=ids,
            mailbox_ids=[d.mailbox_id for d in held],
            sender=envelope.sender,
        )
        return None

    async def pass_on(self, raw: bytes, analysis: Analysis, decisions: list[Decision]) -> None:
        """Re-inject the passed copies, one transaction per set of added headers.

        Runs on the event loop once ``hold`` succeeded; raises RelayError.
        """
        envelope = analysis.envelope
        groups: dict[bytes, list[str]] = {}
        for decision in decisions:
            if decision.verdict == PASS:
                prefix = b"" if decision.mailbox_id is None else pass_headers(decision)
                groups.setdefault(prefix, []).append(decision.recipient)
        for prefix, recipients in groups.items():
            await self.reinjector.send(
                envelope.sender, recipients, raw, prefix=prefix, options=envelope.mail_options
            )


REPLY_REJECTED = "550 5.7.1 Message refused as spam"


def _weigh(decision: Decision, domain: ServedDomain, result: EngineResult) -> None:
    """Add an external engine's verdict to a recipient's: the stricter of the two wins.

    Its "reject" rejects only for domains that reject by score at all (a reject
    threshold is set); elsewhere that mail is held, never refused.
    """
    verdict = result.verdict or PASS
    if verdict == REJECT and domain.reject_threshold is None:
        verdict = QUARANTINE
    if SEVERITY[verdict] > SEVERITY[decision.verdict]:
        decision.verdict = verdict
    decision.score = round(decision.score + result.score, 2)
    known = {r["code"] for r in decision.reasons}
    decision.reasons += [
        reason(hit.code, hit.text, hit.score) for hit in result.hits if hit.code not in known
    ]


def _served_mailboxes(recipients: Sequence[str], served: dict[str, ServedDomain]) -> dict[str, str]:
    """Recipient as given -> its mailbox address, for recipients in served domains."""
    ours = {}
    for recipient in recipients:
        try:
            address = mailboxes.normalize_address(recipient)
        except mailboxes.MailboxError:
            continue  # not an address we could keep a mailbox for; the next hop decides
        if address.rpartition("@")[2] in served:
            ours[recipient] = address
    return ours


def pass_headers(decision: Decision) -> bytes:
    """The ``X-Cleanmail-*`` headers added to a passed copy (ASCII, folded)."""
    codes = ", ".join(dict.fromkeys(r["code"] for r in decision.reasons)) or "none"
    lines = [
        "X-Cleanmail-Verdict: pass",
        f"X-Cleanmail-Score: {decision.score:.2f}",
        _fold(f"X-Cleanmail-Reasons: {codes}"),
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


def _fold(line: str, width: int = 76) -> str:
    words, out, current = line.split(" "), [], ""
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            out.append(current)
            current = " " + word
        else:
            current = f"{current} {word}" if current else word
    out.append(current)
    return "\r\n".join(out)
