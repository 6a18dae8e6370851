"""Helpers shared by the inference routers: model lookup, prompt checks, SSE framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from server.api.errors import describe, log_error
from server.api.state import AppState
from server.errors import InvalidRequest, NotReady, WrongTask
from server.generation import Chunk, SamplingParams
from server.logging import model_id_var

if TYPE_CHECKING:
    from server.engine import Engine

log = logging.getLogger(__name__)
T = TypeVar("T")


async def resolve_model(
    state: AppState, request: Request, model: str, tasks: tuple[str, ...], endpoint: str
) -> tuple[str | None, list[str] | None]:
    """``(scheduler key, label names)`` of a request's model; 404 unknown, 422 wrong task.

    Its info may need the registry: read off the event loop, in one hop, before the batch.
    /v1/classify answers with the labels the scheduler returns with the probabilities (a
    replacement may land while the request waits), not these.
    """
    model_id_var.set(model)
    if state.engine is None:
        raise NotReady("the base model is still loading")
    target = state.target(model)
    task, labels = await asyncio.to_thread(state.engine.describe, target)
    check_task(model, task, tasks, endpoint)
    request.state.model_label = model
    return target, labels


def check_task(model: str, task: str, tasks: tuple[str, ...], endpoint: str) -> None:
    """422 ``wrong_task`` unless ``endpoint`` serves ``task`` (shared with the Ray app)."""
    if task not in tasks:
        raise WrongTask(
            f"model {model!r} is a {task} model; {endpoint} serves {' or '.join(tasks)}"
        )


def check_prompt(
    engine: Engine,
    cap: int,
    ids: list[int],
    params: SamplingParams,
    field: str,
    asked: tuple[str, int] | None = None,
) -> None:
    """Refuse empty prompts, prompts that fill the context, a length over ``cap``
    (``DAREX_MAX_NEW_TOKENS``), and a length the client asked for (``asked``: its field
    and value) that the context cannot hold after the prompt; without one, generation
    stops at the context's end. Shared by ``darex serve`` and the Ray app."""
    if not ids:
        raise InvalidRequest(f"{field}: the prompt has no tokens", field=field)
    limit = getattr(engine.model.config, "max_position_embeddings", None)
    if limit is not None and len(ids) >= limit:
        raise InvalidRequest(
            f"{field}: {len(ids)} tokens, the model's context holds {limit}", field=field
        )
    name = asked[0] if asked else "max_tokens"
    if params.max_tokens > cap:
        raise InvalidRequest(
            f"{name}: {params.max_tokens} is more than this server's limit of {cap}", field=name
        )
    if asked and limit is not None and len(ids) + asked[1] > limit:
        raise InvalidRequest(
            f"{name}: {len(ids)} prompt tokens and {asked[1]} to generate are more than the "
            f"model's context of {limit}",
            field=name,
        )


def check_dimensions(engine: Engine, dimensions: int | None) -> None:
    """Refuse an embeddings ``dimensions`` other than the model's width, before any work:
    embeddings are not shortened."""
    width = getattr(engine.model.config, "hidden_size", None)
    if dimensions is not None and width is not None and dimensions != width:
        raise InvalidRequest(
            f"dimensions: this model's embeddings have {width} dimensions, not {dimensions} "
            "(they are not shortened)",
            field="dimensions",
        )


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


DISCONNECT_POLL_S = 0.25  # how often a request being generated checks for its client


async def unless_client_left(request: Request, aw: Awaitable[T]) -> T:
    """``await aw``, cancelling it (and so its queued or running generation) once the
    client has disconnected: a client that timed out, and the retries an OpenAI client
    then sends, must not keep the engine busy for answers nobody reads. Raises
    ``ClientDisconnect`` (status 499) then."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client left: its request is cancelled")
                raise ClientDisconnect()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# a proxy in front (nginx buffers by default) must pass each event on as it comes
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_response(
    chunks: AsyncIterator[Chunk], frame: Callable[[Chunk], list[dict]], state: AppState, model: str
) -> StreamingResponse:
    """A ``text/event-stream`` response of ``sse_stream``, with headers that keep proxies
    and caches from holding tokens back."""
    return StreamingResponse(
        sse_stream(chunks, frame, state, model), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def sse_stream(
    chunks: AsyncIterator[Chunk],
    frame: Callable[[Chunk], list[dict]],
    state: AppState,
    model: str,
) -> AsyncIterator[bytes]:
    """Frame each chunk as SSE events, then ``[DONE]``; an error mid-stream becomes an event."""
    try:
        async for c in chunks:
            if c.completion_tokens:
                state.metrics.tokens.labels(model).inc(c.completion_tokens)
            for event in frame(c):
                yield sse(event)
    except Exception as e:  # headers are out: the error travels as an event
        status, body = describe(e)
        log_error(status, body, e)
        yield sse(body)
    yield sse("[DONE]")
