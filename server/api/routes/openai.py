"""OpenAI-compatible inference: /v1/completions, /v1/chat/completions, /v1/models, /v1/embeddings.

``model`` is a model_id from the store, or the base's own id for the base.
Chat prompts use the tokenizer's chat template when it has one; otherwise the
fallback ``"<role>: <content>\\n"`` per message followed by ``"assistant:"``.
A template that refuses the conversation (``raise_exception``, e.g. roles that
must alternate) is a 422 on ``messages``. Tokenizing runs in a worker thread,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.deps import SchedulerDep, StateDep, require_api_key
from server.api.routes.common import check_dimensions, check_prompt, resolve_model, sse_stream
from server.api.schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    Usage,
)
from server.errors import InvalidRequest
from server.generation import Chunk, encode_prompt
from storage.errors import StorageError
from storage.store import DeltaStore

router = APIRouter(prefix="/v1", tags=["inference"], dependencies=[Depends(require_api_key)])
GENERATE = ("causal-lm",)


def render_chat(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Token ids of a conversation, ending where the assistant's answer starts."""
    msgs = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages
    ]
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError  # chat templates are jinja2; transformers needs it too

        try:
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:  # the template's raise_exception, e.g. roles must alternate
            raise InvalidRequest(
                f"messages: the chat template refused them: {e}", field="messages"
            ) from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
    return encode_prompt(tokenizer, text)


def _usage(chunks: list[Chunk]) -> Usage:
    p = sum(c.prompt_tokens for c in chunks)
    n = sum(c.completion_tokens for c in chunks)
    return Usage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n)


async def _all_or_none(coros: list) -> list:
    """Every result, or the first error with the others cancelled: ``gather`` alone would
    leave them generating up to max_tokens for a response that is already an error."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


@router.get("/models", response_model=ModelList)
async def list_models(state: StateDep) -> ModelList:
    return await asyncio.to_thread(model_list, state.base_id, state.started, state.store)


def model_list(base_id: str, started: float, store: DeltaStore | None) -> ModelList:
    """The base (``created``: when the server started), then the fine-tunes of it
    (``created``: when each was stored; 0 when its manifest cannot be read, where using
    the model names the problem). Shared by ``darex serve`` and the Ray app."""
    cards = [ModelCard(id=base_id, created=int(started), owned_by="base")]
    for model_id, key in sorted((store.models() if store is not None else {}).items()):
        try:
            created = int(store.created_of(key))  # type: ignore[union-attr]
        except (StorageError, KeyError, OSError):
            created = 0
        cards.append(ModelCard(id=model_id, created=created))
    return ModelList(data=cards)


@router.post("/completions", response_model=CompletionResponse)
async def completions(
    body: CompletionRequest, request: Request, state: StateDep, sched: SchedulerDep
):
    target, _ = await resolve_model(state, request, body.model, GENERATE, "/v1/completions")
    params = body.sampling(16)
    tok = state.engine.tokenizer
    prompts = await asyncio.to_thread(lambda: [encode_prompt(tok, p) for p in body.prompts])
    for ids in prompts:
        check_prompt(
            state.engine, state.settings.max_new_tokens, ids, params, "prompt", body.asked_max()
        )
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        if len(prompts) > 1:
            raise InvalidRequest("prompt: streaming takes one prompt", field="prompt")
        echo = body.prompts[0] if body.echo else ""

        def frame(c: Chunk) -> list[dict]:
            nonlocal echo
            text, echo = echo + c.text, ""
            out = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {"index": 0, "text": text, "finish_reason": c.finish_reason, "logprobs": None}
                ],
            }
            if c.finish_reason is not None and body.include_usage:
                out["usage"] = _usage([c]).model_dump()
            return [out]

        chunks = sched.stream(target, prompts[0], params)
        return StreamingResponse(
            sse_stream(chunks, frame, state, body.model), media_type="text/event-stream"
        )

    done = await _all_or_none([sched.complete(target, ids, params) for ids in prompts])
    state.metrics.tokens.labels(body.model).inc(sum(c.completion_tokens for c in done))
    choices = [
        CompletionChoice(
            index=i,
            text=(body.prompts[i] if body.echo else "") + c.text,
            finish_reason=c.finish_reason,
        )
        for i, c in enumerate(done)
    ]
    return CompletionResponse(
        id=rid, created=created, model=body.model, choices=choices, usage=_usage(done)
    )


@router.post("/chat/completions", response_model=ChatResponse)
async def chat_completions(
    body: ChatRequest, request: Request, state: StateDep, sched: SchedulerDep
):
    target, _ = await resolve_model(state, request, body.model, GENERATE, "/v1/chat/completions")
    params = body.sampling(state.settings.max_new_tokens)
    ids = await asyncio.to_thread(render_chat, state.engine.tokenizer, body.messages)
    check_prompt(
        state.engine, state.settings.max_new_tokens, ids, params, "messages", body.asked_max()
    )
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        first = True

        def frame(c: Chunk) -> list[dict]:
            nonlocal first
            base = {"id": rid, "object": "chat.completion.chunk", "created": created}
            base["model"] = body.model
            events = []
            if first:
                first = False
                delta = {"role": "assistant", "content": ""}
                events.append(
                    {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                )
            if c.text:
                delta = {"content": c.text}
                events.append(
                    {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                )
            if c.finish_reason is not None:
                end = {
                    **base,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": c.finish_reason}],
                }
                if body.include_usage:
                    end["usage"] = _usage([c]).model_dump()
                events.append(end)
            return events

        chunks = sched.stream(target, ids, params)
        return StreamingResponse(
            sse_stream(chunks, frame, state, body.model), media_type="text/event-stream"
        )

    c = await sched.complete(target, ids, params)
    state.metrics.tokens.labels(body.model).inc(c.completion_tokens)
    choice = ChatChoice(
        index=0, message=ChatChoiceMessage(content=c.text), finish_reason=c.finish_reason
    )
    return ChatResponse(
        id=rid, created=created, model=body.model, choices=[choice], usage=_usage([c])
    )


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(
    body: EmbeddingRequest, request: Request, state: StateDep, sched: SchedulerDep
):
    tasks = ("feature-extraction",)
    target, _ = await resolve_model(state, request, body.model, tasks, "/v1/embeddings")
    check_dimensions(state.engine, body.dimensions)
    vecs = await sched.embed(target, body.texts)
    tok = state.engine.tokenizer
    n = await asyncio.to_thread(
        lambda: sum(len(tok(t, add_special_tokens=True)["input_ids"]) for t in body.texts)
    )
    return EmbeddingResponse.build(body.model, vecs, n, body)
