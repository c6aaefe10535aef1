"""SPF and DMARC results for a message, so that an allow entry cannot rescue spoofed mail.

From the trusted front server's Authentication-Results header, else from DNS with short
timeouts, a cache and a circuit breaker, so that a machine without DNS never stalls the
filter. Heavy libraries are imported on first use: importing this module is cheap.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cleanmail import mime

log = logging.getLogger(__name__)

SPF_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
DMARC_RESULTS = frozenset({"pass", "fail", "none", "temperror", "permerror"})
CACHE_SIZE = 10_000
BREAKER_SECONDS = 60.0
MAX_SIGNATURES = 5  # DKIM signatures tried per message; each may cost a DNS query

_AUTHSERV_ID = re.compile(r"\s*(?:\([^)]*\)\s*)*([^\s;()]+)")
_DMARC_RECORD = re.compile(r"\s*v\s*=\s*DMARC1\s*(?:;|$)", re.IGNORECASE)
# The DNS access of the check running in this context; our pyspf lookup hook reads it.
_current: contextvars.ContextVar[_Lookup | None] = contextvars.ContextVar("auth_dns", default=None)


@dataclass(frozen=True)
class AuthResults:
    """What SPF and DMARC said about one message, and where that came from."""

    spf: str
    dmarc: str
    source: str
    # The domain SPF was checked for (MAIL FROM, or HELO for the null sender): without it
    # an SPF failure cannot be tied to the domain that an allow entry matched.
    envelope_domain: str = ""

    def fails_for(self, domain: str, via: str) -> bool:
        """True when the results refute the claim of `domain` (via "envelope" or "from")."""
        domain = domain.strip().lower().rstrip(".")
        spf_failed = self.spf in ("fail", "softfail")
        if via == "envelope":
            return spf_failed and self.envelope_domain in ("", domain)
        if via != "from":
            raise ValueError(f"unknown via {via!r}")
        # With no DMARC record an aligned SPF failure still refutes; a temperror never
        # does: unknown is not the same as spoofed.
        if self.dmarc == "none" and spf_failed:
            return aligned(self.envelope_domain, domain)
        return self.dmarc == "fail"


@functools.cache
def _suffix_list() -> Any:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()  # the list bundled with the package: nothing is downloaded


def organizational_domain(domain: str) -> str:
    """The registrable domain (example.co.uk for mail.example.co.uk), per the suffix list."""
    domain = domain.strip().lower().rstrip(".")
    try:
        return _suffix_list().privatesuffix(domain) or domain
    except Exception:  # odd input must not break the filter
        return domain


def aligned(one: str, other: str, strict: bool = False) -> bool:
    """DMARC alignment: the same domain (strict) or the same organizational domain (relaxed)."""
    one, other = one.lower().rstrip("."), other.lower().rstrip(".")
    if not one or not other or strict:
        return bool(one) and one == other
    return organizational_domain(one) == organizational_domain(other)


class _DnsFailure(Exception):
    """An answer that could not be had: timeout, server failure or spent time budget."""


# pyspf's own dnspython lookup returns records in these shapes.
_SPF_SHAPES: dict[str, Any] = {
    "A": lambda r: r.address,
    "AAAA": lambda r: r.address,
    "MX": lambda r: (r.preference, r.exchange),
    "PTR": lambda r: r.target.to_text(True),
    "TXT": lambda r: r.strings,
    "SPF": lambda r: r.strings,
}


class _Lookup:
    """One check's DNS access: the shared resolver, a deadline, and whether DNS looked down."""

    def __init__(self, resolver: Any, timeout: float, deadline: float) -> None:
        self.resolver, self.timeout, self.deadline = resolver, timeout, deadline
        self.outage = False

    def query(self, name: str, rdtype: str, limit: float | None = None) -> list[Any]:
        """The records of one type at a name; empty when there are none."""
        import dns.exception
        import dns.name
        import dns.resolver

        try:
            qname = dns.name.from_text(name)
        except Exception:  # a name that cannot exist has no records
            return []
        if self.resolver is None:
            self.outage = True
            raise _DnsFailure("no resolver configured")
        lifetime = min(self.timeout, limit or self.timeout, self.deadline - time.monotonic())
        if lifetime <= 0:
            raise _DnsFailure("time budget spent")
        try:
            answer = self.resolver.resolve(
                qname, rdtype, lifetime=lifetime, raise_on_no_answer=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.NoNameservers as exc:
            # Only silence means DNS is down; a SERVFAIL is one zone's problem.
            silent = all(error[4] is None for error in exc.kwargs.get("errors", []))
            self.outage = self.outage or silent
            raise _DnsFailure(str(exc)) from exc
        except (dns.exception.Timeout, dns.resolver.NoResolverConfiguration) as exc:
            self.outage = True
            raise _DnsFailure(str(exc)) from exc
        except dns.exception.DNSException as exc:
            raise _DnsFailure(str(exc)) from exc
        return list(answer.rrset or [])

    def spf_records(self, name: str, qtype: str, limit: float) -> list[tuple[Any, Any]]:
        """Records for pyspf, which turns a TempError into its "temperror" result."""
        import spf

        try:
            rdatas = self.query(name, qtype, limit)
        except _DnsFailure as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        shape = _SPF_SHAPES.get(qtype)
        return [((name, qtype), shape(r)) for r in rdatas] if shape else []

    def dkim_txt(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's dnsfunc; a failure propagates, to read as temperror and not as a bad key."""
        records = self.query(name.decode("ascii", "replace"), "TXT")
        return b"".join(records[0].strings) if records else None


@functools.cache
def _spf_module() -> Any:
    """pyspf, with its DNS lookups routed through the running check's resolver."""
    import spf

    # pyspf takes no resolver: it calls the module global DNSLookup. Outside our checks
    # (no _Lookup set) the original runs, so other users of pyspf are unaffected.
    original = spf.DNSLookup

    def lookup(name: str, qtype: str, strict: object = True, timeout: float = 30) -> Any:
        current = _current.get()
        if current is None:
            return original(name, qtype, strict, timeout)
        return current.spf_records(name, qtype, timeout)

    spf.DNSLookup = lookup
    return spf


def _normal(result: object, allowed: frozenset[str]) -> str:
    value = str(result or "none").strip().lower()
    value = "fail" if value == "hardfail" else value  # RFC 5451's name for fail
    return value if value in allowed else "none"


def _from_header(message: mime.ParsedMessage, trusted: str, envelope: str) -> AuthResults | None:
    """Results from the topmost Authentication-Results header of the trusted server."""
    import authres

    trusted = trusted.strip().lower()
    for raw in message.headers.get_all("Authentication-Results") or []:
        value = re.sub(r"\r?\n", "", str(raw))
        try:
            header = authres.AuthenticationResultsHeader.parse_value(value)
        except Exception:  # authres raises assorted errors on garbage
            match = _AUTHSERV_ID.match(value)
            if match and match.group(1).lower() == trusted:
                return None  # our server's own header is unreadable; lower ones may be forged
            continue
        if (header.authserv_id or "").lower() != trusted:
            continue
        results: dict[str, Any] = {}
        for result in header.results:
            results.setdefault(str(getattr(result, "method", "")).lower(), result)
        spf, dmarc = results.get("spf"), results.get("dmarc")
        for prop in getattr(spf, "properties", None) or []:
            if (prop.type, prop.name) == ("smtp", "mailfrom") and prop.value:
                envelope = mime.address_domain(str(prop.value))  # what was actually checked
        spf_result = _normal(getattr(spf, "result", None), SPF_RESULTS)
        dmarc_result = _normal(getattr(dmarc, "result", None), DMARC_RESULTS)
        return AuthResults(spf_result, dmarc_result, "header", envelope)
    return None


def _dmarc_record(lookup: _Lookup, domain: str) -> dict[str, str] | None:
    """The DMARC tags for a domain, falling back to its organizational domain."""
    for candidate in dict.fromkeys((domain, organizational_domain(domain))):
        answers = lookup.query(f"_dmarc.{candidate}", "TXT")
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answers]
        records = [text for text in texts if _DMARC_RECORD.match(text)]
        if len(records) > 1:
            return None  # RFC 7489 6.6.3: several records mean no policy
        if records:
            pairs = (part.partition("=") for part in records[0].split(";"))
            return {k.strip().lower(): v.strip() for k, _, v in pairs if k.strip()}
    return None


def _dkim_result(lookup: _Lookup, raw: bytes, from_domain: str, strict: bool) -> str:
    """Whether a DKIM signature aligned with the From domain verifies: pass, fail, temperror."""
    import dkim
    import dkim.util

    verifier = dkim.DKIM(raw, timeout=max(lookup.timeout, 0.1))
    signatures = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
    outcome = "fail"
    for index, value in enumerate(signatures[:MAX_SIGNATURES]):
        try:
            signer = dkim.util.parse_tag_value(value).get(b"d", b"").decode("ascii")
            if aligned(signer, from_domain, strict) and verifier.verify(index, lookup.dkim_txt):
                return "pass"
        except _DnsFailure:
            outcome = "temperror"
        except Exception:  # a broken signature is just not a pass
            log.debug("DKIM signature %d unusable", index, exc_info=True)
    return outcome


def _dmarc(lookup: _Lookup, message: mime.ParsedMessage, spf: str, envelope: str) -> str:
    """The DMARC result: pass when SPF or DKIM aligns with the From domain."""
    from_domain = mime.address_domain(message.from_address)
    try:
        record = _dmarc_record(lookup, from_domain) if from_domain else None
    except _DnsFailure:
        return "temperror"
    if record is None:
        return "none"
    if spf == "pass" and aligned(envelope, from_domain, record.get("aspf") == "s"):
        return "pass"
    dkim_result = _dkim_result(lookup, message.raw, from_domain, record.get("adkim") == "s")
    if dkim_result == "pass":
        return "pass"
    # An unanswered lookup might have aligned: that is unknown, not a failure.
    return "temperror" if "temperror" in (dkim_result, spf) else "fail"


class Authenticator:
    """Answers SPF and DMARC for messages; shared by the filter's worker threads."""

    def __init__(
        self,
        trusted_authserv_id: str | None,
        dns_timeout: float = 2.0,
        dns_servers: Sequence[str] = (),
        cache_ttl: float = 300.0,
    ) -> None:
        self.trusted_authserv_id = trusted_authserv_id
        self.dns_timeout = dns_timeout
        self.dns_servers = tuple(dns_servers)
        self.cache_ttl = cache_ttl
        self._cache: OrderedDict[tuple[str, ...], tuple[float, AuthResults]] = OrderedDict()
        self._lock = threading.Lock()
        self._broken_until = 0.0

    @functools.cached_property
    def _resolver(self) -> Any:
        # Made on first lookup, so that header-only use never touches DNS configuration.
        return _make_resolver(self.dns_servers, self.dns_timeout)

    def check(
        self,
        message: mime.ParsedMessage,
        envelope_sender: str,
        client_address: str | None,
        helo: str | None,
    ) -> AuthResults:
        """SPF and DMARC for one message, from the trusted header or DNS; never raises."""
        # SPF checks the HELO name for the null sender (RFC 7208 2.4).
        helo_domain = (helo or "").strip().lower().rstrip(".")
        envelope = mime.address_domain(envelope_sender or "") or helo_domain
        try:
            if self.trusted_authserv_id:
                found = _from_header(message, self.trusted_authserv_id, envelope)
                if found is not None:
                    return found
            if not client_address:
                return AuthResults("none", "none", "none", envelope)
            return self._look_up(message, envelope_sender or "", client_address, helo, envelope)
        except Exception:
            log.exception("authentication check failed")
            return AuthResults("temperror", "temperror", "none", envelope)

    def _look_up(
        self, message: mime.ParsedMessage, sender: str, client: str, helo: str | None, env: str
    ) -> AuthResults:
        # A DKIM verdict holds for these exact bytes only (a copied signature on changed
        # content must not hit a cached pass), so signed mail is keyed by its content.
        signed = message.headers.get("DKIM-Signature") is not None
        digest = hashlib.sha256(message.raw).hexdigest() if signed else ""
        key = (client, env, mime.address_domain(message.from_address), digest)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit[0] > now:
                return hit[1]
            if now < self._broken_until:
                return AuthResults("temperror", "temperror", "lookup", env)
        # SPF gets at most dns_timeout (pyspf's querytime); DMARC and DKIM the rest of 2x.
        lookup = _Lookup(self._resolver, self.dns_timeout, now + 2 * self.dns_timeout)
        spf = self._spf(lookup, client, sender, helo)
        dmarc = "temperror" if lookup.outage else _dmarc(lookup, message, spf, env)
        result = AuthResults(spf, dmarc, "lookup", env)
        with self._lock:
            if lookup.outage:
                self._broken_until = time.monotonic() + BREAKER_SECONDS
                log.warning("DNS unreachable; no SPF/DMARC lookups for %.0f s", BREAKER_SECONDS)
            elif "temperror" not in (spf, dmarc):
                self._cache[key] = (time.monotonic() + self.cache_ttl, result)
                self._cache.move_to_end(key)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return result

    def _spf(self, lookup: _Lookup, client: str, sender: str, helo: str | None) -> str:
        spf = _spf_module()
        token = _current.set(lookup)
        try:
            result, _ = spf.check2(client, sender, helo or "unknown", querytime=self.dns_timeout)
        except Exception:  # pyspf raises on odd input such as a malformed address
            log.debug("SPF check failed", exc_info=True)
            result = "temperror"
        finally:
            _current.reset(token)
        return _normal(result, SPF_RESULTS)


def _make_resolver(servers: Sequence[str], timeout: float) -> Any:
    """A resolver for the given servers ("ip", "ip:port", "[ipv6]:port"), else the system's."""
    import dns.nameserver
    import dns.resolver

    try:
        resolver = dns.resolver.Resolver(configure=not servers)
        if servers:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(*_host_port(s)) for s in servers]
    except Exception:  # no resolv.conf, a bad address: every lookup reports temperror
        log.warning("no usable DNS resolver; SPF/DMARC lookups disabled", exc_info=True)
        return None
    resolver.timeout = resolver.lifetime = timeout
    resolver.cache = dns.resolver.LRUCache(2000)
    return resolver


def _host_port(spec: str) -> tuple[str, int]:
    host, port = spec.strip(), "53"
    if host.startswith("["):
        host, _, port = host[1:].partition("]:")
        host = host.rstrip("]")
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    return host, int(port or 53)
