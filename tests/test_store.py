"""The raw-message store: exact round trip, compression, sharing and removal."""

import gzip
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cleanmail.store import Store, StoreError, digest


@settings(max_examples=50, deadline=None)
@given(raw=st.binary(max_size=20000))
def test_round_trip_is_byte_for_byte(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    store = Store(tmp_path_factory.mktemp("store"))
    sha = digest(raw)
    store.write(sha, raw)
    assert store.read(sha) == raw


def test_files_are_compressed_and_named_by_hash(tmp_path: Path) -> None:
    store = Store(tmp_path)
    raw = b"Subject: hi\r\n\r\n" + b"the same line again\r\n" * 5000
    sha = digest(raw)
    store.write(sha, raw)
    path = store.path(sha)
    assert path.name == f"{sha}.eml.gz"
    assert path.stat().st_size < len(raw) / 10
    assert gzip.decompress(path.read_bytes()) == raw
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "key",
    ["../../etc/passwd", "A" * 64, "a" * 63, "a" * 65, "a" * 64 + "\n", "g" * 64, "../" + "a" * 61],
)
def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(StoreError):
        Store(tmp_path).path(key)
    assert Store(tmp_path).path(digest(b"x")).name == f"{digest(b'x')}.eml.gz"


def test_a_store_that_cannot_be_written_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "store"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(StoreError):
        Store(blocker).write(digest(b"x"), b"x")


def test_missing_message_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        Store(tmp_path).read(digest(b"never stored"))


def test_ensure_writes_only_when_missing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    sha = digest(b"abc")
    store.ensure(sha, b"abc")
    before = os.stat(store.path(sha)).st_ino
    store.ensure(sha, b"abc")
    assert os.stat(store.path(sha)).st_ino == before
