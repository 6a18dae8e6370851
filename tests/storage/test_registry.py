"""One suite, two backends: SQLite (file) and Redis (a real redis-server on loopback)."""

from __future__ import annotations

import socket
import threading

import pytest

from storage.errors import ModelExists, RegistryUnavailable, UnknownJob, UnknownModel
from storage.registry import open_registry
from tests.storage.conftest import start_redis

KEY_A, KEY_B = "a" * 64, "b" * 64


def test_models_set_get_list_delete(registry_url: str) -> None:
    with open_registry(registry_url) as reg:
        assert reg.ping() is True
        assert reg.list_models() == {}
        reg.set_model("sst2", KEY_A)
        reg.set_model("cola:v1", KEY_B)
        assert reg.get_model("sst2") == KEY_A
        assert reg.list_models() == {"cola:v1": KEY_B, "sst2": KEY_A}
        with pytest.raises(ModelExists, match="sst2"):
            reg.set_model("sst2", KEY_B)
        assert reg.get_model("sst2") == KEY_A  # the refused write changed nothing
        reg.set_model("sst2", KEY_B, replace=True)
        assert reg.get_model("sst2") == KEY_B
        assert reg.delete_model("sst2") is True
        assert reg.delete_model("sst2") is False
        with pytest.raises(UnknownModel, match="sst2"):
            reg.get_model("sst2")
        assert reg.list_models() == {"cola:v1": KEY_B}


def test_version_grows_on_every_model_change_and_is_shared(registry_url: str) -> None:
    with open_registry(registry_url) as a, open_registry(registry_url) as b:
        v0 = b.version()
        a.set_model("m", KEY_A)
        v1 = b.version()
        assert v1 > v0
        a.set_model("m", KEY_B, replace=True)
        v2 = b.version()
        assert v2 > v1
        a.delete_model("m")
        assert b.version() > v2
        assert b.list_models() == {}


def test_a_write_that_changes_nothing_leaves_the_version_alone(registry_url: str) -> None:
    """A refused registration, a delete of an id nobody registered and a delete whose
    expected key no longer matches change no model, so replicas have nothing to reload."""
    with open_registry(registry_url) as reg:
        reg.set_model("m", KEY_A)
        v = reg.version()
        with pytest.raises(ModelExists):
            reg.set_model("m", KEY_B)
        assert reg.delete_model("nobody") is False
        assert reg.delete_model("m", expected=KEY_B) is False  # another version than seen
        assert (reg.version(), reg.get_model("m")) == (v, KEY_A)
        assert reg.delete_model("m", expected=KEY_A) is True
        assert reg.version() > v and reg.list_models() == {}


def test_jobs_lifecycle(registry_url: str) -> None:
    with open_registry(registry_url) as reg:
        job = reg.create_job("sst2", message="uploaded")
        assert (job.state, job.progress, job.error) == ("queued", 0.0, None)
        assert reg.get_job(job.id) == job
        running = reg.update_job(job.id, state="running", progress=0.25, message="pruning")
        assert (running.state, running.progress, running.message) == ("running", 0.25, "pruning")
        assert reg.update_job(job.id, progress=7.0).progress == 1.0  # clamped to [0, 1]
        failed = reg.update_job(job.id, state="failed", error="BaseMismatch: shape")
        assert (failed.state, failed.error, failed.model_id) == (
            "failed",
            "BaseMismatch: shape",
            "sst2",
        )
        assert failed.updated >= job.created
        with pytest.raises(UnknownJob):
            reg.get_job("nope")
        with pytest.raises(UnknownJob):
            reg.update_job("nope", progress=0.5)
        with pytest.raises(ValueError):
            reg.update_job(job.id, state="exploded")  # type: ignore[arg-type]


def test_concurrent_registration_of_one_id_has_one_winner(registry_url: str) -> None:
    results: list[str] = []

    def register(key: str) -> None:
        with open_registry(registry_url) as reg:
            try:
                reg.set_model("race", key)
                results.append("won")
            except ModelExists:
                results.append("lost")

    threads = [threading.Thread(target=register, args=(k * 64,)) for k in "abcdef"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost"] * 5 + ["won"]


def test_unreachable_backends_raise_registry_unavailable(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once the socket closes
    reg = open_registry(f"redis://127.0.0.1:{port}/0")
    for call in (reg.ping, reg.list_models, reg.version, lambda: reg.get_model("m")):
        with pytest.raises(RegistryUnavailable, match="Redis"):
            call()
    with pytest.raises(RegistryUnavailable, match="Redis"):
        reg.set_model("m", KEY_A)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RegistryUnavailable, match="SQLite"):
        open_registry(f"sqlite:///{blocker / 'registry.sqlite3'}")
    with pytest.raises(ValueError, match="registry URL"):
        open_registry("postgres://x")


def test_redis_outage_mid_use_raises_registry_unavailable(tmp_path) -> None:
    proc, url = start_redis(tmp_path)
    try:
        reg = open_registry(url)
        reg.set_model("m", KEY_A)
        assert reg.get_model("m") == KEY_A
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(RegistryUnavailable):
        reg.get_model("m")
    with pytest.raises(RegistryUnavailable):
        reg.create_job("m")


def test_a_redis_job_that_expired_is_not_recreated_by_an_update(tmp_path) -> None:
    """The existence check and the write are one step: a job whose hash expired between
    them (simulated: EXISTS answers yes, the hash is gone) stays gone, no TTL-less stub."""
    proc, url = start_redis(tmp_path)
    try:
        with open_registry(url) as reg:
            job = reg.create_job("m")
            reg._r.delete(reg._job(job.id))  # expired
            reg._r.exists = lambda *keys: 1  # what a check made just before saw
            with pytest.raises(UnknownJob):
                reg.update_job(job.id, state="running", progress=0.5)
            assert reg._r.hgetall(reg._job(job.id)) == {}
    finally:
        proc.terminate()
        proc.wait()
