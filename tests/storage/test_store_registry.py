"""The store and its registry: gc and uploads against another registry are refused, errors
of unreadable registry entries name the model, replaced blobs keep gc's grace, and the
registry's side effects (notifications, job progress) never undo a committed change.
Real store, real ingest (tiny BERT), real SQLite files and a real redis-server."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from server.api.routes.admin import _report_progress
from storage.bases import resolve_base
from storage.errors import CorruptBlob, RegistryCorrupt, RegistryMismatch
from storage.ingest import ingest
from storage.registry import open_registry
from storage.store import REGISTRY_ID_FILE, DeltaStore, GcReport

OPTS = {"method": "dare", "p": 0.9, "show_progress": False}


def _age_all(store: DeltaStore, seconds: float) -> None:
    old = time.time() - seconds
    for k in store.blobs.iter_keys():
        os.utime(store.blobs.path(k), (old, old))


def _readable(store: DeltaStore, model_id: str) -> None:
    m = store.manifest(model_id)
    for entry in m.deltas.values():
        store.load_delta(entry)


@pytest.fixture(params=["sqlite", "redis"])
def stored(request, tmp_path: Path, ft: Path, tiny_bert_dir: Path):
    """A store with one model "prod", registered in the store's registry (SQLite file in
    the data folder, or Redis db 0), and the URL of an empty other registry of that kind."""
    data = tmp_path / "data"
    if request.param == "sqlite":
        url, other = None, f"sqlite:///{tmp_path / 'elsewhere.sqlite3'}"
    else:
        import redis

        url = request.getfixturevalue("redis_url")
        other = url.rsplit("/", 1)[0] + "/1"
        for u in (url, other):
            with redis.Redis.from_url(u) as r:
                r.flushdb()
    store = DeltaStore(data, url)
    ingest(store, "prod", ft, resolve_base(str(tiny_bert_dir), data), seed=7, **OPTS)
    yield store, url, other
    store.close()


def test_gc_against_another_registry_deletes_nothing(stored) -> None:
    """A gc run with the wrong (empty) registry sees no model: it must refuse, not delete
    every blob of the models registered in the store's registry."""
    store, _, other = stored
    _age_all(store, 7200)  # past the grace period: an unguarded gc would take them all
    blobs = set(store.blobs.iter_keys())
    with DeltaStore(store.root, other) as wrong, pytest.raises(RegistryMismatch) as e:
        wrong.gc(grace_s=0)
    assert "DAREX_REGISTRY_URL" in str(e.value) and "darex rebind" in str(e.value)
    assert set(store.blobs.iter_keys()) == blobs
    _readable(store, "prod")
    assert store.gc(grace_s=0).deleted == 0  # the store's own registry still may


def test_an_upload_into_another_registry_is_refused(stored, ft: Path, tiny_bert_dir) -> None:
    store, _, other = stored
    blobs = set(store.blobs.iter_keys())
    with DeltaStore(store.root, other) as wrong:
        with pytest.raises(RegistryMismatch, match="belongs to registry"):
            ingest(wrong, "stray", ft, resolve_base(str(tiny_bert_dir), store.root), seed=3, **OPTS)
        assert wrong.registry.list_models() == {}
        assert set(store.blobs.iter_keys()) == blobs  # refused before any work
        problems = wrong.verify().problems
        assert problems and "belongs to registry" in problems[0]
    assert store.verify().ok


def test_a_registry_that_came_back_empty_is_refused_until_rebind(stored) -> None:
    """Redis restarted without persistence (or a lost SQLite file): a new registry under
    the same URL. gc refuses; after `rebind` it is the store's, and gc frees the blobs
    nothing references any more."""
    store, url, _ = stored
    if url is None:
        (store.root / "registry.sqlite3").unlink()
        for suffix in ("-wal", "-shm"):
            (store.root / f"registry.sqlite3{suffix}").unlink(missing_ok=True)
    else:
        import redis

        with redis.Redis.from_url(url) as r:
            r.flushdb()
    _age_all(store, 7200)
    with DeltaStore(store.root, url) as fresh:
        with pytest.raises(RegistryMismatch):
            fresh.gc(grace_s=0)
        old, new = fresh.rebind()
        assert old is not None and old != new
        assert (store.root / REGISTRY_ID_FILE).read_text().strip() == new
        assert fresh.registry_problem() is None
        report = fresh.gc(grace_s=0)
    assert report.deleted > 0 and list(store.blobs.iter_keys()) == []


