"""Tiered cache of resident deltas: device (LRU by bytes) -> host -> the source (the store).

Tiers are exclusive: an entry lives in exactly one of them, so bytes are
counted once. A device miss that hits the host moves the entry up; a device
eviction moves it down to the host (free on CPU, a copy into pinned memory on
CUDA); a host eviction drops it (the store still holds it). Pinned entries
(the one the engine has applied) are never evicted; if a pinned entry does
not fit, the tier runs over budget until it is unpinned, rather than failing
a request. ``events`` records every lookup and move, in order, for tests and
logs.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from server.deltas import ResidentDelta

EVENTS_KEPT = 1024

log = logging.getLogger(__name__)


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    budget: int = 0
    entries: list[str] = field(default_factory=list)  # least recently used first


class LRUTier:
    """Entries keyed by model_id, least recently used first, bounded by bytes."""

    def __init__(self, name: str, budget: int) -> None:
        self.name = name
        self.budget = int(budget)
        self.items: OrderedDict[str, ResidentDelta] = OrderedDict()
        self.bytes = 0
        self.stats = TierStats(budget=self.budget)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self.items

    def get(self, model_id: str) -> ResidentDelta | None:
        rd = self.items.get(model_id)
        if rd is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.items.move_to_end(model_id)
        return rd

    def pop(self, model_id: str) -> ResidentDelta | None:
        rd = self.items.pop(model_id, None)
        if rd is not None:
            self.bytes -= rd.nbytes
        return rd

    def fits_after_eviction(self, need: int, pinned: set[str]) -> bool:
        unpinned = sum(rd.nbytes for mid, rd in self.items.items() if mid not in pinned)
        return self.budget - self.bytes + unpinned >= need

    def victims(self, need: int, pinned: set[str]) -> list[str]:
        """Least recently used unpinned ids to drop so that ``need`` more bytes fit."""
        out, free = [], self.budget - self.bytes
        for mid, rd in self.items.items():
            if free >= need:
                break
            if mid not in pinned:
                out.append(mid)
                free += rd.nbytes
        return out  # may still not fit: then the tier runs over budget by pinned entries

    def put(self, rd: ResidentDelta) -> None:
        self.pop(rd.model_id)
        self.items[rd.model_id] = rd
        self.bytes += rd.nbytes

    def snapshot(self) -> TierStats:
        s = self.stats
        return TierStats(s.hits, s.misses, s.evictions, self.bytes, self.budget, list(self.items))


class DeltaCache:
    """Device tier, host tier, then ``loader(model_id)`` (decode from the store on the host).

    ``get`` is called by the engine's single writer; ``prefetch`` runs the same
    path on one background thread. A lock guards the tables; loads for the same
    model_id are deduplicated (a ``get`` waits for an in-flight prefetch).
    """

    def __init__(
        self,
        loader: Callable[[str], ResidentDelta],
        device: torch.device,
        device_bytes: int,
        host_bytes: int,
    ) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.device_tier = LRUTier("device", device_bytes)
        self.host_tier = LRUTier("host", host_bytes)
        self.pinned: set[str] = set()
        # (event, model_id), the latest EVENTS_KEPT: a record for tests and debugging that
        # must not grow with every swap of a long-running server
        self.events: deque[tuple[str, str]] = deque(maxlen=EVENTS_KEPT)
        self.store_loads = 0
        self._lock = threading.RLock()
        self._inflight: dict[str, Future[ResidentDelta]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delta-prefetch")

    # ---- lookup -------------------------------------------------------------------------
    def get(self, model_id: str, *, pin: bool = False) -> ResidentDelta:
        """The delta on the device, loading it through the tiers; ``pin`` marks it in use."""
        with self._lock:
            fut = self._inflight.get(model_id)
        if fut is not None:
            fut.result()  # a prefetch is decoding it right now: wait rather than decode twice
        return self._get(model_id, record=True, pin=pin)

    def _get(self, model_id: str, *, record: bool, pin: bool = False) -> ResidentDelta:
        # a pin is taken under the same lock that finds or admits the entry: taken after,
        # a prefetch admitting another delta in between could demote this one
        with self._lock:
            rd = self.device_tier.get(model_id) if record else self.device_tier.items.get(model_id)
            if rd is not None:
                if record:
                    self.events.append(("device-hit", model_id))
                if pin:
                    self.pinned.add(model_id)
                return rd
            host = self.host_tier.get(model_id) if record else self.host_tier.items.get(model_id)
            if host is not None:
                self.host_tier.pop(model_id)
                if record:
                    self.events.append(("host-hit", model_id))
        if host is None:
            if record:
                with self._lock:
                    self.events.append(("store-load", model_id))
            host = self.loader(model_id)
            with self._lock:
                self.store_loads += 1
        with self._lock:
            if not record and not self.device_tier.fits_after_eviction(host.nbytes, self.pinned):
                self._to_host(host)  # a prefetch never pushes the device tier over budget
                return host
        rd = host.to(self.device)
        with self._lock:
            self._admit(rd)
            if pin:
                self.pinned.add(model_id)
        return rd

    def _admit(self, rd: ResidentDelta) -> None:
        """Put ``rd`` in the device tier, demoting LRU unpinned entries to the host tier."""
        for victim in self.device_tier.victims(rd.nbytes, self.pinned | {rd.model_id}):
            out = self.device_tier.pop(victim)
            assert out is not None
            self.device_tier.stats.evictions += 1
            self.events.append(("device-evict", victim))
            self._to_host(out)
        self.device_tier.put(rd)

    def _to_host(self, rd: ResidentDelta) -> None:
        if rd.nbytes > self.host_tier.budget:
            self.events.append(("host-drop", rd.model_id))
            return
        for victim in self.host_tier.victims(rd.nbytes, set()):
            self.host_tier.pop(victim)
            self.host_tier.stats.evictions += 1
            self.events.append(("host-evict", victim))
        pin = self.device.type == "cuda"
        self.host_tier.put(rd.to(torch.device("cpu"), pin=pin))

    # ---- pinning, prefetch, forget --------------------------------------------------------
    def unpin(self, model_id: str) -> None:
        with self._lock:
            self.pinned.discard(model_id)

    def prefetch(self, model_id: str) -> Future[ResidentDelta]:
        """Start loading ``model_id`` into the device tier on the background thread."""
        with self._lock:
            fut = self._inflight.get(model_id)
            if fut is not None:
                return fut
            if model_id in self.device_tier:
                done: Future[ResidentDelta] = Future()
                done.set_result(self.device_tier.items[model_id])
                return done
            self.events.append(("prefetch", model_id))
            fut = self._pool.submit(self._prefetch, model_id)
            self._inflight[model_id] = fut
            return fut

    def _prefetch(self, model_id: str) -> ResidentDelta:
        try:
            return self._get(model_id, record=False)
        except Exception:
            log.exception("prefetch failed", extra={"model_id": model_id})
            raise
        finally:
            with self._lock:
                self._inflight.pop(model_id, None)

    def forget(self, model_id: str) -> None:
        """Drop every cached copy (after a delete). The engine restores the base first when
        ``model_id`` is active, so a pin left here is stale and goes too."""
        with self._lock:
            fut = self._inflight.get(model_id)
        if fut is not None:
            fut.exception()  # wait, ignoring its outcome
        with self._lock:
            self.pinned.discard(model_id)
            self.device_tier.pop(model_id)
            self.host_tier.pop(model_id)
            self.events.append(("forget", model_id))

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "device": self.device_tier.snapshot().__dict__,
                "host": self.host_tier.snapshot().__dict__,
                "store_loads": self.store_loads,
                "pinned": sorted(self.pinned),
            }

    def close(self) -> None:
        self._pool.shutdown(wait=True)
