"""Store integrity under re-uploads and gc: a registered model never points at a lost blob,
and re-ingesting a fine-tune repairs its corrupt blobs. Real store, real ingest, tiny BERT."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from storage.bases import resolve_base
from storage.blobs import BlobStore, MissingBlob
from storage.ingest import ingest
from storage.store import DeltaStore

OPTS = {"method": "dare", "p": 0.9, "seed": 7, "show_progress": False}


@pytest.fixture(scope="module")
def bert_ft(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full fine-tune of the tiny BERT base: every weight perturbed a little."""
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_bert_dir).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("bert-ft-integrity")
    model.save_pretrained(out)
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DeltaStore]:
    s = DeltaStore(tmp_path / "data")
    yield s
    s.close()


def readable(store: DeltaStore, model_id: str) -> None:
    """Every tensor of the model decodes (raises MissingBlob / CorruptBlob otherwise)."""
    m = store.manifest(model_id)
    for entry in m.deltas.values():
        store.load_delta(entry)
    for entry in m.extras.values():
        store.load_dense(entry)


def age(store: DeltaStore, keys: set[str], seconds: float) -> None:
    old = time.time() - seconds
    for k in keys:
        os.utime(store.blobs.path(k), (old, old))


def test_gc_racing_a_reupload_leaves_the_model_readable(bert_ft, tiny_bert_dir, store) -> None:
    """gc marks the blobs of a deleted model (past the grace period), the same fine-tune is
    uploaded again and reuses them before gc deletes: the new model keeps every blob."""
    base = resolve_base(str(tiny_bert_dir), store.root)
    first = ingest(store, "ft", bert_ft, base, **OPTS)
    assert store.delete("ft")
    blobs = set(store.blobs.iter_keys())
    assert first.manifest.keys() <= blobs
    age(store, blobs, 7200)  # past the one-hour grace period

    reached = threading.Event()  # the re-upload wrote (reused) every blob
    go_on = threading.Event()  # gc is done: the re-upload may register
    errors: list[BaseException] = []

    def hold_before_registering(_fraction: float, stage: str) -> None:
        if stage == "registering":
            reached.set()
            assert go_on.wait(60), "gc did not finish"

    def reupload() -> None:
        try:
            ingest(store, "ft", bert_ft, base, progress=hold_before_registering, **OPTS)
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)
            reached.set()

    # Force the interleaving: right after gc's scan judged the last blob old enough to go,
    # the re-upload runs up to (not including) its registration.
    real_age_s = store.blobs.age_s
    calls = {"n": 0}
    uploader = threading.Thread(target=reupload)

    def age_s_then_reupload(key: str) -> float:
        a = real_age_s(key)
        calls["n"] += 1
        if calls["n"] == len(blobs):  # the scan checked every (unreferenced) blob
            uploader.start()
            assert reached.wait(120), "the re-upload did not reach registration"
        return a

    store.blobs.age_s = age_s_then_reupload  # type: ignore[method-assign]
    try:
        report = store.gc()
    finally:
        go_on.set()
        if uploader.is_alive() or uploader.ident is not None:
            uploader.join(120)
        store.blobs.age_s = real_age_s  # type: ignore[method-assign]
    assert not errors, errors
    assert calls["n"] >= len(blobs)
    assert report.deleted <= 1  # at most the old manifest (the new one differs by its time)
    readable(store, "ft")
    assert store.verify().ok, store.verify().problems


