"""SPF/DMARC results: trusted headers, alignment, and lookups against a real loopback DNS server."""

from __future__ import annotations

import base64
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from cleanmail import mime
from cleanmail.filter import auth

TRUSTED = "mx.isp.example"
GOOD_IP, BAD_IP, LIST_IP = "192.0.2.1", "203.0.113.9", "198.51.100.7"
ZONE = {
    "example.org.": ["v=spf1 ip4:192.0.2.1 -all"],
    "_dmarc.example.org.": ["v=DMARC1; p=reject"],
    "nodmarc.example.net.": ["v=spf1 ip4:192.0.2.1 -all"],
    "mail.example.co.uk.": ["v=spf1 ip4:192.0.2.1 -all"],
    "_dmarc.example.co.uk.": ["v=DMARC1; p=quarantine"],
    "list.example.com.": ["v=spf1 ip4:198.51.100.7 -all"],
}


def message(from_address: str = "alice@example.org", *headers: str, body: str = "Hello") -> bytes:
    """A small raw message with the given headers on top."""
    lines = [*headers, f"From: {from_address}", "To: bob@isp.example", "Subject: hi", ""]
    return ("\r\n".join(lines) + "\r\n" + body + "\r\n").encode()


def parsed(*args: str, **kwargs: str) -> mime.ParsedMessage:
    return mime.parse(message(*args, **kwargs))


class _Handler(socketserver.BaseRequestHandler):
    """Answers TXT questions from the server's zone; unknown names are NXDOMAIN."""

    def handle(self) -> None:
        data, sock = self.request
        query = dns.message.from_wire(data)
        self.server.queries.append(query.question[0].name.to_text())
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        records = self.server.zone.get(question.name.to_text().lower())
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT:
            texts = [
                " ".join(f'"{r[i : i + 255]}"' for i in range(0, len(r), 255)) for r in records
            ]
            response.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", "TXT", texts))
        sock.sendto(response.to_wire(), self.client_address)


