"""The app factory. Heavy state (base model, store, scheduler) loads in the lifespan.

``create_app(settings, engine=..., store=..., base=...)`` takes ready parts
(tests, benches); whatever is missing is built from ``settings`` when the app
starts: the base by ``storage.bases.resolve_base``, the store on the
registry URL, the engine by ``Engine.load``, and one scheduler over it.

Request bodies are capped at ``MAX_JSON_BYTES`` (413) before any route reads
them, except uploads, which stream to disk under ``settings.max_upload_bytes``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from server.api.errors import describe, install_error_handlers, log_error
from server.api.metrics import Metrics, RequestContextMiddleware
from server.api.routes import admin, classify, health, openai
from server.api.state import AppState
from server.errors import PayloadTooLarge
from server.replicas import with_replica_sync
from server.scheduler import Scheduler
from server.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Largest JSON request body (413 above it): about a million tokens of English text.
MAX_JSON_BYTES = 4 << 20
UPLOADS = {("POST", "/admin/models")}  # streamed by server.api.upload, under max_upload_bytes


class BodyLimitMiddleware:
    """Pure ASGI: a request body over ``max_bytes`` is a 413 before the app sees it.

    ``Content-Length`` over the limit is refused at once; otherwise the body is read
    here, counted as it arrives (chunked bodies too), and replayed to the app, which
    reads JSON bodies whole anyway. Requests in ``UPLOADS`` pass through untouched.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"].rstrip("/")) in UPLOADS:
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, f"request body of {int(length)} bytes")
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # http.disconnect: nobody to answer
                scope.setdefault("state", {})["client_left"] = True  # counted as 499, not 500
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, "request body")
                return
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()  # e.g. http.disconnect while a response streams
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, what: str) -> None:
        exc = PayloadTooLarge(f"{what} exceeds the limit of {self.max_bytes} bytes")
        status, body = describe(exc)
        log_error(status, body, None)
        await JSONResponse(body, status_code=status)(scope, receive, send)


def bind_store(store: Any) -> None:
    """At startup: bind an unbound store to the server's registry (the deployment's), or
    say when the store belongs to another one; the server then serves none of the store's
    models, and uploads are refused (``RegistryMismatch``)."""
    from storage.errors import StorageError

    try:
        problem = store.bind_registry()
    except StorageError as e:  # the registry is out (/readyz says so), an unreadable record
        log.warning("store not bound to the registry: %s", e)
        return
    if problem:
        log.error("registry mismatch: %s", problem)


def _open_parts(st: AppState) -> list[Any]:
    """Build what was not given; returns the parts this app owns (closed at shutdown)."""
    owned: list[Any] = []
    s = st.settings
    if st.store is None:
        from storage.registry import open_registry
        from storage.store import DeltaStore

        st.store = DeltaStore(s.data_dir, open_registry(s.registry))
        owned.append(st.store)
        bind_store(st.store)
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
            max_queue=settings.max_queue,
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
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_JSON_BYTES)  # inside the request id
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    for r in (openai.router, classify.router, admin.router, health.router):
        app.include_router(r)
    # Other replicas on the same registry: pick up their uploads and deletes.
    return with_replica_sync(app)
