"""Ray Serve deployment with model multiplexing: a model_id goes where its delta already is.

Two deployments::

    client --HTTP--> DarexIngress (FastAPI, reads body["model"])
                       |  handle.options(multiplexed_model_id=model)
                       v
                     DarexReplica x N (one resident base + engine + scheduler each)

``DarexReplica.get_model`` is ``@serve.multiplexed``: it decodes the fine-tune's
delta into that replica's engine cache. Ray's router sends a request for
``model_id`` to a replica that has already loaded it when there is one, so
swapping cost stays on replicas that hold the delta; at most
``models_per_replica`` ids are pinned to one replica (the engine's own LRU
budgets still bound memory). Replicas share the registry and the blob store
(``DAREX_REGISTRY_URL=redis://...``, ``DAREX_DATA_DIR`` on shared storage);
each runs a ``RegistryWatcher`` so deletes made anywhere are honoured.

Start it with ``serve run server.ray_app:app`` (settings from ``DAREX_*``),
``serve run server.ray_app:build_app num_replicas=2``, or ``darex serve --ray``
(``serve_ray``). Uploads and deletes go through a plain ``darex serve`` replica
or ``darex add`` / ``darex rm`` against the same registry; this app serves inference
(``DAREX_API_KEY``, when set, guards its ``/v1`` routes).
"""

import asyncio
import contextlib
import logging
import os
import time
import uuid
from typing import Any

try:
    from ray import serve
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "server.ray_app needs Ray Serve: pip install 'darex-serve[ray]' "
        "(or pip install 'ray[serve]==2.60.*')"
    ) from e
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from server.api.app import MAX_JSON_BYTES, BodyLimitMiddleware, bind_store
from server.api.auth import check_token
from server.api.errors import (
    describe,
    describe_validation,
    error_response,
    log_error,
    unparsable_body,
)
from server.api.routes.common import check_dimensions, check_prompt, check_task
from server.api.routes.openai import (
    model_card,
    model_list,
    prompt_ids,
    prompt_text,
    render_chat,
)
from server.api.schemas import (
    COMPLETION_MAX_TOKENS,
    ChatRequest,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
)
from server.errors import InvalidRequest, NotReady, Unauthorized
from server.replicas import replica_watcher
from server.settings import Settings

log = logging.getLogger(__name__)

KINDS = ("completions", "chat", "classify", "embeddings")


def _validate(schema: type[BaseModel], body: dict[str, Any]) -> Any:
    """``body`` as ``schema``, or the 422 ``darex serve`` gives for it."""
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        message, field = describe_validation(e.errors())
        raise InvalidRequest(message, field=field) from None


