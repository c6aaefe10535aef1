"""Blocked attachment types: names, detected content, archives, hostile input, real ham."""

from __future__ import annotations

import base64
import concurrent.futures
import gzip
import io
import logging
import struct
import tarfile
import time
import urllib.parse
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleanmail import mime
from cleanmail.filter import attachments
from cleanmail.filter.attachments import Finding

HAM = Path("/work/shared/corpus/ham")

# libmagic: "ELF 64-bit LSB no file type, no machine, invalid version (SYSV)",
# MIME type application/octet-stream (so only the description says ELF).
ELF = b"\x7fELF\x02\x01\x01" + b"\x00" * 57
REGISTRY = (
    b"Windows Registry Editor Version 5.00\r\n\r\n"
    b"[HKEY_CURRENT_USER\\Software\\Microsoft\\Windows\\CurrentVersion\\Run]\r\n"
    b'"updater"="C:\\\\Users\\\\Public\\\\evil.exe"\r\n'
)


def pe32() -> bytes:
    """libmagic: "PE32 executable (GUI) Intel 80386, for MS Windows"."""
    dos = b"MZ" + b"\x00" * 58 + struct.pack("<I", 0x40)
    coff = b"PE\x00\x00" + struct.pack("<HHIIIHH", 0x14C, 1, 0, 0, 0, 0xE0, 0x0102)
    optional = bytearray(0xE0)
    struct.pack_into("<H", optional, 0, 0x10B)  # PE32
    struct.pack_into("<H", optional, 68, 2)  # Windows GUI subsystem
    struct.pack_into("<I", optional, 92, 16)  # number of data directories
    return dos + coff + bytes(optional) + b"\x00" * 512


def iso9660() -> bytes:
    """libmagic: "ISO 9660 CD-ROM filesystem data", application/x-iso9660-image."""
    image = bytearray(40_000)
    image[32768:32774] = b"\x01CD001"
    return bytes(image)


def part(
    payload: bytes,
    filename: str | None = None,
    ctype: str = "application/octet-stream",
    disposition: str | None = "attachment",
    raw_filename: bytes | None = None,
) -> bytes:
    """One base64 MIME part; the name travels RFC 2231-encoded unless raw_filename is set."""
    lines = [b"Content-Type: " + ctype.encode()]
    params = b""
    if raw_filename is not None:
        params = b"; filename=" + raw_filename
    elif filename is not None:
        quoted = urllib.parse.quote(filename.encode("utf-8", "surrogatepass"), safe="")
        params = b"; filename*=utf-8''" + quoted.encode()
    if disposition:
        lines.append(b"Content-Disposition: " + disposition.encode() + params)
    lines.append(b"Content-Transfer-Encoding: base64")
    return b"\r\n".join(lines) + b"\r\n\r\n" + base64.encodebytes(payload)


def message(*parts: bytes, body: bytes = b"Hei,\r\n\r\nse vedlegget.\r\n") -> mime.ParsedMessage:
    """A multipart/mixed message: a plain text body, then the given parts."""
    chunks = [
        b"From: kari@example.com\r\nTo: ola@example.no\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b0undary"\r\n\r\n'
        b"--b0undary\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body + b"\r\n"
    ]
    chunks += [b"--b0undary\r\n" + p + b"\r\n" for p in parts]
    return mime.parse(b"".join(chunks) + b"--b0undary--\r\n")


def scan(*parts: bytes, body: bytes = b"Hei,\r\n\r\nse vedlegget.\r\n") -> list[Finding]:
    return attachments.scan(message(*parts, body=body).parts)