def test_a_store_without_a_record_is_bound_by_its_server_not_by_a_stray_add(
    tmp_path: Path, ft: Path, tiny_bert_dir: Path
) -> None:
    """A store made before the record: a registration (maybe from a shell pointed at the
    wrong registry) does not bind it; the server's startup does. Until then gc runs as
    before while the registry lists models, and refuses while it lists none."""
    from server.api.app import bind_store

    store = DeltaStore(tmp_path / "data")
    base = resolve_base(str(tiny_bert_dir), store.root)
    ingest(store, "a", ft, base, seed=7, **OPTS)
    assert (store.root / REGISTRY_ID_FILE).is_file()  # a new store: its first registration
    (store.root / REGISTRY_ID_FILE).unlink()  # as an older store has it
    assert store.registry_problem() is None
    ingest(store, "b", ft, base, seed=8, **OPTS)
    assert not (store.root / REGISTRY_ID_FILE).exists()  # other blobs: not a new store
    assert store.gc(grace_s=0).deleted == 0
    with DeltaStore(store.root, f"sqlite:///{tmp_path / 'stray.sqlite3'}") as stray:
        with pytest.raises(RegistryMismatch, match="not bound to a registry"):
            stray.gc(grace_s=0)
        assert stray.registry.registry_id() is None  # a read-only check wrote nothing
    bind_store(store)
    rid = store.registry.registry_id()
    assert rid and (store.root / REGISTRY_ID_FILE).read_text().strip() == rid
    store.close()


def test_replacing_a_model_keeps_its_old_blobs_through_the_grace_period(
    tmp_path: Path, ft: Path, tiny_bert_dir: Path
) -> None:
    """A replica may still be loading the old version: its blobs are young again after the
    replace (and after a delete), so gc's default grace keeps them; past it they go."""
    store = DeltaStore(tmp_path / "data")
    base = resolve_base(str(tiny_bert_dir), store.root)
    first = ingest(store, "m", ft, base, seed=7, **OPTS).manifest
    old_keys = {store.registry.get_model("m"), *first.keys()}
    _age_all(store, 7200)
    ingest(store, "m", ft, base, seed=8, replace=True, **OPTS)
    assert old_keys <= set(store.blobs.iter_keys())
    store.gc()  # the default grace period: one hour
    assert old_keys <= set(store.blobs.iter_keys())
    _age_all(store, 7200)
    assert store.delete("m")
    store.gc()
    assert store.gc().deleted == 0 and set(store.blobs.iter_keys())  # deleted: young again
    assert store.gc(grace_s=0).deleted > 0 and list(store.blobs.iter_keys()) == []
    store.close()


def test_a_registry_entry_that_is_not_a_blob_key_is_named(tmp_path: Path, ft, tiny_bert_dir):
    """An entry written by another program or version: listing still works (the model is
    listed), reading it names the model, verify reports it and gc refuses to guess."""
    store = DeltaStore(tmp_path / "data")
    base = resolve_base(str(tiny_bert_dir), store.root)
    ingest(store, "good", ft, base, seed=7, **OPTS)
    store.registry.set_model("legacy", "sha256:" + "ab" * 32)
    assert set(store.models(base.sha256)) == {"good", "legacy"}
    with pytest.raises(CorruptBlob, match="model 'legacy': manifest sha256:ab"):
        store.manifest("legacy")
    problems = store.verify().problems
    assert len(problems) == 1 and "'legacy'" in problems[0] and "not a blob key" in problems[0]
    with pytest.raises(CorruptBlob, match="legacy"):
        store.gc(grace_s=0)
    _readable(store, "good")
    store.close()


def test_gc_never_removes_the_temp_file_of_a_write_in_flight(tmp_path: Path) -> None:
    """`darex gc --grace-s 0` while a blob is being written: gc waits for the write, which
    lands whole."""
    store = DeltaStore(tmp_path / "data")
    writing, release = threading.Event(), threading.Event()
    real_fsync = os.fsync
    temps = store.blobs.tmp

    def slow_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(temps)):
            writing.set()
            release.wait(10)
        real_fsync(fd)

    result: dict[str, object] = {}

    def put() -> None:
        try:
            result["key"] = store.blobs.put(b"x" * 4096)
        except BaseException as e:  # reported below
            result["error"] = e

    os.fsync = slow_fsync  # type: ignore[assignment]
    try:
        t = threading.Thread(target=put)
        t.start()
        assert writing.wait(10)
        g = threading.Thread(target=lambda: result.setdefault("gc", store.gc(grace_s=0)))
        g.start()
        time.sleep(0.3)
        assert g.is_alive()  # waits on the write's lock
        release.set()
        t.join(10)
        g.join(10)
    finally:
        os.fsync = real_fsync  # type: ignore[assignment]
    assert not t.is_alive() and not g.is_alive()
    assert "error" not in result, result
    assert isinstance(result.get("gc"), GcReport)  # gc ran to its end, after the write
    assert store.blobs.get(result["key"]) == b"x" * 4096  # type: ignore[arg-type]
    store.close()


