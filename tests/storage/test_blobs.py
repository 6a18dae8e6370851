"""Content-addressed blob store: keys, layout, dedup, corruption, temp files."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from storage.blobs import BlobStore, MissingBlob
from storage.errors import CorruptBlob


def test_key_is_sha256_and_layout_is_git_like(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"hello delta"
    key = store.put(data)
    assert key == hashlib.sha256(data).hexdigest()
    assert store.path(key) == tmp_path / "objects" / key[:2] / key[2:]
    assert store.get(key) == data and store.size(key) == len(data)
    assert list(store.iter_keys()) == [key]


def test_identical_blobs_are_stored_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    keys = [store.put(b"same bytes") for _ in range(3)]
    assert len(set(keys)) == 1
    files = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    assert len(files) == 1
    assert not any((tmp_path / "tmp").iterdir())


def test_concurrent_writers_of_one_blob_leave_one_whole_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(1 << 20)
    threads = [threading.Thread(target=store.put, args=(data,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (key,) = store.iter_keys()
    assert store.get(key) == data
    assert not any((tmp_path / "tmp").iterdir())


@pytest.mark.parametrize("where", [0, 17, -1])
def test_a_flipped_byte_raises_corrupt_blob(tmp_path: Path, where: int) -> None:
    store = BlobStore(tmp_path)
    key = store.put(os.urandom(100))
    path = store.path(key)
    raw = bytearray(path.read_bytes())
    raw[where] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlob, match=key):
        store.get(key)
    assert not store.verify(key)


def test_missing_blob_and_bad_keys(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(MissingBlob):
        store.get("0" * 64)
    for bad in ("../../etc/passwd", "ABC", "0" * 63, "0" * 64 + "\n"):
        with pytest.raises(ValueError):
            store.path(bad)


def test_delete_and_stale_temp_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    key = store.put(b"x" * 10)
    assert store.delete(key) == 10 and not store.has(key) and store.delete(key) == 0
    stale = tmp_path / "tmp" / "abc.1.dead.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = tmp_path / "tmp" / "def.2.live.tmp"
    fresh.write_bytes(b"in flight")
    assert store.stale_temps(grace_s=3600) == [stale]