def zip_of(*files: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files:
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_of(*files: tuple[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def mark_encrypted(data: bytes) -> bytes:
    """Set the "encrypted" flag bit on every member, as a password-protected zip has it."""
    out = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = out.find(signature)
        while pos >= 0:
            out[pos + offset] |= 0x01
            pos = out.find(signature, pos + 4)
    return bytes(out)


def test_blocked_extensions_follow_the_product_list() -> None:
    assert len(attachments.BLOCKED_EXTENSIONS) == 73
    assert {".exe", ".js", ".vsmacros", ".ace", ".jar"} <= attachments.BLOCKED_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in attachments.BLOCKED_EXTENSIONS)


@pytest.mark.parametrize(
    ("filename", "shown", "ext"),
    [
        ("setup.exe", "setup.exe", ".exe"),
        ("LOVE-LETTER.JS", "LOVE-LETTER.JS", ".js"),
        ("evil.exe.", "evil.exe.", ".exe"),
        ("evil.exe. . ", "evil.exe. .", ".exe"),  # mime.py strips the outer spaces
        ("invoice\u202efdp.exe", "invoicefdp.exe", ".exe"),  # shows as "invoiceexe.pdf"
        ("evil.exe\x00.txt", "evil.exe\ufffd.txt", ".exe"),
        ("ev\x01il.vbs", "ev\ufffdil.vbs", ".vbs"),
        ("a/b\\c.scr", "a/b\\c.scr", ".scr"),
        ("faktura.pdf\u200b.lnk", "faktura.pdf.lnk", ".lnk"),
        ("påskeferie.bat", "påskeferie.bat", ".bat"),
    ],
)
def test_blocked_names(filename: str, shown: str, ext: str) -> None:
    assert scan(part(b"harmless", filename)) == [Finding(shown, f"blocked file name {ext}")]


@pytest.mark.parametrize(
    "filename", ["report.pdf", "exe", "notes.exe.txt", "photo.jpeg", "setup.exe/", "a.jsx"]
)
def test_innocent_names(filename: str) -> None:
    assert scan(part(b"harmless", filename)) == []


@pytest.mark.parametrize(
    "header",
    [
        b'Content-Disposition: attachment; filename="=?utf-8?B?'
        + base64.b64encode(b"sl\xc3\xa5.exe")
        + b'?="',
        b"Content-Disposition: attachment; filename*0*=utf-8''sl%C3%A5; filename*1=.cmd",
        b'Content-Type: application/octet-stream; name="tool.exe"',
    ],
)
def test_encoded_names_and_content_type_name(header: bytes) -> None:
    raw = header + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(b"hi")
    if not header.startswith(b"Content-Type"):
        raw = b"Content-Type: application/octet-stream\r\n" + raw
    assert [f.reason[:17] for f in scan(raw)] == ["blocked file name"]


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (ELF, "ELF 64-bit LSB"),
        (pe32(), "PE32 executable (GUI) Intel 80386, for MS Windows"),
        (REGISTRY, "Windows Registry text"),
        (iso9660(), "application/x-iso9660-image"),
    ],
)
def test_content_under_an_innocent_name_and_type(payload: bytes, words: str) -> None:
    findings = scan(part(payload, "holiday.jpg", ctype="image/jpeg"))
    assert len(findings) == 1
    assert findings[0].filename == "holiday.jpg"
    assert words in findings[0].reason


def test_script_attachment_is_blocked_by_content() -> None:
    # libmagic says "POSIX shell script, ASCII text executable" for an attached file.
    findings = scan(part(b"#!/bin/sh\nrm -rf ~\n", "readme.txt", ctype="text/plain"))
    assert [f.filename for f in findings] == ["readme.txt"]


def test_declared_text_body_that_is_really_a_program() -> None:
    for program in (ELF, pe32()):
        raw = part(program, ctype="text/plain; charset=us-ascii", disposition=None)
        parsed = message(raw)
        assert parsed.parts[1].is_body_text
        findings = attachments.scan(parsed.parts)
        assert len(findings) == 1 and findings[0].filename == ""


@pytest.mark.parametrize(
    "body",
    [
        b"#!/bin/sh\necho 'try this on the list'\n",
        b"#!/usr/bin/env node\nconsole.log(1)\n",
        b"#!/usr/bin/perl -w\nprint 1;\n",
        REGISTRY,  # text/x-ms-regedit in a body is text, not a file
        b"<html><body><p>Hei!</p></body></html>\n",
        "Hei på deg, her er møtereferatet.\n".encode("latin-1"),
    ],
)
def test_body_text_is_not_blocked_for_looking_like_code(body: bytes) -> None:
    assert scan(body=body) == []


def test_zip_holding_a_blocked_name() -> None:
    data = zip_of(("docs/readme.txt", b"read me"), ("docs/setup.exe", b"MZ"))
    assert scan(part(data, "docs.zip")) == [
        Finding("docs.zip/docs/setup.exe", "blocked file name .exe")
    ]


