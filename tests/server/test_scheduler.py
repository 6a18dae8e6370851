"""Scheduler on the real Engine and the tiny models: answers, batching, fairness, cancel, retire."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from server.api.errors import describe
from server.errors import ModelBusy, ModelRetired, Overloaded, SchedulerClosed
from server.generation import SamplingParams
from server.scheduler import Scheduler
from storage.errors import UnknownModel
from tests.server.finetunes import assert_interleaved_answers, merged_classify

PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "serving many fine tunes of"]


@pytest.fixture()
def sched(llama_engine):
    s = Scheduler(llama_engine, max_batch_size=4, max_batches_per_turn=2)
    yield s
    s.close()


def test_interleaved_models_each_get_their_own_greedy_answer(
    sched, llama_engine, tiny_llama_dir: Path, llama_deltas
) -> None:
    """Batched, left-padded, interleaved requests equal HF generate on each merged checkpoint."""
    answers = assert_interleaved_answers(
        sched, tiny_llama_dir, llama_deltas, [None, "ft-a", "ft-b"], PROMPTS, 10
    )
    assert answers["ft-a"] != answers[None] and answers["ft-b"] != answers["ft-a"]
    assert sched.stats.swaps >= 2
    assert llama_engine.activate(None) or llama_engine.active is None
    assert llama_engine.base_fingerprint() == llama_engine.loaded_fingerprint


def test_fairness_bounds_the_wait_of_another_model(sched) -> None:
    """With the worker busy, 6 requests of A then 1 of B: B runs after 2 batches of A."""
    sched.max_batch_size = 1
    order: list[str] = []
    gate = threading.Event()

    async def main():
        blocker = asyncio.ensure_future(sched.call(gate.wait))
        await asyncio.sleep(0.05)

        async def one(model, tag):
            await sched.complete(model, "hello", SamplingParams(max_tokens=2))
            order.append(tag)

        tasks = [asyncio.ensure_future(one("ft-a", f"a{i}")) for i in range(6)]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.ensure_future(one("ft-b", "b")))
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert order.index("b") == 2, order


def test_close_fails_the_calls_still_queued_instead_of_leaving_them_waiting(
    llama_engine,
) -> None:
    """A call queued behind a busy worker when the server stops: its caller gets
    SchedulerClosed (an upload's job thread waiting in ``call_sync`` would hang for ever)."""
    s = Scheduler(llama_engine, max_batch_size=4)
    gate, running = threading.Event(), threading.Event()
    busy = threading.Thread(target=s.call_sync, args=(lambda: running.set() or gate.wait(),))
    busy.start()
    assert running.wait(10)
    outcome: list[object] = []

    def queued() -> None:
        try:
            outcome.append(s.call_sync(lambda: "ran"))
        except SchedulerClosed as e:
            outcome.append(e)

    waiter = threading.Thread(target=queued)
    waiter.start()
    deadline = time.monotonic() + 10
    while len(s._calls) < 1 and time.monotonic() < deadline:  # queued behind the busy call
        time.sleep(0.01)
    assert len(s._calls) == 1
    cancelled = s._queue_call(lambda: "never")  # its caller gave up: close skips it
    assert cancelled.cancel()
    s.close(timeout=0.1)
    waiter.join(10)
    assert not waiter.is_alive() and isinstance(outcome[0], SchedulerClosed), outcome
    assert cancelled.cancelled()
    gate.set()
    busy.join(10)
    with pytest.raises(SchedulerClosed):
        s.call_sync(lambda: "late")


def test_a_call_its_caller_cancelled_is_skipped_and_the_worker_lives_on(llama_engine) -> None:
    """A cancelled call (an awaiting task cancelled at shutdown) is not run, and the
    worker thread does not die on it (set_result on a cancelled future raised, twice)."""
    s = Scheduler(llama_engine, max_batch_size=4)
    gate, ran = threading.Event(), []
    try:
        busy = s._queue_call(gate.wait)
        dropped = s._queue_call(lambda: ran.append("dropped"))
        assert dropped.cancel()
        gate.set()
        assert busy.result(10)
        assert s.call_sync(lambda: "alive", timeout=10) == "alive"
        assert ran == [] and s._thread.is_alive()
    finally:
        s.close()


def test_a_full_queue_refuses_new_requests_at_once(llama_engine) -> None:
    """max_queue requests wait (the worker busy): the next one is Overloaded (HTTP 503
    overloaded) at once, whatever its model; once the queue drains, requests go in again."""
    s = Scheduler(llama_engine, max_batch_size=1, max_queue=2)
    gate = threading.Event()
    params = SamplingParams(max_tokens=2)

    async def main() -> None:
        blocker = asyncio.ensure_future(s.call(gate.wait))
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(s.complete(m, "hello", params)) for m in (None, "ft-a")]
        await asyncio.sleep(0.05)
        for model in (None, "ft-b"):
            with pytest.raises(Overloaded, match="2 requests are already waiting"):
                s.stream(model, "hello", params)
        waiting[0].cancel()  # its client left: its slot is free, though it is still queued
        await asyncio.sleep(0.05)
        third = asyncio.ensure_future(s.complete("ft-b", "hello", params))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            s.stream(None, "hello", params)
        waiting[0] = third
        status, body = describe(Overloaded("x"))
        assert status == 503 and body["error"]["code"] == "overloaded"
        gate.set()
        await blocker
        assert all(c.finish_reason for c in await asyncio.gather(*waiting))
        assert (await s.complete("ft-b", "hello", params)).finish_reason

    try:
        asyncio.run(main())
    finally:
        s.close()