def test_a_failed_notification_does_not_undo_or_fail_a_change(redis_url: str, caplog) -> None:
    """The change commits before it is published; a publish that fails is logged, and the
    caller is told the change happened (a retry would hit ModelExists)."""
    import redis

    with redis.Redis.from_url(redis_url) as r:
        r.flushdb()
    reg = open_registry(redis_url)

    def broken_publish(*_a: object) -> None:
        raise redis.ConnectionError("connection reset")

    reg._r.publish = broken_publish  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="storage.redis_registry"):
        reg.set_model("m", "a" * 64)
        assert reg.get_model("m") == "a" * 64
        assert reg.delete_model("m")
    assert reg.list_models() == {}
    assert sum("not published" in r.getMessage() for r in caplog.records) == 2
    reg.close()


def test_redis_keys_this_version_cannot_read_are_named(redis_url: str) -> None:
    import redis

    with redis.Redis.from_url(redis_url) as r:
        r.flushdb()
        reg = open_registry(redis_url)
        r.set("darex:models:version", "v2")
        with pytest.raises(RegistryCorrupt, match="darex:models:version holds 'v2'"):
            reg.version()
        job = reg.create_job("m")
        r.hset(f"darex:job:{job.id}", "state", "paused")
        with pytest.raises(RegistryCorrupt, match=f"job '{job.id}'.*state"):
            reg.get_job(job.id)
        # another program's value under darex:models: Redis answers WRONGTYPE, which no
        # retry mends (RegistryCorrupt, not a plain RegistryUnavailable)
        r.set("darex:models", "not a hash")
        for call in (
            reg.list_models,
            lambda: reg.get_model("m"),
            lambda: reg.set_model("m", "a" * 64),
        ):
            with pytest.raises(
                RegistryCorrupt, match=r"WRONGTYPE.*another program use the darex: keys"
            ):
                call()
        assert r.get("darex:models") == b"not a hash"  # left as it was
        r.delete("darex:models")
        r.set("darex:models:version", 3)
        reg.set_model("m", "a" * 64)  # once the key is mended, the registry works again
        assert reg.list_models() == {"m": "a" * 64}
        reg.close()


def test_job_progress_that_cannot_be_written_does_not_stop_the_ingest(
    tmp_path: Path, ft: Path, tiny_bert_dir: Path, caplog
) -> None:
    """The upload's progress writes go to a registry that is out (a closed SQLite
    connection, as a Redis blip): the ingest still stores the model."""
    jobs = open_registry(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    job = jobs.create_job("m")
    jobs.close()  # out
    store = DeltaStore(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="server.api.routes.admin"):
        ingest(
            store,
            "m",
            ft,
            resolve_base(str(tiny_bert_dir), store.root),
            progress=lambda f, m: _report_progress(jobs, job.id, f, m),
            seed=7,
            **OPTS,
        )
    _readable(store, "m")
    assert any("progress not recorded" in r.getMessage() for r in caplog.records)
    store.close()


def test_a_full_sqlite_registry_says_so_and_answers_507(tmp_path: Path) -> None:
    """SQLite's "database or disk is full" is the disk's problem, not an outage: 507 with
    the data volume's other full-disk answers, not 503 "registry unavailable"."""
    from server.api.errors import describe
    from storage.errors import RegistryFull

    reg = open_registry(f"sqlite:///{tmp_path / 'r.sqlite3'}")
    pages = reg._db.execute("PRAGMA page_count").fetchone()[0]
    reg._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # a disk with two pages left
    with pytest.raises(RegistryFull, match="free space") as e:
        for _ in range(100):
            reg.create_job("m", message="x" * 4096)
    status, body = describe(e.value)
    assert status == 507 and body["error"]["code"] == "insufficient_storage"
    reg.close()


def test_a_registry_that_was_full_works_again_once_there_is_room(tmp_path: Path) -> None:
    from storage.errors import RegistryFull

    reg = open_registry(f"sqlite:///{tmp_path / 'r.sqlite3'}")
    pages = reg._db.execute("PRAGMA page_count").fetchone()[0]
    reg._db.execute(f"PRAGMA max_page_count = {pages + 2}")
    n = 0
    with pytest.raises(RegistryFull):
        for n in range(100):  # noqa: B007  (n: the jobs written before the refusal)
            reg.create_job("m", message="x" * 4096)
    # the refused write left no transaction open and nothing half-written
    assert reg._db.execute("SELECT count(*) FROM jobs").fetchone()[0] == n
    assert reg.list_models() == {}
    reg._db.execute("PRAGMA max_page_count = 1000000")  # space freed
    reg.set_model("m", "a" * 64)
    assert reg.get_model("m") == "a" * 64
    reg.close()
