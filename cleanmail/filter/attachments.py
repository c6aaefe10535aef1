"""Blocked attachment types: by file name, by detected content, and inside archives.

Every message is hostile: scan() never raises, and archives are read within fixed
bounds (nesting depth, members, decompressed bytes), so a zip bomb costs little.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import re
import struct
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import magic

from cleanmail import mime

log = logging.getLogger(__name__)

BLOCKED_EXTENSIONS: frozenset[str] = frozenset(
    "." + ext
    for ext in """
    jar ade adp app asp bas bat chm cmd com cpl csh exe fxp hlp hta inf ins isp its js
    jse ksh lnk mad maf mag mam maq mar mas mat mau mav maw mda mdb mde mdt mdw mdz msc
    msi msp mst ops pcd pif prf prg pst reg scf scr sct shb shs tmp vb vbe vbs vsmacros
    vss vst vsw ws wsc wsf wsh lib sys vxd ace
    """.split()
)

# What libmagic sees of a payload; 64 KiB also covers ISO 9660's mark at offset 32769.
SAMPLE = 64 * 1024
MAX_DEPTH = 3  # archives nested deeper than this are checked by name and content only
MAX_MEMBERS = 1000  # archive members looked at per message, nested ones included
MAX_BYTES = 50 * 1024 * 1024  # decompressed bytes read per message
MAX_EXTENDED_HEADER = 8 * 1024  # bytes of a tar pax or long-name header
MAX_ZIP_ENTRIES = 10_000  # zipfile reads the whole central directory before we can stop

_BLOCKED_CONTENT = ("self-extract", "executable", "elf", "registry", "application/x-iso9660-image")
# Invisible characters that change how a name is shown but not what it is.
_INVISIBLE = re.compile("[\u00ad\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
# Control characters (mime.clean_text made them U+FFFD): C code ends a name at NUL.
_CUT = re.compile("[\x00-\x1f\x7f\ufffd]")
# Windows drops trailing dots and spaces; matched on the reversed name to stay linear.
_TRAILING = re.compile(r"[\s.]*")
_PATH = re.compile(r"[/\\]")
_COMPRESSED_SUFFIX = re.compile(r"\.(gz|bz2|xz)$", re.IGNORECASE)
# The ways hostile archives fail; see _Scan.archive for why that is not a finding.
_ARCHIVE_ERRORS = (
    zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, OSError,
    zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError, ValueError,
    OverflowError, IndexError,
)  # fmt: skip


@dataclass(frozen=True)
class Finding:
    """One reason to block a message: which attachment, and why."""

    filename: str
    reason: str


def scan(parts: Iterable[mime.Part]) -> list[Finding]:
    """Every blocked name or content among the parts, looking inside archives."""
    state = _Scan()
    for part in parts:
        label = _shown(part.filename or "")
        try:
            state.check_name(part.filename or "", label)
            data = part.payload
            state.check_content(data[:SAMPLE], label, body_text=part.is_body_text)
            state.archive(data, label, 0)
        except Exception:
            # A bug here must neither bounce the mail nor stop the other parts' checks.
            log.exception("attachment scan failed for part %r", label)
    return state.findings


def _blocked_extension(name: str) -> str | None:
    """The blocked extension a file name really has, seen past the usual disguises."""
    name = _INVISIBLE.sub("", name)
    for candidate in (_CUT.split(name, 1)[0], _CUT.sub("", name)):
        base = _PATH.split(candidate)[-1]
        trailing = _TRAILING.match(base[::-1])
        base = base[: len(base) - (trailing.end() if trailing else 0)]
        ext = "." + base.rpartition(".")[2].lower()
        if "." in base and ext in BLOCKED_EXTENSIONS:
            return ext
    return None


def _shown(name: str) -> str:
    """A name as an operator should see it: its characters in their real order, bounded."""
    return mime.clean_text(_INVISIBLE.sub("", name), 1000)


class _Handles:
    """One thread's libmagic handles: a handle is not safe to share between threads."""

    def __init__(self) -> None:
        self.describe = magic.Magic()
        self.mime_type = magic.Magic(mime=True)
        # Body text skips libmagic's text pass (2/3 of its time): that pass finds only
        # scripts and other text formats, which the body-text rule ignores anyway.
        self.describe_binary = _without_text_pass(magic.Magic())
        self.mime_type_binary = _without_text_pass(magic.Magic(mime=True))


