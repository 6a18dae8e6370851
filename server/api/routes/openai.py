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
from typing import Any

from fastapi import APIRouter, Depends, Request

from server.api.deps import SchedulerDep, StateDep, require_api_key
from server.api.routes.common import (
    check_dimensions,
    check_prompt,
    resolve_model,
    sse_response,
    unless_client_left,
)
from server.api.schemas import (
    COMPLETION_MAX_TOKENS,
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
from storage.errors import StorageError, UnknownModel
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


def prompt_ids(engine: Any, prompts: list[str | list[int]]) -> list[list[int]]:
    """Token ids of each completions prompt: a text is encoded, token ids are checked
    against the vocabulary (422 on ``prompt`` naming the first id outside it). Shared by
    ``darex serve`` and the Ray app."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(encode_prompt(engine.tokenizer, p))
            continue
        vocab = engine.model.get_input_embeddings().num_embeddings
        if bad := [t for t in p if not 0 <= t < vocab]:
            raise InvalidRequest(
                f"prompt: token id {bad[0]} is outside this model's vocabulary (0 to {vocab - 1})",
                field="prompt",
            )
        out.append(list(p))
    return out


def prompt_text(engine: Any, prompt: str | list[int]) -> str:
    """A prompt as ``echo`` puts it before the completion (token ids decoded)."""
    return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)


def _usage(chunks: list[Chunk]) -> Usage:
    p = sum(c.prompt_tokens for c in chunks)
    n = sum(c.completion_tokens for c in chunks)
    return Usage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n)


def _chunk_base(rid: str, obj: str, created: int, body: CompletionRequest | ChatRequest) -> dict:
    """The fields every streamed chunk carries; ``usage`` null until the last one when the
    client asked for it (``stream_options.include_usage``), as OpenAI sends it."""
    base = {"id": rid, "object": obj, "created": created, "model": body.model}
    if body.include_usage:
        base["usage"] = None
    return base


def _usage_chunk(base: dict, c: Chunk, body: CompletionRequest | ChatRequest) -> list[dict]:
    """After the finishing chunk, when asked for: one more with no choices and the usage."""
    if c.finish_reason is None or not body.include_usage:
        return []
    return [{**base, "choices": [], "usage": _usage([c]).model_dump()}]


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


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, state: StateDep) -> ModelCard:
    """One card of ``/v1/models``; 404 ``model_not_found`` for an id it does not list.
    (``:path``: a base served from a local folder has slashes in its id.)"""
    return await asyncio.to_thread(model_card, model_id, state.base_id, state.started, state.store)


def _card(model_id: str, key: str, store: DeltaStore) -> ModelCard:
    """A fine-tune's card; ``created`` 0 when its manifest cannot be read (using the model
    names the problem)."""
    try:
        created = int(store.created_of(key))
    except (StorageError, KeyError, OSError):
        created = 0
    return ModelCard(id=model_id, created=created)


def model_list(base_id: str, started: float, store: DeltaStore | None) -> ModelList:
    """The base (``created``: when the server started), then the fine-tunes of it
    (``created``: when each was stored). Shared by ``darex serve`` and the Ray app."""
    cards = [ModelCard(id=base_id, created=int(started), owned_by="base")]
    if store is not None:
        cards += [_card(m, key, store) for m, key in sorted(store.models().items())]
    return ModelList(data=cards)


def model_card(model_id: str, base_id: str, started: float, store: DeltaStore | None) -> ModelCard:
    """The card ``model_list`` lists for ``model_id``, or ``UnknownModel``."""
    if model_id == base_id:
        return ModelCard(id=base_id, created=int(started), owned_by="base")
    key = store.models().get(model_id) if store is not None else None
    if key is None:
        raise UnknownModel(f"model {model_id!r} is not served here (GET /v1/models lists them)")
    return _card(model_id, key, store)  # type: ignore[arg-type]


@router.post("/completions", response_model=CompletionResponse)
async def completions(
    body: CompletionRequest, request: Request, state: StateDep, sched: SchedulerDep
):
    target, _ = await resolve_model(state, request, body.model, GENERATE, "/v1/completions")
    params = body.sampling(min(COMPLETION_MAX_TOKENS, state.settings.max_new_tokens))
    prompts = await asyncio.to_thread(prompt_ids, state.engine, body.prompts)
    for ids in prompts:
        check_prompt(
            state.engine, state.settings.max_new_tokens, ids, params, "prompt", body.asked_max()
        )
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        if len(prompts) > 1:
            raise InvalidRequest("prompt: streaming takes one prompt", field="prompt")
        echo = prompt_text(state.engine, body.prompts[0]) if body.echo else ""

        def frame(c: Chunk) -> list[dict]:
            nonlocal echo
            text, echo = echo + c.text, ""
            base = _chunk_base(rid, "text_completion", created, body)
            choice = {"index": 0, "text": text, "finish_reason": c.finish_reason, "logprobs": None}
            return [{**base, "choices": [choice]}, *_usage_chunk(base, c, body)]

        return sse_response(sched.stream(target, prompts[0], params), frame, state, body.model)

    done = await unless_client_left(
        request, _all_or_none([sched.complete(target, ids, params) for ids in prompts])
    )
    state.metrics.tokens.labels(body.model).inc(sum(c.completion_tokens for c in done))
    choices = [
        CompletionChoice(
            index=i,
            text=(prompt_text(state.engine, body.prompts[i]) if body.echo else "") + c.text,
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
            base = _chunk_base(rid, "chat.completion.chunk", created, body)
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
                events += [end, *_usage_chunk(base, c, body)]
            return events

        return sse_response(sched.stream(target, ids, params), frame, state, body.model)

    c = await unless_client_left(request, sched.complete(target, ids, params))
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
    vecs = await unless_client_left(request, sched.embed(target, body.texts))
    tok = state.engine.tokenizer
    n = await asyncio.to_thread(
        lambda: sum(len(tok(t, add_special_tokens=True)["input_ids"]) for t in body.texts)
    )
    return EmbeddingResponse.build(body.model, vecs, n, body)