def test_seeded_sampling_is_reproducible_and_top_p_zero_is_greedy(sched) -> None:
    def run(**kw):
        return sched.complete_sync("ft-a", "hello world", SamplingParams(max_tokens=12, **kw)).text

    a = run(temperature=1.5, seed=7)
    assert run(temperature=1.5, seed=7) == a
    assert any(run(temperature=1.5, seed=s) != a for s in range(8, 12))
    assert run(temperature=1.0, top_p=1e-9, seed=3) == run()


def test_stop_string_truncates_and_streams_agree(sched) -> None:
    full = sched.complete_sync(
        None, "the quick brown fox jumps over", SamplingParams(max_tokens=12)
    )
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = words[2]
    cut = sched.complete_sync(
        None, "the quick brown fox jumps over", SamplingParams(max_tokens=12, stop=(stop,))
    )
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    pieces = list(
        sched.stream_sync(
            None, "the quick brown fox jumps over", SamplingParams(max_tokens=12, stop=(stop,))
        )
    )
    assert "".join(p.text for p in pieces) == cut.text
    assert pieces[-1].finish_reason == "stop" and all(p.finish_reason is None for p in pieces[:-1])


def test_cancelled_stream_frees_its_slot(sched) -> None:
    """A client that leaves after 3 chunks stops its row: the model drains long before 240 steps."""
    long = SamplingParams(max_tokens=240)
    t0 = time.perf_counter()
    sched.complete_sync("ft-b", "x", long)
    full_s = time.perf_counter() - t0

    async def main():
        agen = sched.stream("ft-b", "x", long)
        for _ in range(3):
            await agen.__anext__()
        t = time.perf_counter()
        await agen.aclose()
        await asyncio.to_thread(sched._drain, "ft-b", 30.0)
        return time.perf_counter() - t

    drained_s = asyncio.run(main())
    assert drained_s < full_s / 3, (drained_s, full_s)


def test_stream_refuses_at_once_and_a_dropped_stream_frees_its_slot(sched) -> None:
    """``stream`` submits when called: a model being deleted raises before any iteration
    (so a streaming response is a 404, not a 200 carrying an error event); an iterator
    dropped unstarted cancels its request, so a delete waiting on the model goes on."""
    import gc

    long = SamplingParams(max_tokens=240)
    t0 = time.perf_counter()
    sched.complete_sync("ft-b", "x", long)
    full_s = time.perf_counter() - t0

    async def main() -> float:
        with sched._cond:
            sched._retired.add("ft-b")
        try:
            with pytest.raises(ModelRetired, match="'ft-b' is being deleted"):
                sched.stream("ft-b", "x", long)  # not iterated
        finally:
            with sched._cond:
                sched._retired.discard("ft-b")
        agen = sched.stream("ft-b", "x", long)
        del agen
        gc.collect()
        t = time.perf_counter()
        await asyncio.to_thread(sched._drain, "ft-b", 30.0)
        return time.perf_counter() - t

    assert asyncio.run(main()) < full_s / 3