@pytest.fixture
def dns_server() -> Iterator[socketserver.ThreadingUDPServer]:
    """A real DNS server on a free loopback port serving ZONE."""
    server = socketserver.ThreadingUDPServer(("127.0.0.1", 0), _Handler)
    server.zone = dict(ZONE)
    server.queries = []
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def authenticator(dns_server: socketserver.ThreadingUDPServer) -> auth.Authenticator:
    host, port = dns_server.server_address[:2]
    return auth.Authenticator(None, dns_timeout=1.0, dns_servers=[f"{host}:{port}"])


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, str]:
    """A fresh RSA key: the private PEM and the public key as DKIM's p= value."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a DKIM key")
    private = subprocess.run(
        ["openssl", "genrsa", "-traditional", "1024"], capture_output=True, check=True
    ).stdout
    public = subprocess.run(
        ["openssl", "rsa", "-pubout", "-outform", "DER"],
        input=private,
        capture_output=True,
        check=True,
    ).stdout
    return private, base64.b64encode(public).decode()


# Header mode


def header_check(*headers: str, trusted: str | None = TRUSTED) -> auth.AuthResults:
    return auth.Authenticator(trusted).check(parsed("alice@example.org", *headers), "", None, None)


def test_trusted_header_pass() -> None:
    result = header_check(
        f"Authentication-Results: {TRUSTED};\r\n spf=pass smtp.mailfrom=alice@example.org;"
        "\r\n dkim=pass header.d=example.org; dmarc=pass header.from=example.org"
    )
    assert result == auth.AuthResults("pass", "pass", "header", "example.org")
    assert not result.fails_for("example.org", "from")


def test_trusted_header_fail_is_case_insensitive() -> None:
    result = header_check(
        "Authentication-Results: MX.ISP.Example; spf=softfail smtp.mailfrom=x@example.org;"
        " dmarc=fail (p=reject) header.from=example.org"
    )
    assert (result.spf, result.dmarc, result.source) == ("softfail", "fail", "header")
    assert result.fails_for("example.org", "from")
    assert result.fails_for("example.org", "envelope")


def test_untrusted_authserv_id_is_ignored() -> None:
    result = header_check("Authentication-Results: evil.example; spf=pass; dmarc=pass")
    assert result == auth.AuthResults("none", "none", "none", "")


def test_no_trusted_id_configured_ignores_every_header() -> None:
    result = header_check(f"Authentication-Results: {TRUSTED}; dmarc=pass", trusted=None)
    assert result.source == "none"


def test_forged_lower_header_is_ignored() -> None:
    result = header_check(
        f"Authentication-Results: {TRUSTED}; spf=fail smtp.mailfrom=x@example.org; dmarc=fail",
        f"Authentication-Results: {TRUSTED}; spf=pass smtp.mailfrom=x@example.org; dmarc=pass",
    )
    assert (result.spf, result.dmarc) == ("fail", "fail")


def test_malformed_header_is_ignored() -> None:
    result = header_check(
        "Authentication-Results: ;;; = garbage (",
        f"Authentication-Results: {TRUSTED}; dmarc=fail header.from=example.org",
    )
    assert (result.dmarc, result.source) == ("fail", "header")


def test_malformed_trusted_header_does_not_promote_a_lower_one() -> None:
    result = header_check(
        f"Authentication-Results: {TRUSTED}; spf=",
        f"Authentication-Results: {TRUSTED}; spf=pass; dmarc=pass",
    )
    assert result.source == "none"


# Verdict semantics and alignment


@pytest.mark.parametrize(
    ("spf", "domain", "expected"),
    [
        ("fail", "example.org", True),
        ("softfail", "EXAMPLE.org.", True),
        ("fail", "other.example", False),
        ("pass", "example.org", False),
        ("temperror", "example.org", False),
        ("neutral", "example.org", False),
    ],
)
def test_fails_for_envelope(spf: str, domain: str, expected: bool) -> None:
    results = auth.AuthResults(spf, "none", "lookup", "example.org")
    assert results.fails_for(domain, "envelope") is expected


@pytest.mark.parametrize(
    ("spf", "dmarc", "envelope_domain", "from_domain", "expected"),
    [
        ("pass", "fail", "example.org", "example.org", True),
        ("fail", "pass", "example.org", "example.org", False),
        ("fail", "none", "mail.example.co.uk", "example.co.uk", True),
        ("softfail", "none", "example.co.uk", "news.example.co.uk", True),
        ("fail", "none", "other.co.uk", "example.co.uk", False),
        ("fail", "temperror", "example.org", "example.org", False),
        ("pass", "none", "example.org", "example.org", False),
    ],
)
def test_fails_for_from(
    spf: str, dmarc: str, envelope_domain: str, from_domain: str, expected: bool
) -> None:
    results = auth.AuthResults(spf, dmarc, "lookup", envelope_domain)
    assert results.fails_for(from_domain, "from") is expected


def test_alignment_uses_the_organizational_domain() -> None:
    assert auth.organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert auth.aligned("mail.example.co.uk", "example.co.uk")
    assert not auth.aligned("mail.example.co.uk", "example.co.uk", strict=True)
    assert not auth.aligned("example.co.uk", "other.co.uk")  # co.uk is a public suffix


# Lookup mode, against the loopback DNS server


def test_spf_pass_and_aligned_dmarc_pass(authenticator: auth.Authenticator) -> None:
    result = authenticator.check(parsed(), "alice@example.org", GOOD_IP, "mx.example.org")
    assert result == auth.AuthResults("pass", "pass", "lookup", "example.org")


def test_spf_fail_from_another_address(authenticator: auth.Authenticator) -> None:
    result = authenticator.check(parsed(), "alice@example.org", BAD_IP, "mx.example.org")
    assert (result.spf, result.dmarc) == ("fail", "fail")
    assert result.fails_for("example.org", "envelope") and result.fails_for("example.org", "from")


def test_dmarc_fail_for_spoofed_from(authenticator: auth.Authenticator) -> None:
    spoof = parsed("ceo@example.org")
    result = authenticator.check(spoof, "x@nodmarc.example.net", GOOD_IP, "mx.example.net")
    assert (result.spf, result.dmarc) == ("pass", "fail")
    assert result.fails_for("example.org", "from")
    assert not result.fails_for("nodmarc.example.net", "envelope")


def test_no_dmarc_record_is_none(authenticator: auth.Authenticator) -> None:
    mail = parsed("x@nodmarc.example.net")
    result = authenticator.check(mail, "x@nodmarc.example.net", GOOD_IP, "mx.example.net")
    assert (result.spf, result.dmarc) == ("pass", "none")


def test_dmarc_record_found_at_the_organizational_domain(authenticator: auth.Authenticator) -> None:
    mail = parsed("news@mail.example.co.uk")
    passed = authenticator.check(mail, "bounce@mail.example.co.uk", GOOD_IP, "mx")
    failed = authenticator.check(mail, "bounce@mail.example.co.uk", BAD_IP, "mx")
    assert (passed.spf, passed.dmarc) == ("pass", "pass")
    assert (failed.spf, failed.dmarc) == ("fail", "fail")


def test_aligned_dkim_passes_dmarc_through_a_mailing_list(
    dns_server: socketserver.ThreadingUDPServer,
    authenticator: auth.Authenticator,
    dkim_key: tuple[bytes, str],
) -> None:
    import dkim

    private, public = dkim_key
    dns_server.zone["sel._domainkey.example.org."] = [f"v=DKIM1; k=rsa; p={public}"]
    raw = message()
    signed = dkim.sign(raw, b"sel", b"example.org", private, include_headers=[b"from", b"subject"])
    relayed = mime.parse(signed + raw)
    result = authenticator.check(relayed, "bounce@list.example.com", LIST_IP, "list.example.com")
    assert (result.spf, result.dmarc) == ("pass", "pass")
    tampered = mime.parse(signed + message(body="Changed"))
    result = authenticator.check(tampered, "bounce@list.example.com", LIST_IP, "list.example.com")
    assert (result.spf, result.dmarc) == ("pass", "fail")


def test_results_are_cached(
    dns_server: socketserver.ThreadingUDPServer, authenticator: auth.Authenticator
) -> None:
    first = authenticator.check(parsed(), "alice@example.org", GOOD_IP, "mx")
    asked = len(dns_server.queries)
    assert authenticator.check(parsed(), "bob@example.org", GOOD_IP, "mx") == first
    assert len(dns_server.queries) == asked


def test_without_client_address_nothing_is_known(authenticator: auth.Authenticator) -> None:
    result = authenticator.check(parsed(), "alice@example.org", None, None)
    assert result == auth.AuthResults("none", "none", "none", "example.org")


def test_trusted_id_without_header_falls_back_to_lookup(
    dns_server: socketserver.ThreadingUDPServer,
) -> None:
    host, port = dns_server.server_address[:2]
    authenticator = auth.Authenticator(TRUSTED, dns_timeout=1.0, dns_servers=[f"{host}:{port}"])
    result = authenticator.check(parsed(), "alice@example.org", BAD_IP, "mx")
    assert (result.spf, result.dmarc, result.source) == ("fail", "fail", "lookup")


def test_garbage_input_never_raises(authenticator: auth.Authenticator) -> None:
    result = authenticator.check(mime.parse(b"\x00\xff garbage"), "<>", "not-an-ip", "[]")
    assert result.source == "lookup"


def test_silent_dns_gives_temperror_and_then_answers_at_once() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # reads nothing, answers nothing
    try:
        port = silent.getsockname()[1]
        authenticator = auth.Authenticator(None, dns_timeout=0.3, dns_servers=[f"127.0.0.1:{port}"])
        started = time.monotonic()
        result = authenticator.check(parsed(), "alice@example.org", GOOD_IP, "mx")
        assert time.monotonic() - started < 1.5
        assert (result.spf, result.dmarc, result.source) == ("temperror", "temperror", "lookup")
        assert not result.fails_for("example.org", "from")
        started = time.monotonic()
        again = authenticator.check(parsed("x@other.example"), "x@other.example", BAD_IP, "mx")
        assert time.monotonic() - started < 0.5
        assert (again.spf, again.dmarc) == ("temperror", "temperror")
    finally:
        silent.close()