def _without_text_pass(handle: magic.Magic) -> magic.Magic:
    handle.flags |= magic.MAGIC_NO_CHECK_ASCII  # libmagic calls it MAGIC_NO_CHECK_TEXT now
    magic.magic_setflags(handle.cookie, handle.flags)
    return handle


_local = threading.local()


def _handles() -> _Handles:
    handles = getattr(_local, "handles", None)
    if handles is None:
        handles = _local.handles = _Handles()
    return handles


def _identify(handle: magic.Magic, sample: bytes) -> str:
    try:
        return handle.from_buffer(sample) or ""
    except magic.MagicException:
        return ""


def _blocked_words(detected: str) -> bool:
    detected = detected.lower()
    return any(word in detected for word in _BLOCKED_CONTENT)


def _is_tar(head: bytes) -> bool:
    return head[257:262] == b"ustar"


def _is_compressed(head: bytes) -> bool:
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"


def _decompress(data: bytes) -> _Readable:
    """A reader of what gzip, bzip2 or xz data decompresses to, a little at a time."""
    if data[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=io.BytesIO(data))
    if data[:3] == b"BZh":
        return bz2.BZ2File(io.BytesIO(data))
    return lzma.LZMAFile(io.BytesIO(data))


def _gzip_name(data: bytes) -> str:
    """The original file name that a gzip header may carry (RFC 1952 FNAME)."""
    if data[:2] != b"\x1f\x8b" or len(data) < 10 or not data[3] & 0x08:
        return ""
    pos = 10
    if data[3] & 0x04:  # FEXTRA comes first: a length, then that many bytes
        pos += 2 + int.from_bytes(data[10:12], "little")
    end = data.find(b"\x00", pos, pos + 1024)
    return data[pos:end].decode("latin-1") if end > 0 else ""


def _member_label(label: str, name: str) -> str:
    """How a member is shown: "outer.zip/inner.exe"."""
    return "/".join(filter(None, (label, _shown(name))))


