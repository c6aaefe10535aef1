"""Where raw messages live: compressed files named by the SHA-256 of their bytes.

A file is written durably (temporary file, fsync, rename, fsync of the folder)
before the filter answers 250. Files are shared by every recipient of the same
message; ``discard()`` moves the last one aside inside the transaction that drops
the last reference, and the move is undone if that transaction rolls back.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import secrets
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import event
from sqlalchemy.orm import Session

CHUNK = 1024 * 1024
COMPRESS_LEVEL = 5
_PENDING = "cleanmail.store.discarded"
_KEY = re.compile(r"[0-9a-f]{64}")


class StoreError(Exception):
    """A raw message could not be written or read."""


def digest(raw: bytes | bytearray | memoryview) -> str:
    """The store key of a raw message."""
    return hashlib.sha256(raw).hexdigest()


class Store:
    """A folder of gzip-compressed raw messages keyed by content hash."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        """Where a message's file is written: one of 256 folders named by the key's start.

        One level rather than two: a fresh store would otherwise create a folder (and
        sync it) for almost every message of its first hundred thousand.
        """
        if _KEY.fullmatch(sha256) is None:
            raise StoreError(f"not a message key: {sha256!r}")
        return self.root / sha256[:2] / f"{sha256}.eml.gz"

    def located(self, sha256: str) -> Path:
        """The message's file where it is: ``path``, or where stores before 2026-11 put it."""
        path = self.path(sha256)
        if path.exists():
            return path
        legacy = self.root / sha256[:2] / sha256[2:4] / path.name
        return legacy if legacy.exists() else path

    def exists(self, sha256: str) -> bool:
        """True when the message's file is present."""
        return self.located(sha256).exists()

    def write(self, sha256: str, raw: bytes | bytearray | memoryview) -> None:
        """Write a message durably; replaces an existing file with the same bytes."""
        final = self.path(sha256)
        temporary = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = _create(temporary)
            try:
                # zlib writes the gzip format itself (wbits 31): GzipFile's set-up cost
                # more than compressing a typical message.
                packer = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 31)
                view = memoryview(raw)
                for start in range(0, len(view), CHUNK):
                    _write_all(fd, packer.compress(view[start : start + CHUNK]))
                _write_all(fd, packer.flush())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):  # the folder itself may be what failed
                temporary.unlink()
            raise StoreError(f"cannot store message {sha256[:12]}: {exc.strerror or exc}") from exc

    def ensure(self, sha256: str, raw: bytes | bytearray | memoryview) -> None:
        """Make sure the message's file exists, writing it when it does not."""
        if not self.exists(sha256):
            self.write(sha256, raw)

    def open(self, sha256: str) -> BinaryIO:
        """Open a stored message for reading its raw bytes."""
        try:
            return gzip.open(self.located(sha256), "rb")  # type: ignore[return-value]
        except OSError as exc:
            raise StoreError(f"message {sha256[:12]} is not in the store") from exc

    def read(self, sha256: str) -> bytes:
        """The raw bytes of a stored message, exactly as received."""
        try:
            with self.open(sha256) as handle:
                return handle.read()
        except (OSError, EOFError) as exc:
            raise StoreError(f"message {sha256[:12]} cannot be read: {exc}") from exc

    def discard(self, session: Session, sha256: str) -> None:
        """Move a file aside now; delete it when the session commits, restore it on rollback."""
        final = self.located(sha256)
        trash = self.root / "trash" / f"{sha256}.{secrets.token_hex(6)}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(final, trash)
        except FileNotFoundError:
            return
        session.info.setdefault(_PENDING, []).append((final, trash))

    def iter_keys(self) -> Iterator[str]:
        """Every message key present in the store (for sweeps of unreferenced files)."""
        for pattern in ("??/*.eml.gz", "??/??/*.eml.gz"):
            for path in self.root.glob(pattern):
                yield path.name.removesuffix(".eml.gz")


def _create(path: Path) -> int:
    """Open a new file for writing, making its folders only when they are missing.

    Most messages land in a folder that exists: trying first saves two mkdir calls each.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o640)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o640)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@event.listens_for(Session, "after_commit")
def _delete_discarded(session: Session) -> None:
    for _final, trash in session.info.pop(_PENDING, []):
        trash.unlink(missing_ok=True)


@event.listens_for(Session, "after_soft_rollback")
def _restore_discarded(session: Session, _previous_transaction: object) -> None:
    for final, trash in session.info.pop(_PENDING, []):
        if trash.exists():
            os.replace(trash, final)