class Runtime:
    """One replica's serving state: base, store, engine, scheduler and registry watcher."""

    def __init__(self, settings: Settings) -> None:
        from server.engine import Engine
        from server.scheduler import Scheduler
        from storage.bases import resolve_base
        from storage.registry import open_registry
        from storage.store import DeltaStore

        self.settings = settings
        self.started = time.time()
        base = resolve_base(settings.base, settings.data_dir)
        self.base_name = base.name
        self.registry = open_registry(settings.registry)
        self.store = DeltaStore(settings.data_dir, self.registry)
        bind_store(self.store)
        self.engine = Engine.load(base, self.store, settings)
        self.scheduler = Scheduler(
            self.engine,
            max_batch_size=settings.max_batch_size,
            max_batches_per_turn=settings.max_batches_per_turn,
            max_new_tokens=settings.max_new_tokens,
            max_queue=settings.max_queue,
        )
        self.watcher = replica_watcher(self)

    def is_base(self, model_id: str | None) -> bool:
        return model_id in (None, "", self.base_name)

    async def warm(self, model_id: str) -> None:
        """Check the id exists and decode its delta into the engine cache."""
        if self.is_base(model_id):
            return
        await self.watcher.ensure_ready()
        eng = self.engine
        await self.scheduler.call(lambda: (eng.task_of(model_id), eng.prefetch(model_id)))

    async def infer(self, kind: str, model_id: str | None, body: dict[str, Any]) -> dict[str, Any]:
        """One OpenAI-shaped answer for ``kind`` in ``KINDS``."""
        if not self.is_base(model_id):
            await self.watcher.ensure_ready()
        model = model_id or self.base_name
        target = None if self.is_base(model_id) else model_id
        created = int(time.time())
        if kind in ("classify", "embeddings"):
            req = _validate(ClassifyRequest if kind == "classify" else EmbeddingRequest, body)
            # the task check of ``resolve_model``, in one hop (labels come with the probabilities)
            task, _ = await asyncio.to_thread(self.engine.describe, target)
            want = "sequence-classification" if kind == "classify" else "feature-extraction"
            check_task(model, task, (want,), f"/v1/{kind}")
            if kind == "embeddings":
                check_dimensions(self.engine, req.dimensions)
                vecs = await self.scheduler.embed(target, req.texts)
                n = sum(len(self.engine.tokenizer(t)["input_ids"]) for t in req.texts)
                return EmbeddingResponse.build(model, vecs, n, req).model_dump()
            probs, labels = await self.scheduler.classify(target, req.texts)
            return ClassifyResponse.from_probs(model, probs, labels).model_dump()
        # the schemas, limits and refusals of ``darex serve``'s routes (one prompt here)
        req = _validate(ChatRequest if kind == "chat" else CompletionRequest, body)
        tok = self.engine.tokenizer
        if kind == "chat":
            field, params = "messages", req.sampling(self.settings.max_new_tokens)
            ids = render_chat(tok, req.messages)  # the same tokens as the app's
        else:
            if len(req.prompts) != 1:
                raise InvalidRequest("prompt: the Ray app serves one prompt a request", "prompt")
            default = min(COMPLETION_MAX_TOKENS, self.settings.max_new_tokens)
            field, params = "prompt", req.sampling(default)
            ids = prompt_ids(self.engine, req.prompts)[0]
        cap = self.settings.max_new_tokens
        check_prompt(self.engine, cap, ids, params, field, req.asked_max())
        chunk = await self.scheduler.complete(target, ids, params)
        usage = {
            "prompt_tokens": chunk.prompt_tokens,
            "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
        }
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": chunk.text},
                "finish_reason": chunk.finish_reason,
            }
            obj, prefix = "chat.completion", "chatcmpl"
        else:
            text = (prompt_text(self.engine, req.prompts[0]) if req.echo else "") + chunk.text
            choice = {"index": 0, "text": text, "finish_reason": chunk.finish_reason}
            obj, prefix = "text_completion", "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }


@serve.deployment(name="DarexReplica")
class DarexReplica:
    """One resident base; ``get_model`` is multiplexed so Ray routes by model_id."""

    def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        self.rt = Runtime(Settings(**(overrides or {})))
        self._watching = False
        self.replica = f"pid-{os.getpid()}"
        with contextlib.suppress(Exception):  # outside a running replica
            self.replica = serve.get_replica_context().replica_id.unique_id

    def _watch(self) -> None:
        if not self._watching:
            self._watching = True
            self.rt.watcher.start()

    @serve.multiplexed(max_num_models_per_replica=Settings().ray_models)
    async def get_model(self, model_id: str) -> str:
        await self.rt.warm(model_id)
        return model_id

    async def infer(self, kind: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
        """(status, body, replica id) for one request routed here by its model_id."""
        self._watch()
        model_id = serve.get_multiplexed_model_id() or body.get("model")
        try:
            if not self.rt.is_base(model_id):
                await self.get_model(model_id)
            return 200, await self.rt.infer(kind, model_id, body), self.replica
        except Exception as e:
            return (*_failure(e), self.replica)

    async def ready(self) -> tuple[bool, str]:
        self._watch()
        if self.rt.engine.broken is not None:
            return False, self.rt.engine.broken
        try:
            await self.rt.watcher.ensure_ready()
        except NotReady as e:
            return False, str(e)
        return True, "ready"

    async def models(self) -> dict[str, Any]:
        """The resident base, then every registered fine-tune of that base, as
        ``darex serve``'s ``/v1/models`` lists them."""
        rt = self.rt
        out = await asyncio.to_thread(model_list, rt.base_name, rt.started, rt.store)
        return out.model_dump()

    async def model(self, model_id: str) -> tuple[int, dict[str, Any]]:
        """(status, body) of ``GET /v1/models/{model_id}``: its card, or a 404."""
        rt = self.rt
        try:
            card = await asyncio.to_thread(model_card, model_id, rt.base_name, rt.started, rt.store)
            return 200, card.model_dump()
        except Exception as e:
            return _failure(e)

    def check_health(self) -> None:
        """Ray restarts a replica whose scheduler thread died, or whose weights are not
        trusted after a failed swap kernel (``Engine.broken``)."""
        assert self.rt.scheduler._thread.is_alive(), "scheduler worker is dead"
        assert self.rt.engine.broken is None, self.rt.engine.broken


def _failure(e: Exception) -> tuple[int, dict[str, Any]]:
    """(status, error body) of a failed call on a replica, logged as ``darex serve`` logs it."""
    status, err = describe(e)
    log_error(status, err, e)
    return status, err


api = FastAPI(title="darex-serve (Ray)")
api.add_middleware(BodyLimitMiddleware, max_bytes=MAX_JSON_BYTES)  # 413, as in darex serve

_ROUTES = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/classify": "classify",
    "/v1/embeddings": "embeddings",
}


