"""RegistryWatcher against a real redis-server: deletes and replaces are seen, outages reported."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import NotReady
from server.replicas import RegistryWatcher
from storage.registry import open_registry

pytestmark = pytest.mark.redis


class Retired:
    """Collects the ids the watcher retires (what the scheduler's ``retire`` would receive)."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, model_id: str) -> None:
        self.ids.append(model_id)


def test_delete_and_replace_elsewhere_retire_here(redis_server) -> None:
    mine, theirs = open_registry(redis_server.url), open_registry(redis_server.url)
    theirs.set_model("a", "key-a")
    theirs.set_model("b", "key-b")
    retired = Retired()
    w = RegistryWatcher(mine, retired, ttl_s=0.1)

    async def scenario() -> None:
        assert not w.ready
        with pytest.raises(NotReady, match="not been reached"):
            w.require_ready()
        assert await w.poll_once() == []  # first snapshot retires nothing
        assert w.ready and w.snapshot == {"a": "key-a", "b": "key-b"}
        theirs.set_model("c", "key-c")  # a new upload needs nothing
        assert await w.poll_once() == []
        theirs.delete_model("a")
        theirs.set_model("b", "key-b2", replace=True)
        assert await w.poll_once() == ["a", "b"]
        assert await w.poll_once() == []  # unchanged version: nothing more

    asyncio.run(scenario())
    assert retired.ids == ["a", "b"]


def test_a_retire_that_fails_is_tried_again_on_the_next_check(redis_server) -> None:
    """A retire that fails (its requests outlast the drain: ``ModelBusy``) must not be
    forgotten once the version has moved: the stale delta would be served until evicted."""
    from server.errors import ModelBusy

    mine, theirs = open_registry(redis_server.url), open_registry(redis_server.url)
    theirs.set_model("a", "key-a")
    calls: list[str] = []

    async def busy_once(model_id: str) -> None:
        calls.append(model_id)
        if len(calls) == 1:
            raise ModelBusy(f"model {model_id!r} still has 1 request(s) queued or running")

    w = RegistryWatcher(mine, busy_once, ttl_s=0.1)

    async def scenario() -> None:
        await w.poll_once()
        theirs.set_model("a", "key-a2", replace=True)
        assert await w.poll_once() == []  # failed: not retired
        assert w.snapshot["a"] == "key-a"  # still the old key here
        assert await w.poll_once() == ["a"]  # the version did not move: tried again
        assert w.snapshot["a"] == "key-a2"
        assert await w.poll_once() == []

    asyncio.run(scenario())
    assert calls == ["a", "a"]


def test_a_replaced_model_is_dropped_not_retired(redis_server) -> None:
    """Replaced elsewhere: its cached copy goes (``drop``, between batches) and requests go
    on to the new version; only a deleted model is retired (requests refused)."""
    mine, theirs = open_registry(redis_server.url), open_registry(redis_server.url)
    theirs.set_model("a", "key-a")
    theirs.set_model("b", "key-b")
    retired, dropped = Retired(), Retired()
    w = RegistryWatcher(mine, retired, drop=dropped, ttl_s=0.1)

    async def scenario() -> None:
        await w.poll_once()
        theirs.delete_model("a")
        theirs.set_model("b", "key-b2", replace=True)
        assert await w.poll_once() == ["a", "b"]

    asyncio.run(scenario())
    assert retired.ids == ["a"] and dropped.ids == ["b"]


def test_outage_is_reported_and_recovers(redis_server) -> None:
    reg = open_registry(redis_server.url)
    reg.set_model("a", "key-a")
    reg.set_model("b", "key-b")
    retired, dropped = Retired(), Retired()
    w = RegistryWatcher(reg, retired, drop=dropped, ttl_s=0.1)

    async def scenario() -> None:
        await w.poll_once()
        assert w.ready
        redis_server.stop()
        await w.poll_once()
        assert not w.ready
        assert dropped.ids == ["a", "b"]  # cached copies can no longer be vouched for
        await w.poll_once()
        assert dropped.ids == ["a", "b"]  # once per outage
        with pytest.raises(NotReady, match="registry is unreachable"):
            w.require_ready()
        # Redis comes back empty (no persistence in this test): the model is gone there,
        # so after the resync this replica must not serve its cached copy.
        redis_server.start()
        assert await w.poll_once() == ["a", "b"]
        assert w.ready
        w.require_ready()

    asyncio.run(scenario())
    assert retired.ids == ["a", "b"]


def test_a_registry_holding_another_programs_data_is_reported_unreadable(redis_server) -> None:
    """The registry answers but ``darex:models`` holds another program's string: the
    replica is not ready and says the registry is unreadable (not unreachable), and it
    recovers once the key is put back."""
    import redis

    reg = open_registry(redis_server.url)
    reg.set_model("a", "key-a")
    dropped = Retired()
    w = RegistryWatcher(reg, Retired(), drop=dropped, ttl_s=0.1)

    async def scenario() -> None:
        await w.poll_once()
        assert w.ready
        with redis.Redis.from_url(redis_server.url) as r:
            r.rename("darex:models", "darex:models:kept")
            r.set("darex:models", "not a hash")
            r.incr("darex:models:version")  # the watcher re-reads the models
            await w.poll_once()
            assert not w.ready and dropped.ids == ["a"]
            with pytest.raises(NotReady, match=r"registry is unreadable.*WRONGTYPE"):
                w.require_ready()
            r.delete("darex:models")
            r.rename("darex:models:kept", "darex:models")
        await w.poll_once()
        assert w.ready and w.snapshot == {"a": "key-a"}

    asyncio.run(scenario())


def test_run_loop_wakes_on_published_change(redis_server) -> None:
    mine, theirs = open_registry(redis_server.url), open_registry(redis_server.url)
    theirs.set_model("a", "key-a")
    retired = Retired()
    w = RegistryWatcher(mine, retired, ttl_s=30.0)  # polling alone would take 30 s

    async def scenario() -> float:
        w.start()
        for _ in range(100):
            if w.ready:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # the listener subscribes
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.to_thread(theirs.delete_model, "a")
        while not retired.ids and loop.time() - t0 < 5:
            await asyncio.sleep(0.02)
        await w.stop()
        return loop.time() - t0

    took = asyncio.run(scenario())
    assert retired.ids == ["a"]
    assert took < 2.0, f"pubsub wake-up took {took:.2f}s"