def test_zip_recognised_by_content_not_name() -> None:
    findings = scan(part(zip_of(("run.bat", b"@echo off")), "picture.png", ctype="image/png"))
    assert findings == [Finding("picture.png/run.bat", "blocked file name .bat")]


def test_zip_holding_elf_under_an_innocent_name() -> None:
    findings = scan(part(zip_of(("notes.txt", ELF)), "notes.zip"))
    assert [f.filename for f in findings] == ["notes.zip/notes.txt"]
    assert "ELF" in findings[0].reason


def test_nested_zips_up_to_depth_three() -> None:
    inner = zip_of(("payload.dat", pe32()))
    for level in ("c.zip", "b.zip"):
        inner = zip_of((level, inner))
    findings = scan(part(inner, "a.zip"))
    assert [f.filename for f in findings] == ["a.zip/b.zip/c.zip/payload.dat"]
    # One level deeper is past the bound: that archive's own name and content still count.
    too_deep = zip_of(("a.zip", inner))
    assert scan(part(too_deep, "outer.zip")) == []


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz", "w"])
def test_tar_holding_a_blocked_name(mode: str) -> None:
    data = tar_of(("src/ok.txt", b"fine"), ("src/install.exe", b"x"), mode=mode)
    assert scan(part(data, "src.tgz")) == [
        Finding("src.tgz/src/install.exe", "blocked file name .exe")
    ]


def test_tar_member_content_and_zip_in_tar() -> None:
    data = tar_of(("a.txt", ELF), ("b.zip", zip_of(("c.cmd", b"x"))))
    findings = scan(part(data, "bundle.tar.gz"))
    assert [f.filename for f in findings] == ["bundle.tar.gz/a.txt", "bundle.tar.gz/b.zip/c.cmd"]


def test_single_gzip_file() -> None:
    assert scan(part(gzip.compress(b"hello"), "tool.exe.gz")) == [
        Finding("tool.exe.gz/tool.exe", "blocked file name .exe")
    ]
    # gzip keeps the original name in its header, which unpackers like 7-Zip restore.
    named = io.BytesIO()
    with gzip.GzipFile(filename="invoice.scr", mode="wb", fileobj=named) as stream:
        stream.write(b"hello")
    assert [f.reason for f in scan(part(named.getvalue(), "invoice.gz"))] == [
        "blocked file name .scr"
    ]
    assert [f.filename for f in scan(part(gzip.compress(ELF), "data.gz"))] == ["data.gz/data"]


def test_encrypted_zip_members_are_checked_by_name_only() -> None:
    data = mark_encrypted(zip_of(("invoice.exe", b"x" * 100), ("notes.txt", ELF)))
    assert zipfile.ZipFile(io.BytesIO(data)).infolist()[0].flag_bits & 0x1
    assert scan(part(data, "secret.zip")) == [
        Finding("secret.zip/invoice.exe", "blocked file name .exe")
    ]


@pytest.mark.parametrize(
    "cut",
    [
        lambda z: z[:-30],  # end of the directory missing
        lambda z: z[:40] + b"\x00" * 20 + z[60:],  # member data overwritten
        lambda z: z.replace(b"PK\x01\x02", b"PK\x01\x03"),  # directory entry broken
        lambda z: z[:30] + b"\xff" * 4 + z[34:],
    ],
)
def test_corrupt_zip_is_no_finding_and_no_error(cut, caplog: pytest.LogCaptureFixture) -> None:
    data = cut(zip_of(("report.txt", b"quarterly numbers " * 100)))
    assert scan(part(data, "report.zip")) == []
    assert "scan failed" not in caplog.text


def test_corrupt_gzip_and_tar_are_no_finding() -> None:
    assert scan(part(gzip.compress(b"x" * 5000)[:50], "a.gz")) == []
    assert scan(part(tar_of(("a.txt", b"x" * 5000), mode="w")[:700], "a.tar")) == []


def test_zip_bomb_is_read_within_bounds() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("zeros.bin", "w", force_zip64=True) as stream:
            for _ in range(200):
                stream.write(bytes(1 << 20))  # 200 MiB of zeros, about 200 KiB packed
        archive.writestr("later.exe", b"x")
    started = time.perf_counter()
    findings = scan(part(buffer.getvalue(), "bomb.zip"))
    assert time.perf_counter() - started < 2
    assert findings == [Finding("bomb.zip/later.exe", "blocked file name .exe")]