class _TarInfo(tarfile.TarInfo):
    """Refuses extended headers too big to be genuine: a pax header can claim gigabytes."""

    _EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                 tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)  # fmt: skip

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        # Genuine extended headers hold a path or a few times; Python before 3.11.10 also
        # parses them with a regex that is quadratic in runs of digits (CVE-2024-6232).
        if self.type in self._EXTENDED and self.size > MAX_EXTENDED_HEADER:
            raise tarfile.ReadError("extended header too big")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def _zip_entries(data: bytes) -> int:
    """The entry count a zip's end record claims, read before zipfile loads the directory."""
    try:
        end = zipfile._EndRecData(io.BytesIO(data))  # type: ignore[attr-defined]
    except (OSError, struct.error, ValueError):
        return 0
    return int(end[zipfile._ECD_ENTRIES_TOTAL]) if end else 0  # type: ignore[attr-defined]


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Scan:
    """The findings of one message, and what is left of its inspection bounds."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.members = MAX_MEMBERS
        self.bytes = MAX_BYTES

    def check_name(self, name: str, label: str) -> None:
        ext = _blocked_extension(name) if name else None
        if ext:
            self.findings.append(Finding(label, f"blocked file name {ext}"))

    def check_content(self, sample: bytes, label: str, body_text: bool = False) -> None:
        """libmagic's verdict on the first bytes, whatever name and type they claim."""
        if not sample:
            return
        # Every binary that body text could hide (ELF, PE, self-extractors, ISO images)
        # has NUL bytes near its start; text without them is not worth libmagic's time.
        if body_text and b"\x00" not in sample[:4096]:
            return
        handles = _handles()
        description = _identify(handles.describe_binary if body_text else handles.describe, sample)
        if description == "data":  # nothing matched, so the MIME type is octet-stream too
            return
        # libmagic guesses "COM executable" from one first byte (0xB8, 0x8C), which GBK and
        # Latin-1 body text often starts with; real programs in a body have real magic.
        if body_text and description.startswith("DOS executable (COM"):
            return
        blocked = _blocked_words(description)
        if blocked and not body_text:
            self.findings.append(Finding(label, f"blocked content ({description})"))
            return
        mime_type = _identify(handles.mime_type_binary if body_text else handles.mime_type, sample)
        # A mailing-list post that starts with "#!/bin/sh" is text, not a program.
        if body_text and mime_type.startswith("text/"):
            return
        if blocked or _blocked_words(mime_type):
            self.findings.append(Finding(label, f"blocked content ({description}; {mime_type})"))

    def archive(self, data: bytes, label: str, depth: int) -> None:
        """Look inside data if it is an archive, recognised by content rather than name."""
        if depth >= MAX_DEPTH or self.members <= 0 or self.bytes <= 0:
            return
        try:
            # The end-of-directory record sits in the last 64 KiB (its comment's limit).
            if data.rfind(b"PK\x05\x06", max(0, len(data) - 65557)) >= 0:
                self.zip(data, label, depth)
            elif _is_tar(data):
                self.tar(io.BytesIO(data), label, depth)
            elif _is_compressed(data):
                self.compressed(data, label, depth)
        except _ARCHIVE_ERRORS:
            # A corrupt archive is not a finding: what no unpacker can open cannot deliver
            # a program either, and cut-short attachments are common enough in real mail
            # that blocking them would hurt. Whatever was found before the damage stands.
            pass

    def zip(self, data: bytes, label: str, depth: int) -> None:
        entries = _zip_entries(data)
        if entries > MAX_ZIP_ENTRIES:
            # Too many to look through; an archive like that is a way to hide a program.
            self.findings.append(
                Finding(label, f"archive too large to inspect ({entries} entries)")
            )
            return
        archive = zipfile.ZipFile(io.BytesIO(data))
        for info in archive.infolist():
            if self.members <= 0:
                return
            self.members -= 1
            name = _member_label(label, info.filename)
            self.check_name(info.filename, name)
            if info.is_dir() or info.flag_bits & 0x1:
                continue  # an encrypted member shows us its name only
            try:
                with archive.open(info) as member:
                    self.member(_Charged(member, self), name, depth)
            except _ARCHIVE_ERRORS:
                continue  # e.g. an unsupported compression or a bad CRC in this member only

    def tar(self, stream: _Readable, label: str, depth: int) -> None:
        # Stream mode reads front to back and never seeks, and each byte read is charged
        # to the budget, so neither a bomb nor a huge declared size can run away.
        with tarfile.open(fileobj=_Charged(stream, self), mode="r|", tarinfo=_TarInfo) as archive:
            for info in archive:
                if self.members <= 0:
                    return
                self.members -= 1
                name = _member_label(label, info.name)
                self.check_name(info.name, name)
                if info.isreg() and (member := archive.extractfile(info)) is not None:
                    self.member(member, name, depth)

    def compressed(self, data: bytes, label: str, depth: int) -> None:
        """A .gz, .bz2 or .xz file: either a compressed tar or one compressed file."""
        if _is_tar(_Charged(_decompress(data), self).read(512)):
            self.tar(_decompress(data), label, depth)
            return
        self.members -= 1
        inner = _gzip_name(data) or _COMPRESSED_SUFFIX.sub("", label.rpartition("/")[2])
        name = _member_label(label, inner)
        self.check_name(inner, name)
        self.member(_Charged(_decompress(data), self), name, depth)

    def member(self, member: _Readable, name: str, depth: int) -> None:
        """Check one member's content, and open it too when it is an archive itself."""
        head = member.read(SAMPLE)
        self.check_content(head, name)
        nested = head[:4] == b"PK\x03\x04" or _is_tar(head) or _is_compressed(head)
        if nested and depth + 1 < MAX_DEPTH and self.bytes > 0:
            self.archive(head + member.read(), name, depth + 1)


class _Charged:
    """A stream whose reads are charged to the scan's byte budget; it ends when that does."""

    def __init__(self, stream: _Readable, scan: _Scan) -> None:
        self.stream = stream
        self.scan = scan

    def read(self, size: int = -1, /) -> bytes:
        """Up to size bytes (as many as the budget allows when size is negative)."""
        left = max(self.scan.bytes, 0)
        size = left if size < 0 else min(size, left)
        data = self.stream.read(size) if size > 0 else b""
        self.scan.bytes -= len(data)
        return data