@serve.deployment(name="DarexIngress")
@serve.ingress(api)
class DarexIngress:
    """HTTP front: reads ``model`` from the JSON body and routes by it."""

    def __init__(self, replica: Any, api_key: str | None = None) -> None:
        self.replica = replica
        self.api_key = api_key  # DAREX_API_KEY: the bearer every /v1 request must carry

    def _refused(self, request: Request) -> JSONResponse | None:
        """401 in the OpenAI error shape when a key is set and the request lacks it."""
        if self.api_key is None:
            return None
        try:
            check_token(request, self.api_key, "/v1")
        except Unauthorized as e:
            status, err = describe(e)
            return JSONResponse(err, status_code=status, headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _route(self, kind: str, request: Request) -> JSONResponse:
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            body = await request.json()
        except (ValueError, RecursionError) as e:  # as ``darex serve``: a 422 saying why
            why = unparsable_body(e) or f"the body cannot be parsed: {type(e).__name__}"
            return error_response(InvalidRequest(why))
        if not isinstance(body, dict):
            return error_response(InvalidRequest("the body must be a JSON object"))
        if body.get("stream"):
            why = "stream: streaming is served by `darex serve`, not the Ray app"
            return error_response(InvalidRequest(why, "stream"))
        model = str(body.get("model") or "")
        handle = self.replica.options(multiplexed_model_id=model) if model else self.replica
        status, out, replica = await handle.infer.remote(kind, body)
        return JSONResponse(out, status_code=status, headers={"x-darex-replica": replica})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> JSONResponse:
        return await self._route("completions", request)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> JSONResponse:
        return await self._route("chat", request)

    @api.post("/v1/classify")
    async def classify(self, request: Request) -> JSONResponse:
        return await self._route("classify", request)

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        return await self._route("embeddings", request)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        if (refused := self._refused(request)) is not None:
            return refused
        return await self.replica.models.remote()

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> Any:
        if (refused := self._refused(request)) is not None:
            return refused
        status, body = await self.replica.model.remote(model_id)
        return JSONResponse(body, status_code=status)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        ok, why = await self.replica.ready.remote()
        return JSONResponse({"ready": ok, "detail": why}, status_code=200 if ok else 503)


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Application builder for ``serve run server.ray_app:build_app key=value ...``.

    Keys: ``num_replicas`` (default 1), ``num_cpus`` / ``num_gpus`` per replica
    (default 1 / 0), ``models_per_replica`` is read from ``DAREX_RAY_MODELS`` at
    import; any other key is a ``Settings`` field (e.g. ``base``, ``registry_url``).
    """
    args = dict(args or {})
    num_replicas = int(args.pop("num_replicas", 1))
    actor = {"num_cpus": float(args.pop("num_cpus", 1)), "num_gpus": float(args.pop("num_gpus", 0))}
    key = Settings(**args).api_key  # the replicas' settings: arguments over DAREX_* variables
    replica = DarexReplica.options(num_replicas=num_replicas, ray_actor_options=actor).bind(args)
    return DarexIngress.options(ray_actor_options={"num_cpus": 0}).bind(
        replica, key.get_secret_value() if key is not None else None
    )


app = build_app()


def serve_ray(
    settings: Settings,
    *,
    num_replicas: int = 1,
    address: str | None = None,
    num_gpus: float = 0.0,
    blocking: bool = True,
) -> Any:
    """``darex serve --ray``: connect to (or start) Ray, serve on settings.host:settings.port."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    overrides = {
        k: v.get_secret_value() if hasattr(v, "get_secret_value") else v
        for k, v in settings.model_dump(exclude_defaults=True).items()
    }
    overrides = {
        k: str(v) if not isinstance(v, int | float | bool | str) else v
        for k, v in overrides.items()
    }
    target = build_app({**overrides, "num_replicas": num_replicas, "num_gpus": num_gpus})
    return serve.run(target, blocking=blocking, name="darex")