@pytest.mark.parametrize("op", ["rm", "replace"])
def test_a_gc_the_moment_a_version_leaves_the_registry_keeps_it_for_its_grace_period(
    bert_ft, tiny_bert_dir, store, op: str
) -> None:
    """A version stored hours ago is removed or replaced, and another process's gc runs the
    moment the registry changes: the version's blobs were refreshed before the change (with
    the blob lock held), so they stay for the grace period, for a replica still loading it."""
    base = resolve_base(str(tiny_bert_dir), store.root)
    first = ingest(store, "ft", bert_ft, base, **OPTS)
    old = {first.manifest_key, *first.manifest.keys()}
    age(store, old, 7200)  # past the one-hour grace period
    gcs: list[threading.Thread] = []
    name = "delete_model" if op == "rm" else "set_model"
    real = getattr(store.registry, name)

    def change_then_gc(*args, **kw):
        out = real(*args, **kw)
        gc = threading.Thread(target=lambda: DeltaStore(store.root).gc(grace_s=3600))
        gc.start()
        gcs.append(gc)
        gc.join(1.0)  # done at once unless the blob lock is still held
        return out

    setattr(store.registry, name, change_then_gc)
    try:
        if op == "rm":
            assert store.delete("ft")
        else:
            ingest(store, "ft", bert_ft, base, replace=True, **{**OPTS, "seed": 8})
    finally:
        setattr(store.registry, name, real)
    assert len(gcs) == 1
    gcs[0].join(60)
    assert all(store.blobs.has(k) for k in old), sorted(k for k in old if not store.blobs.has(k))
    assert store.gc(grace_s=0).deleted >= len(old) - 1  # unreferenced: they do go later


def test_register_refuses_a_manifest_whose_blob_vanished(bert_ft, tiny_bert_dir, store) -> None:
    """A blob removed between its write and the registration (e.g. `darex gc --grace-s 0`
    during an ingest): MissingBlob, and nothing is registered."""
    base = resolve_base(str(tiny_bert_dir), store.root)

    def gc_in_between(_fraction: float, stage: str) -> None:
        if stage == "registering":
            store.gc(grace_s=0)  # nothing registered yet: every blob goes

    with pytest.raises(MissingBlob, match="'ft' was not registered"):
        ingest(store, "ft", bert_ft, base, progress=gc_in_between, **OPTS)
    assert store.models() == {}
    ingest(store, "ft", bert_ft, base, **OPTS)  # running it again works
    readable(store, "ft")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "flip-manifest"])
def test_reingest_repairs_a_damaged_blob(bert_ft, tiny_bert_dir, store, damage: str) -> None:
    """A damaged delta or manifest blob is one verify problem; uploading the fine-tune again
    repairs it and verify passes. A corrupt manifest stays behind unreferenced (the new one
    differs by its time): verify notes it without failing, and gc removes it."""
    base = resolve_base(str(tiny_bert_dir), store.root)
    first = ingest(store, "ft", bert_ft, base, **OPTS)
    m = first.manifest
    entry = max(m.deltas.values(), key=lambda e: e.nbytes)
    key = first.manifest_key if damage == "flip-manifest" else entry.key
    path = store.blobs.path(key)
    raw = bytearray(path.read_bytes())
    if damage.startswith("flip"):
        raw[len(raw) // 2] ^= 0x40
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[:-5]))
    else:
        path.unlink()
    before = store.verify()
    assert len(before.problems) == 1 and key in before.problems[0], before.problems
    ingest(store, "ft", bert_ft, base, replace=True, **OPTS)
    assert store.manifest("ft").deltas.keys() == m.deltas.keys()
    report = store.verify()
    assert report.ok, report.problems
    left = [first.manifest_key] if damage == "flip-manifest" else []
    assert report.unreferenced_corrupt == left
    readable(store, "ft")
    assert not any(store.blobs.tmp.iterdir())
    store.gc(grace_s=0)
    assert store.verify().unreferenced_corrupt == []


def test_put_rewrites_a_stored_blob_that_no_longer_matches(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    data = os.urandom(4096)
    key = blobs.put(data)
    path = blobs.path(key)
    path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size
    assert not blobs.verify(key)
    old = time.time() - 7200
    os.utime(path, (old, old))
    assert blobs.put(data) == key
    assert blobs.get(key) == data
    assert blobs.age_s(key) < 60  # a reuse (or the rewrite) is young for gc
    os.utime(path, (old, old))
    assert blobs.put(data) == key and blobs.age_s(key) < 60  # an intact blob: only touched
