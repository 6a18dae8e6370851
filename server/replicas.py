"""Keep one replica in step with a registry that several replicas share.

Replicas share the Redis registry and the blob store. A new upload needs
nothing here: an id this replica has never seen is looked up in the registry on
first use. What needs care is what a replica has *cached*: the decoded delta,
the head and the task of a model that another replica deleted or replaced.

Every ``ttl_s`` seconds the watcher reads ``registry.version()`` (one Redis
GET). When the counter moved, or the registry came back after an outage, it
re-reads the snapshot ``model_id -> manifest key`` and retires every model
whose key vanished or changed::

    stale = {m : m in old and old[m] != new.get(m)}
    for m in stale: await retire(m)   # queued requests finish, engine forgets m

so a delete or a replace made through any replica is seen here within
``ttl_s`` (Redis also publishes each new version; the watcher wakes up on it).

While the registry cannot be reached the replica cannot know whether a cached
model was deleted meanwhile, so on the first failed check it drops every
cached fine-tune (``drop``, e.g. ``engine.forget`` on the scheduler's worker):
requests for fine-tunes then need the registry and get ``RegistryUnavailable``
(HTTP 503) instead of a possibly stale answer, while the base keeps serving.
``ready`` is False and ``require_ready()`` raises ``NotReady`` meanwhile. The
loop keeps polling; once the registry answers again, models load on demand
from the blob store and service resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from server.errors import NotReady
from storage.errors import RegistryCorrupt, RegistryUnavailable
from storage.registry import Registry

log = logging.getLogger(__name__)

Retire = Callable[[str], Awaitable[None]]  # retire(model_id): drain, then forget


class RegistryWatcher:
    """Poll the registry's change counter; retire models deleted or replaced elsewhere."""

    def __init__(
        self,
        registry: Registry,
        retire: Retire,
        *,
        drop: Retire | None = None,
        ttl_s: float = 2.0,
    ) -> None:
        assert ttl_s > 0, f"ttl_s must be positive, got {ttl_s}"
        self.registry = registry
        self.retire = retire
        self.drop = drop
        self.ttl_s = ttl_s
        self.version: int | None = None
        self.snapshot: dict[str, str] = {}
        self.error: str | None = None
        self.unreadable = False  # the registry answers but holds data this version cannot read
        self.down_since: float | None = None
        self.checked_at: float | None = None
        self._resync = True
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()

    # ---- state ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True once the registry answered and as long as it keeps answering."""
        return self.error is None and self.checked_at is not None

    def require_ready(self) -> None:
        """Raise ``NotReady`` with the reason while the registry cannot be reached."""
        if self.ready:
            return
        if self.error is None:
            raise NotReady("the model registry has not been reached yet")
        since = time.time() - (self.down_since or time.time())
        state = "unreadable" if self.unreadable else "unreachable"
        raise NotReady(
            f"the model registry is {state} ({self.error}) for {since:.0f}s; "
            f"retrying every {self.ttl_s:g}s"
        )

    async def ensure_ready(self) -> None:
        """``require_ready``, checking the registry first if it was never checked."""
        if self.checked_at is None and self.error is None:
            await self.poll_once()
        self.require_ready()

    # ---- one check -----------------------------------------------------------------------
    async def poll_once(self) -> list[str]:
        """One check of the registry; returns the model ids retired by it."""
        try:
            version = await asyncio.to_thread(self.registry.version)
            if version == self.version and not self._resync:
                self._mark_up()
                return []
            models = await asyncio.to_thread(self.registry.list_models)
        except RegistryUnavailable as e:
            first_failure = self.error is None
            self._mark_down(str(e), unreadable=isinstance(e, RegistryCorrupt))
            if first_failure and self.drop is not None:
                await self._each(self.drop, sorted(self.snapshot), "drop")
            return []
        old = self.snapshot
        stale = sorted(m for m, key in old.items() if models.get(m) != key)
        first = self.version is None
        self.version, self.snapshot, self._resync = version, dict(models), False
        self._mark_up()
        if first:
            return []
        for model_id in stale:
            log.info("model changed in the registry; dropping it", extra={"model_id": model_id})
        # a deleted model is retired (new requests refused, queued ones drained); a
        # replaced one only loses its cached copy between batches, and its requests,
        # queued or new, run on the new version (refusing them would 404 a model that
        # is registered)
        replaced = [m for m in stale if m in models and self.drop is not None]
        deleted = [m for m in stale if m not in replaced]
        failed = await self._each(self.retire, deleted, "retire")
        if replaced:
            failed |= await self._each(self.drop, replaced, "drop")  # type: ignore[arg-type]
        if failed:  # still stale here: the next check tries again, version moved or not
            self.snapshot.update({m: old[m] for m in failed})
            self._resync = True
        return [m for m in stale if m not in failed]

    @staticmethod
    async def _each(fn: Retire, model_ids: list[str], verb: str) -> set[str]:
        """``fn`` on each id at once; the ids it failed for (logged)."""
        results = await asyncio.gather(*(fn(m) for m in model_ids), return_exceptions=True)
        failed = set()
        for model_id, res in zip(model_ids, results, strict=True):
            if isinstance(res, BaseException):
                failed.add(model_id)
                log.error(
                    "could not %s model: %s", verb, res, extra={"model_id": model_id}, exc_info=res
                )
        return failed

    def _mark_up(self) -> None:
        if self.error is not None:
            log.warning("model registry reachable again after %.1fs", self._down_for())
        self.error, self.down_since, self.checked_at = None, None, time.time()

    def _mark_down(self, error: str, *, unreadable: bool = False) -> None:
        if self.error is None:
            state = "unreadable" if unreadable else "unreachable"
            log.error("model registry %s: %s", state, error)
            self.down_since = time.time()
        self.error, self.unreadable, self._resync = error, unreadable, True

    def _down_for(self) -> float:
        return time.time() - self.down_since if self.down_since else 0.0

    # ---- loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Poll every ``ttl_s`` seconds (sooner when Redis announces a change) until cancelled."""
        self._wake = asyncio.Event()
        self._start_listener(asyncio.get_running_loop())
        while True:
            try:
                await self.poll_once()
            except Exception:  # never let the watcher die: the next poll tries again
                log.exception("registry poll failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.ttl_s)

    def start(self) -> asyncio.Task[None]:
        """Start ``run`` on the running loop (call from the app's lifespan)."""
        assert self._task is None, "watcher already started"
        self._task = asyncio.get_running_loop().create_task(self.run(), name="registry-watcher")
        return self._task

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _start_listener(self, loop: asyncio.AbstractEventLoop) -> None:
        """Redis only: wake the loop as soon as a change is published on the channel."""
        client = getattr(self.registry, "_r", None)
        channel = getattr(self.registry, "channel", None)
        if client is None or channel is None:
            return

        def wake() -> None:
            if self._wake is not None:
                self._wake.set()

        def listen() -> None:
            while not self._stopping.is_set():
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    pubsub.subscribe(channel)
                    while not self._stopping.is_set():
                        if pubsub.get_message(timeout=1.0) is not None:
                            loop.call_soon_threadsafe(wake)
                except Exception:  # Redis down: the polling loop reports it; retry later
                    self._stopping.wait(self.ttl_s)
                finally:
                    with contextlib.suppress(Exception):
                        pubsub.close()

        self._listener = threading.Thread(target=listen, name="registry-listener", daemon=True)
        self._listener.start()


def replica_watcher(state: Any) -> RegistryWatcher:
    """The watcher of one app (``server.api.state.AppState``): retire and drop go through the
    scheduler, the engine's single writer."""
    sched, engine = state.scheduler, state.engine

    async def drop(model_id: str) -> None:
        await sched.call(lambda: engine.forget(model_id))

    return RegistryWatcher(
        state.store.registry, sched.retire, drop=drop, ttl_s=state.settings.registry_ttl_s
    )


def with_replica_sync(app: Any) -> Any:
    """Run a ``RegistryWatcher`` for the lifetime of a ``create_app`` app; returns the app.

    Wraps the app's lifespan: once the inner startup has opened the store and
    the scheduler, the watcher starts on ``state.store.registry`` and retires
    through ``state.scheduler.retire``; it stops before the inner shutdown. The
    watcher is kept as ``app.state.darex.watcher``. A no-op when the app already
    runs one or its store has no registry.
    """
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as value:
            state = a.state.darex
            registry = getattr(state.store, "registry", None)
            if getattr(state, "watcher", None) is not None or registry is None:
                yield value
                return
            watcher = replica_watcher(state)
            state.watcher = watcher
            await watcher.poll_once()
            watcher.start()
            try:
                yield value
            finally:
                await watcher.stop()
                state.watcher = None

    app.router.lifespan_context = lifespan
    return app
