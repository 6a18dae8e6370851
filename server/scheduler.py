"""Model-aware scheduler: one worker thread owns the engine, requests queue per model_id.

Policy. The worker serves the active model's queue in batches of up to
``max_batch_size`` requests of one kind. After ``max_batches_per_turn`` batches
it hands the engine to the model whose oldest request has waited longest, so a
request waits at most ``(models ahead) * max_batches_per_turn`` batches. While
a batch runs, the engine prefetches the delta of the model that comes next.

Results travel back through a per-request sink: an ``asyncio.Queue`` fed by
``loop.call_soon_threadsafe`` for the async API, a ``queue.Queue`` for the sync
one. A cancelled request (client gone) is skipped if still queued and leaves
its batch at the next decode step if running.

Failures stay with their request where the batch allows it: a generation row
whose own step raises fails alone while the others decode on, and a forward
batch (classify, embed) that raises is rerun one request at a time, so only
the request that broke it gets the error. A failure of the shared work itself
(activating the model, a prefill or decode forward) reaches every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from server.errors import (
    InvalidRequest,
    ModelBusy,
    ModelRetired,
    Overloaded,
    SchedulerClosed,
    WrongTask,
)
from server.generation import Chunk, Row, SamplingParams, encode_prompt, generate_batch
from storage.errors import BaseMismatch, UnknownModel

log = logging.getLogger(__name__)

# a batch failing with one of these failed for what its requests asked (a model that is
# not there, or not of the task), not for a fault: logged without a traceback
REQUEST_ERRORS = (UnknownModel, ModelRetired, WrongTask, InvalidRequest, BaseMismatch)

Kind = Literal["generate", "classify", "embed"]


class _AsyncSink:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> None:
        # RuntimeError: the caller's loop is gone, nobody listens any more
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self) -> Any:
        return await self.queue.get()


class _SyncSink:
    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()

    def put(self, item: Any) -> None:
        self.queue.put(item)

    def get(self) -> Any:
        return self.queue.get()


@dataclass(eq=False)
class Request:
    """One queued unit of work; ``model_id`` None is the base."""

    model_id: str | None
    kind: Kind
    payload: list[int] | list[str]
    params: SamplingParams | None
    sink: _AsyncSink | _SyncSink
    request_id: str
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False


def _cancel(req: Request) -> None:
    """Frees a request's slot: the worker skips it, or stops generating for it."""
    req.cancelled = True


@dataclass
class SchedulerStats:
    """Counters the metrics endpoint reads."""

    swaps: int = 0
    swap_seconds: float = 0.0
    batches: int = 0
    requests: int = 0


