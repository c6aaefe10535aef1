"""The raw-message store: exact round trip, compression, sharing and removal."""

import gzip
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

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


def test_files_go_one_folder_deep_and_are_readable_by_owner_and_group_only(tmp_path: Path) -> None:
    store = Store(tmp_path)
    sha = digest(b"one level")
    store.write(sha, b"one level")
    assert store.path(sha) == tmp_path / sha[:2] / f"{sha}.eml.gz"
    assert store.path(sha).stat().st_mode & 0o777 == 0o640


def test_a_file_in_the_older_two_level_layout_is_still_found(tmp_path: Path) -> None:
    """Stores written before the one-level layout keep working: read, listed, discarded."""
    store = Store(tmp_path)
    raw = b"Subject: kept from before\r\n\r\nbody\r\n"
    sha = digest(raw)
    legacy = tmp_path / sha[:2] / sha[2:4] / f"{sha}.eml.gz"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(gzip.compress(raw))
    assert store.exists(sha) and store.read(sha) == raw
    assert store.located(sha) == legacy
    store.ensure(sha, raw)
    assert not store.path(sha).exists()  # found where it was, not written again
    other = digest(b"new")
    store.write(other, b"new")
    assert sorted(store.iter_keys()) == sorted([sha, other])
    with Session() as session:
        session.begin()
        store.discard(session, sha)
        assert not store.exists(sha)
        session.rollback()  # the move aside is undone with the transaction
    assert store.read(sha) == raw