def test_huge_tar_member_and_pax_header_are_read_within_bounds() -> None:
    header = tarfile.TarInfo("PaxHeaders/x")
    header.type = tarfile.XHDTYPE
    header.size = 8 * 1024**3 - 1  # claims 8 GiB of extended header
    stream = gzip.compress(header.tobuf(format=tarfile.USTAR_FORMAT) + bytes(60 << 20), 1)
    started = time.perf_counter()
    assert scan(part(stream, "p.tar.gz")) == []
    assert time.perf_counter() - started < 2


def test_many_members_are_bounded() -> None:
    data = zip_of(*((f"f{i}", b"") for i in range(3000)), ("z.exe", b""))
    started = time.perf_counter()
    assert scan(part(data, "many.zip")) == []  # the .exe is past the member bound
    assert time.perf_counter() - started < 2


def test_scan_is_thread_safe() -> None:
    parts = message(part(pe32(), "a.pdf"), part(zip_of(("x.txt", ELF)), "b.zip")).parts
    expected = attachments.scan(parts)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: attachments.scan(parts), range(40)))
    assert all(result == expected for result in results)


class ErrorLog(logging.Handler):
    """Collects what scan() logs when its last-resort guard catches a bug."""

    def __enter__(self) -> list[logging.LogRecord]:
        self.records: list[logging.LogRecord] = []
        attachments.log.addHandler(self)
        return self.records

    def __exit__(self, *exc: object) -> None:
        attachments.log.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


ARCHIVE_STARTS = [
    b"",
    b"PK\x03\x04",
    b"\x1f\x8b\x08\x08",
    b"BZh9",
    b"\xfd7zXZ\x00",
    b"\x7fELF",
    b"MZ",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.sampled_from(ARCHIVE_STARTS),
    payload=st.binary(max_size=4096),
    filename=st.text(max_size=80),
    ctype=st.sampled_from(["application/octet-stream", "text/plain", "application/zip"]),
)
def test_random_payloads_and_names_never_raise(
    start: bytes, payload: bytes, filename: str, ctype: str
) -> None:
    with ErrorLog() as errors:
        findings = scan(part(start + payload, filename, ctype=ctype))
    assert errors == []
    assert isinstance(findings, list)
    assert all(isinstance(f, Finding) for f in findings)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_damaged_archives_never_raise(data: st.DataObject) -> None:
    archive = data.draw(
        st.sampled_from(
            [
                zip_of(("a.txt", b"hello " * 50), ("b.zip", zip_of(("c.txt", ELF)))),
                tar_of(("a.txt", b"hello " * 50), ("b.exe", b"x")),
                tar_of(("a.txt", b"hello " * 50), mode="w:bz2"),
                gzip.compress(zip_of(("a.txt", b"hello"))),
            ]
        )
    )
    damaged = bytearray(archive)
    for _ in range(data.draw(st.integers(1, 8))):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    with ErrorLog() as errors:
        assert isinstance(scan(part(bytes(damaged), "x.bin")), list)
    assert errors == []


# Ham that genuinely carries a blocked attachment, and why (file name: reason).
HAM_WITH_FINDINGS = {
    # A Perl script attached as "rotate": libmagic says "Perl script text executable".
    "easy_ham__01561.4d9ed1a0103b1a90cfd91921b9014124": "Perl script text executable",
}


@pytest.mark.skipif(not HAM.is_dir(), reason="no ham corpus")
def test_ordinary_ham_has_no_findings() -> None:
    files = sorted(HAM.iterdir())[::14]
    files += [HAM / name for name in HAM_WITH_FINDINGS if (HAM / name).exists()]
    assert len(files) >= 200
    for path in files:
        raw = path.read_bytes()
        if raw.startswith(b"From "):
            raw = raw.split(b"\n", 1)[1]
        findings = attachments.scan(mime.parse(raw).parts)
        if path.name in HAM_WITH_FINDINGS:
            assert [HAM_WITH_FINDINGS[path.name] in f.reason for f in findings] == [True]
        else:
            assert findings == [], path.name