class Scheduler:
    """Serve requests for many fine-tunes through one engine, batching per model."""

    def __init__(
        self,
        engine: Any,
        *,
        max_batch_size: int = 8,
        max_batches_per_turn: int = 4,
        max_new_tokens: int = 512,
        max_queue: int = 0,
        on_swap: Callable[[str | None, float], None] | None = None,
    ) -> None:
        assert max_batch_size >= 1 and max_batches_per_turn >= 1 and max_queue >= 0
        self.engine = engine
        self.max_queue = max_queue  # queued requests (all models) before Overloaded; 0: any
        self.max_batch_size = max_batch_size
        self.max_batches_per_turn = max_batches_per_turn
        self.max_new_tokens = max_new_tokens
        self.on_swap = on_swap
        self.stats = SchedulerStats()
        self._queues: dict[str | None, deque[Request]] = {}
        self._running: dict[str | None, int] = {}
        self._retired: set[str] = set()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._current: str | None = None
        self._turn = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="darex-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; queued requests and calls fail with :class:`SchedulerClosed`."""
        with self._cond:
            self._closed = True
            pending = [r for q in self._queues.values() for r in q]
            for q in self._queues.values():
                q.clear()
            calls, self._calls = list(self._calls), deque()
            self._cond.notify_all()
        for r in pending:
            r.sink.put(SchedulerClosed("the server is shutting down"))
        for _, fut in calls:  # never started: their callers would wait for ever
            if fut.set_running_or_notify_cancel():  # False: its caller cancelled it
                fut.set_exception(SchedulerClosed("the server is shutting down"))
        self._thread.join(timeout)

    def queue_depth(self) -> dict[str | None, int]:
        """Queued (not yet running) requests per model."""
        with self._cond:
            return {k: len(q) for k, q in self._queues.items() if q}

    def stream(
        self, model_id: str | None, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[Chunk]:
        """Tokens of one completion as they are generated; the last chunk has finish_reason.

        Submitted here, not on the first iteration: a model being deleted or a server
        shutting down raises at once, before a streaming response has sent its 200. An
        iterator dropped unstarted cancels its request."""
        req = self._submit(model_id, "generate", self._ids(prompt), params, _AsyncSink())
        chunks = self._chunks(req)
        weakref.finalize(chunks, _cancel, req)
        return chunks

    async def _chunks(self, req: Request) -> AsyncIterator[Chunk]:
        try:
            while True:
                item = await req.sink.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            req.cancelled = True  # no-op once finished; frees the slot if the client left

    async def complete(
        self, model_id: str | None, prompt: str | list[int], params: SamplingParams
    ) -> Chunk:
        """The whole completion as one chunk (text, finish_reason, token counts)."""
        parts: list[str] = []
        async for c in self.stream(model_id, prompt, params):
            parts.append(c.text)
            if c.finish_reason is not None:
                return Chunk("".join(parts), c.finish_reason, c.prompt_tokens, c.completion_tokens)
        raise AssertionError("stream ended without finish_reason")

    async def classify(
        self, model_id: str | None, texts: list[str]
    ) -> tuple[list[list[float]], list[str] | None]:
        """Class probabilities per text under the model's head, and that head's label names
        (read where it ran: a replacement that landed while the request waited brings its
        own labels with its own head)."""
        return await self._one(model_id, "classify", texts)

    async def embed(self, model_id: str | None, texts: list[str]) -> list[list[float]]:
        """One embedding per text."""
        return await self._one(model_id, "embed", texts)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread between batches (the engine's single writer)."""
        return await asyncio.wrap_future(self._queue_call(fn))

    def call_sync(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Blocking :meth:`call`, for other threads (an upload's ingest job); do not call
        from the worker thread. ``TimeoutError`` after ``timeout`` seconds (the call is
        then not run if it had not started)."""
        fut = self._queue_call(fn)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def _queue_call(self, fn: Callable[[], Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    async def retire(
        self,
        model_id: str,
        timeout: float = 300.0,
        then: Callable[[], Any] | None = None,
    ) -> None:
        """Refuse new requests for ``model_id``, wait for its queued and running ones, run
        ``then`` (e.g. unregister it; in a thread), and drop the engine's cached copies."""
        with self._cond:
            self._retired.add(model_id)
        try:
            await asyncio.to_thread(self._drain, model_id, timeout)
            if then is not None:
                await asyncio.to_thread(then)
            forget = getattr(self.engine, "forget", None)
            if forget is not None:
                await self.call(lambda: forget(model_id))
        finally:
            with self._cond:
                self._retired.discard(model_id)

    def complete_sync(
        self, model_id: str | None, prompt: str | list[int], params: SamplingParams
    ) -> Chunk:
        """Blocking :meth:`complete` for scripts; do not call from the worker thread."""
        parts: list[str] = []
        for c in self.stream_sync(model_id, prompt, params):
            parts.append(c.text)
            if c.finish_reason is not None:
                return Chunk("".join(parts), c.finish_reason, c.prompt_tokens, c.completion_tokens)
        raise AssertionError("stream ended without finish_reason")

    def stream_sync(
        self, model_id: str | None, prompt: str | list[int], params: SamplingParams
    ) -> Iterator[Chunk]:
        """Blocking :meth:`stream`."""
        req = self._submit(model_id, "generate", self._ids(prompt), params, _SyncSink())
        try:
            while True:
                item = req.sink.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            req.cancelled = True

    def classify_sync(self, model_id: str | None, texts: list[str]) -> list[list[float]]:
        """Blocking :meth:`classify`."""
        req = self._submit(model_id, "classify", list(texts), None, _SyncSink())
        item = req.sink.get()
        if isinstance(item, BaseException):
            raise item
        return item

    # ------------------------------------------------------------------ submission

    def _ids(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.engine.tokenizer, prompt) if isinstance(prompt, str) else prompt

    async def _one(self, model_id: str | None, kind: Kind, texts: list[str]) -> Any:
        req = self._submit(model_id, kind, list(texts), None, _AsyncSink())
        try:
            item = await req.sink.get()
        finally:
            req.cancelled = True
        if isinstance(item, BaseException):
            raise item
        return item

    def _submit(
        self,
        model_id: str | None,
        kind: Kind,
        payload: list[int] | list[str],
        params: SamplingParams | None,
        sink: _AsyncSink | _SyncSink,
    ) -> Request:
        if params is not None and params.max_tokens > self.max_new_tokens:
            params = SamplingParams(
                self.max_new_tokens, params.temperature, params.top_p, params.seed, params.stop
            )
        req = Request(model_id, kind, payload, params, sink, uuid.uuid4().hex)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if model_id in self._retired:
                raise ModelRetired(f"model {model_id!r} is being deleted")
            # a request whose client left stays in its queue until the worker reaches it
            queued = sum(not r.cancelled for q in self._queues.values() for r in q)
            if self.max_queue and queued >= self.max_queue:
                raise Overloaded(
                    f"{queued} requests are already waiting for the engine, this server's "
                    "limit (DAREX_MAX_QUEUE); try again shortly"
                )
            self._queues.setdefault(model_id, deque()).append(req)
            self._cond.notify_all()
        return req

    def _drain(self, model_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queues.get(model_id) or self._running.get(model_id, 0):
                left = deadline - time.monotonic()
                if left <= 0:
                    n = len(self._queues.get(model_id) or ()) + self._running.get(model_id, 0)
                    raise ModelBusy(
                        f"model {model_id!r} still has {n} request(s) queued or running after "
                        f"{timeout:g} s; it stays registered and served: delete it again later"
                    )
                self._cond.wait(left)

    # ------------------------------------------------------------------ worker

    def _pick(self) -> tuple[str | None, list[Request]] | None:
        """Under the lock: the next batch by the policy in the module docstring."""
        dropped = False
        for q in self._queues.values():
            while q and q[0].cancelled:
                q.popleft()
                dropped = True
        if dropped:  # a delete waiting for this model's queue to empty rechecks now
            self._cond.notify_all()
        waiting = {k: q for k, q in self._queues.items() if q}
        if not waiting:
            return None
        others = {k: q for k, q in waiting.items() if k != self._current}
        if self._current in waiting and (self._turn < self.max_batches_per_turn or not others):
            key = self._current
        else:
            key = min(others, key=lambda k: others[k][0].enqueued)
        if key != self._current or self._turn >= self.max_batches_per_turn:
            self._turn = 0
        self._turn += 1
        q = waiting[key]
        kind = q[0].kind
        batch: list[Request] = []
        rest: deque[Request] = deque()
        while q and len(batch) < self.max_batch_size:
            r = q.popleft()
            if r.cancelled:
                self._cond.notify_all()
                continue
            (batch if r.kind == kind else rest).append(r)
        q.extendleft(reversed(rest))
        self._running[key] = self._running.get(key, 0) + len(batch)
        return key, batch

    def _next_model(self, current: str | None) -> str | bool | None:
        """Under the lock: the model that gets the engine after ``current`` (False: none)."""
        others = {k: q for k, q in self._queues.items() if q and k != current}
        if not others:
            return False
        return min(others, key=lambda k: others[k][0].enqueued)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._calls and not self._has_work():
                    self._cond.wait()
                if self._closed:
                    return
                call = self._calls.popleft() if self._calls else None
                picked = None if call else self._pick()
                nxt = self._next_model(picked[0]) if picked else False
            if call is not None:
                fn, fut = call
                if not fut.set_running_or_notify_cancel():
                    continue  # its caller gave up (a cancelled task): not run
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the awaiting caller
                    fut.set_exception(e)
                continue
            if picked is None:
                continue
            key, batch = picked
            try:
                self._serve(key, batch, nxt)
            finally:
                with self._cond:
                    self._running[key] -= len(batch)
                    self._cond.notify_all()

    def _has_work(self) -> bool:
        return any(q for q in self._queues.values())

    def _serve(self, key: str | None, batch: list[Request], nxt: str | bool | None) -> None:
        if not batch:
            return
        try:
            t0 = time.perf_counter()
            changed = self.engine.activate(key)
            self._current = key
            if changed:
                dt = time.perf_counter() - t0
                self.stats.swaps += 1
                self.stats.swap_seconds += dt
                if self.on_swap is not None:
                    self.on_swap(key, dt)
            prefetch = getattr(self.engine, "prefetch", None)
            if nxt is not False and nxt is not None and prefetch is not None:
                prefetch(nxt)
            kind = batch[0].kind
            if kind == "generate":
                self._generate(batch)
            else:
                self._forward(kind, batch)
            self.stats.batches += 1
            self.stats.requests += len(batch)
        except Exception as e:
            extra = {"model_id": key, "request_ids": [r.request_id for r in batch]}
            if isinstance(e, REQUEST_ERRORS):  # the request's doing: its 4xx says it all
                log.warning("batch refused: %s", e, extra=extra)
            else:
                log.exception("batch failed", extra=extra)
            for r in batch:
                r.sink.put(e)

    def _generate(self, batch: list[Request]) -> None:
        eng = self.engine
        rows = [
            Row(
                prompt=list(r.payload),  # type: ignore[arg-type]
                params=r.params or SamplingParams(),
                emit=r.sink.put,
                is_cancelled=lambda r=r: r.cancelled,
                fail=lambda e, r=r: self._fail_one(r, e),
            )
            for r in batch
        ]
        generate_batch(eng.model, eng.tokenizer, rows, eng.device)

    def _forward(self, kind: Kind, batch: list[Request]) -> None:
        texts = [t for r in batch for t in r.payload]  # one forward for the whole batch
        eng = self.engine
        fn = eng.classify if kind == "classify" else eng.embed

        def answer(rows: list[list[float]]) -> Any:
            # a batch is one model's: classify rows go with the labels of the head that ran
            return (rows, eng.active_labels) if kind == "classify" else rows

        try:
            out = fn(texts)
        except Exception:
            if len(batch) == 1:
                raise
            log.warning("forward batch failed; rerunning its requests one by one", exc_info=True)
            for r in batch:  # only the request that broke the batch gets the error
                if r.cancelled:
                    continue
                try:
                    r.sink.put(answer(fn(list(r.payload))))
                except Exception as e:
                    self._fail_one(r, e)
            return
        i = 0
        for r in batch:
            r.sink.put(answer(out[i : i + len(r.payload)]))
            i += len(r.payload)

    def _fail_one(self, req: Request, exc: BaseException) -> None:
        log.error(
            "request failed in its batch: %s",
            exc,
            exc_info=exc,
            extra={"model_id": req.model_id, "request_ids": [req.request_id]},
        )
        req.sink.put(exc)
