"""The delta cache table, step by step: hits, misses, evictions, pinning, prefetch, forget."""

from __future__ import annotations

import threading

import pytest
import torch

from server.cache import EVENTS_KEPT, DeltaCache
from server.deltas import ResidentDelta
from storage.errors import UnknownModel

NNZ = 100  # each entry: 100 int64 + 100 float32 = 1200 bytes
SIZE = NNZ * 12


class Loader:
    """A real decoder stand-in: builds a fresh delta per id and counts the store loads."""

    def __init__(self, known: set[str], gate: threading.Event | None = None) -> None:
        self.known, self.gate, self.calls = known, gate, []

    def __call__(self, model_id: str) -> ResidentDelta:
        if self.gate is not None:
            self.gate.wait(5)
        if model_id not in self.known:
            raise UnknownModel(model_id)
        self.calls.append(model_id)
        idx = torch.arange(NNZ, dtype=torch.int64) * 3
        return ResidentDelta(model_id, idx, torch.full((NNZ,), 1.0), {}, "causal-lm", None)


def _cache(device_entries: int, host_entries: int, ids: str = "abcdef", **kw) -> DeltaCache:
    return DeltaCache(
        Loader(set(ids), **kw), torch.device("cpu"), device_entries * SIZE, host_entries * SIZE
    )


def test_the_event_record_keeps_only_the_latest() -> None:
    """A server swaps for as long as it runs: its record of cache events must not grow."""
    c = _cache(1, 0, ids="ab")
    for i in range(EVENTS_KEPT + 10):
        c.get("ab"[i % 2])
    assert len(c.events) == EVENTS_KEPT
    last = "ab"[i % 2]  # each get loads one and drops the other: the latest is kept
    assert list(c.events)[-3:] == [
        ("store-load", last),
        ("device-evict", "ab"[1 - i % 2]),
        ("host-drop", "ab"[1 - i % 2]),
    ]


def test_lru_by_bytes_demotes_then_drops() -> None:
    c = _cache(2, 1)
    c.get("a"), c.get("b")
    assert list(c.events) == [("store-load", "a"), ("store-load", "b")]
    c.get("a")  # a becomes most recent: b is now the LRU
    c.get("c")  # evicts b to host
    c.get("d")  # evicts a to host, which evicts b (host holds one)
    assert list(c.events)[2:] == [
        ("device-hit", "a"),
        ("store-load", "c"),
        ("device-evict", "b"),
        ("store-load", "d"),
        ("device-evict", "a"),
        ("host-evict", "b"),
    ]
    s = c.stats()
    assert s["device"]["entries"] == ["c", "d"] and s["host"]["entries"] == ["a"]
    assert s["device"]["bytes"] == 2 * SIZE and s["host"]["bytes"] == SIZE
    c.events.clear()
    c.get("a")  # host hit, promoted; c (LRU) demoted
    assert list(c.events) == [("host-hit", "a"), ("device-evict", "c")]
    s = c.stats()
    assert s["device"]["entries"] == ["d", "a"] and s["host"]["entries"] == ["c"]
    assert (s["device"]["hits"], s["device"]["misses"], s["device"]["evictions"]) == (1, 5, 3)
    assert (s["host"]["hits"], s["host"]["misses"], s["host"]["evictions"]) == (1, 4, 1)
    assert s["store_loads"] == 4 and c.loader.calls == ["a", "b", "c", "d"]


def test_pinned_entry_is_never_evicted() -> None:
    c = _cache(1, 4)
    c.get("a", pin=True)
    c.get("b")  # does not fit beside pinned a: the tier runs over budget, a stays
    assert ("device-evict", "a") not in c.events
    assert c.stats()["device"]["entries"] == ["a", "b"]
    c.get("c")  # b is unpinned: it goes, a stays
    assert c.events[-1] == ("device-evict", "b")
    c.unpin("a")
    c.get("d")  # now a and c are evictable: over-budget tier shrinks back
    s = c.stats()
    assert s["device"]["entries"] == ["d"] and s["device"]["bytes"] <= s["device"]["budget"]
    assert s["host"]["entries"] == ["b", "a", "c"]


def test_unknown_model_leaves_table_unchanged() -> None:
    c = _cache(2, 2)
    c.get("a")
    with pytest.raises(UnknownModel):
        c.get("zzz")
    assert c.stats()["device"]["entries"] == ["a"] and c.store_loads == 1


def test_prefetch_fills_cache_and_get_waits_for_it() -> None:
    gate = threading.Event()
    c = _cache(2, 2, gate=gate)
    fut = c.prefetch("a")
    assert c.prefetch("a") is fut  # deduplicated while in flight
    gate.set()
    c.get("a")  # waits for the prefetch, then hits the device tier
    assert fut.done() and c.loader.calls == ["a"]
    assert list(c.events) == [("prefetch", "a"), ("device-hit", "a")]


def test_prefetch_never_pushes_device_over_budget() -> None:
    c = _cache(1, 2)
    c.get("a", pin=True)
    c.prefetch("b").result()
    s = c.stats()
    assert s["device"]["entries"] == ["a"] and s["host"]["entries"] == ["b"]
    c.events.clear()
    c.unpin("a")
    c.get("b")
    assert list(c.events) == [("host-hit", "b"), ("device-evict", "a")]


def test_forget_drops_every_tier() -> None:
    c = _cache(1, 2)
    c.get("a"), c.get("b")  # a in host, b on device
    c.forget("a"), c.forget("b")
    s = c.stats()
    assert s["device"]["entries"] == [] and s["host"]["entries"] == []
    assert s["device"]["bytes"] == 0 and s["host"]["bytes"] == 0
    c.get("a")
    assert c.events[-1] == ("store-load", "a")
