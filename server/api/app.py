"""The app factory. Heavy state (base model, store, scheduler) loads in the lifespan.

``create_app(settings, engine=..., store=..., base=...)`` takes ready parts
(tests, benches); whatever is missing is built from ``settings`` when the app
starts: the base by ``storage.bases.resolve_base``, the store on the
registry URL, the engine by ``Engine.load``, and one scheduler over it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from server.api.errors import install_error_handlers
from server.api.metrics import Metrics, RequestContextMiddleware
from server.api.routes import admin, classify, health, openai
from server.api.state import AppState
from server.replicas import with_replica_sync
from server.scheduler import Scheduler
from server.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _open_parts(st: AppState) -> list[Any]:
    """Build what was not given; returns the parts this app owns (closed at shutdown)."""
    owned: list[Any] = []
    s = st.settings
    if st.store is None:
        from storage.registry import open_registry
        from storage.store import DeltaStore

        st.store = DeltaStore(s.data_dir, open_registry(s.registry))
        owned.append(st.store)
    if st.base is None:
        from storage.bases import resolve_base

        st.base = resolve_base(s.base, s.data_dir)
    if st.engine is None:
        from server.engine import Engine

        log.info("loading base %s", st.base.name)
        st.engine = Engine.load(st.base, st.store, s)
        owned.append(st.engine)
    return owned


def create_app(
    settings: Settings | None = None,
    engine: Any = None,
    *,
    store: Any = None,
    base: Any = None,
    scheduler: Scheduler | None = None,
) -> FastAPI:
    """The darex-serve HTTP app; parts left None are built at startup from ``settings``."""
    settings = settings or get_settings()
    holder: dict[str, AppState] = {}
    metrics = Metrics(lambda: holder.get("state"))
    state = AppState(settings=settings, metrics=metrics, engine=engine, store=store, base=base)
    holder["state"] = state

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.settings.check_serving()  # no default admin token outside development
        owned = _open_parts(state)
        own_sched = scheduler is None
        state.scheduler = scheduler or Scheduler(
            state.engine,
            max_batch_size=settings.max_batch_size,
            max_batches_per_turn=settings.max_batches_per_turn,
            max_new_tokens=settings.max_new_tokens,
            on_swap=metrics.on_swap,
        )
        from server.api.jobs import JobHeartbeat

        state.heartbeat = JobHeartbeat(
            state.store.registry, settings.data_dir / "uploads", settings.job_stale_s
        ).start()
        log.info("serving", extra={"base": state.base_id, "device": str(state.engine.device)})
        try:
            yield
        finally:
            if own_sched:
                state.scheduler.close()
            state.scheduler = None
            state.jobs.shutdown(wait=True)
            state.heartbeat.close()  # after the last job ended: it beats until then
            for part in reversed(owned):
                part.close()

    app = FastAPI(
        title="darex-serve",
        version="0.1.0",
        summary="Many fine-tunes of one resident base, served as DAREx-pruned sparse deltas.",
        lifespan=lifespan,
    )
    app.state.darex = state
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    for r in (openai.router, classify.router, admin.router, health.router):
        app.include_router(r)
    # Other replicas on the same registry: pick up their uploads and deletes.
    return with_replica_sync(app)