def test_unknown_model_fails_only_its_request(sched, caplog) -> None:
    async def main():
        return await asyncio.gather(
            sched.complete("nope", "hi", SamplingParams(max_tokens=2)),
            sched.complete("ft-a", "hi", SamplingParams(max_tokens=2)),
            return_exceptions=True,
        )

    with caplog.at_level("WARNING", logger="server.scheduler"):
        bad, good = asyncio.run(main())
    assert isinstance(bad, UnknownModel)
    assert good.finish_reason in ("length", "stop")
    # the request's doing, not a fault: one warning naming the model, no traceback
    (rec,) = [r for r in caplog.records if r.name == "server.scheduler"]
    assert rec.levelname == "WARNING" and "'nope'" in rec.getMessage() and not rec.exc_info


def test_retire_finishes_in_flight_and_refuses_new_requests(sched, llama_engine) -> None:
    async def main():
        running = asyncio.ensure_future(sched.complete("ft-a", "hi", SamplingParams(max_tokens=60)))
        await asyncio.sleep(0)
        retiring = asyncio.ensure_future(sched.retire("ft-a"))
        await asyncio.sleep(0.01)
        with pytest.raises(ModelRetired):
            await sched.complete("ft-a", "hi", SamplingParams(max_tokens=2))
        assert not running.done()
        await retiring
        return await running

    done = asyncio.run(main())
    assert done.finish_reason in ("length", "stop") and done.completion_tokens > 0
    assert llama_engine.active != "ft-a"
    assert "ft-a" not in llama_engine.cache_stats()["device"]["entries"]


def test_a_retire_that_outlasts_its_wait_is_model_busy_and_the_model_stays(
    sched, llama_engine
) -> None:
    """DELETE's wait has a bound: past it the delete fails with ModelBusy (503, saying to
    try again), nothing is unregistered, and the model takes requests again."""
    unregistered: list[str] = []

    async def main():
        gate = threading.Event()
        blocker = asyncio.ensure_future(sched.call(gate.wait))  # hold the worker
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(sched.complete("ft-a", "hi", SamplingParams(max_tokens=2)))
        await asyncio.sleep(0.05)
        with pytest.raises(ModelBusy, match="still has 1 request"):
            await sched.retire("ft-a", timeout=0.2, then=lambda: unregistered.append("ft-a"))
        gate.set()
        await blocker
        first = await queued
        again = await sched.complete("ft-a", "hi", SamplingParams(max_tokens=2))  # not retired
        return first, again

    first, again = asyncio.run(main())
    assert first.completion_tokens > 0 and again.completion_tokens > 0 and unregistered == []
    status, body = describe(ModelBusy("m"))
    assert status == 503 and body["error"]["code"] == "model_busy"


def test_classification_batches_match_merged_models(bert_engine, tiny_bert_dir, bert_deltas):
    texts = ["great movie", "it was fine I guess", "awful", "a much longer sentence than others"]
    s = Scheduler(bert_engine, max_batch_size=8)
    try:

        async def main():
            jobs = [s.classify(m, [t]) for t in texts for m in ("cls-a", "cls-b")]
            jobs.append(s.classify("cls-a", texts))
            return await asyncio.gather(*jobs)

        out = asyncio.run(main())
    finally:
        s.close()
    labels = {m: bert_engine.labels_of(m) for m in ("cls-a", "cls-b")}
    assert labels["cls-a"] and labels["cls-b"]
    assert all(
        out[2 * i + m_i][1] == labels[m] for i in range(len(texts)) for m_i, m in enumerate(labels)
    )
    out = [rows for rows, _ in out]
    for m_i, m in enumerate(("cls-a", "cls-b")):
        expect = merged_classify(tiny_bert_dir, bert_deltas[m], texts)
        got = [out[2 * i + m_i][0] for i in range(len(texts))]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), atol=1e-5, rtol=0)
    batched = merged_classify(tiny_bert_dir, bert_deltas["cls-a"], texts)
    torch.testing.assert_close(torch.tensor(out[-1]), torch.tensor(batched), atol=1e-5, rtol=0)
    assert out[0] != out[1]  # the two heads answer differently
