"""End to end over real HTTP: a live uvicorn server, the official ``openai`` client, httpx.

Fine-tunes are uploaded through the admin API, and every answer is compared with
the same engine driven directly from Python (on the scheduler's worker thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.api import create_app
from server.api.routes.openai import render_chat
from server.api.schemas import ChatMessage
from server.generation import encode_prompt
from tests.server.finetunes import multipart_files, reference_generate, save_causal_finetune
from tests.server.live import ADMIN_TOKEN, live_server, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def upload_and_wait(url: str, folder: Path, model_id: str, timeout: float = 300, **fields) -> dict:
    data = {"model_id": model_id, **{k: str(v) for k, v in fields.items()}}
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/admin/models", headers=AUTH, data=data, files=multipart_files(folder))
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = c.get(f"/admin/jobs/{job_id}", headers=AUTH).json()
            if job["state"] in ("done", "failed"):
                assert job["state"] == "done", job
                return job
            time.sleep(0.1)
    raise TimeoutError(model_id)


def direct(app, model_id: str | None, ids: list[int], max_tokens: int) -> str:
    """Greedy text of the server's own engine, activated and run by hand on its worker thread."""
    st = app.state.darex
    eng = st.engine

    def run() -> str:
        eng.activate(model_id)
        return reference_generate(eng.model, eng.tokenizer, ids, max_tokens)

    return asyncio.run(st.scheduler.call(run))


class Live:
    def __init__(self, app, url: str) -> None:
        self.app, self.url = app, url
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        self.base_id = app.state.darex.base_id
        self.tok = app.state.darex.engine.tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_llama_dir: Path) -> Iterator[Live]:
    app = create_app(make_settings(tmp_path_factory.mktemp("e2e"), str(tiny_llama_dir)))
    with live_server(app) as url:
        for i, mid in enumerate(("ft-a", "ft-b")):
            ft = save_causal_finetune(tiny_llama_dir, tmp_path_factory.mktemp(mid), seed=10 + i)
            upload_and_wait(url, ft, mid, method="darex_q", rate=0.9, q=0.12)
        yield Live(app, url)


def test_completions_equal_the_engine(tiny: Live) -> None:
    ids = encode_prompt(tiny.tok, "the quick brown fox")
    answers = {}
    for m in (tiny.base_id, "ft-a", "ft-b"):
        r = tiny.client.completions.create(
            model=m, prompt="the quick brown fox", max_tokens=10, temperature=0
        )
        assert r.choices[0].text == direct(tiny.app, m, ids, 10), m
        assert r.usage.prompt_tokens == len(ids)
        answers[m] = r.choices[0].text
    assert len(set(answers.values())) == 3


def test_chat_and_streaming(tiny: Live) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = tiny.client.chat.completions.create(
        model="ft-a", messages=msgs, max_tokens=9, temperature=0
    )
    ids = render_chat(tiny.tok, [ChatMessage(**m) for m in msgs])
    assert r.choices[0].message.content == direct(tiny.app, "ft-a", ids, 9)
    assert r.choices[0].message.role == "assistant"

    stream = tiny.client.chat.completions.create(
        model="ft-a", messages=msgs, max_tokens=9, temperature=0, stream=True
    )
    events = list(stream)
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events)
    assert text == r.choices[0].message.content
    assert events[-1].choices[0].finish_reason == r.choices[0].finish_reason

    pieces = list(
        tiny.client.completions.create(
            model="ft-b", prompt="serving many", max_tokens=12, temperature=0, stream=True
        )
    )
    whole = tiny.client.completions.create(
        model="ft-b", prompt="serving many", max_tokens=12, temperature=0
    )
    assert len(pieces) > 2
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text


def test_two_models_interleaved_each_get_their_own_answers(tiny: Live) -> None:
    prompts = ["hello world", "a b c", "many fine tunes", "one base model"]
    expect = {
        (m, p): direct(tiny.app, m, encode_prompt(tiny.tok, p), 8)
        for m in ("ft-a", "ft-b")
        for p in prompts
    }

    def ask(key):
        m, p = key
        r = tiny.client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0)
        return r.choices[0].text

    keys = list(expect) * 2
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, keys))
    assert got == [expect[k] for k in keys]


def test_errors_through_the_openai_client(tiny: Live) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        tiny.client.completions.create(model="nobody", prompt="x", max_tokens=2)
    assert "nobody" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        tiny.client.completions.create(model="ft-a", prompt="x", max_tokens=2, top_p=7)
    assert "top_p" in e.value.body["message"]
    with httpx.Client(base_url=tiny.url) as c:
        assert c.post("/admin/models", data={"model_id": "x"}).status_code == 401
        assert c.get("/readyz").status_code == 200
        assert "darex_swaps_total" in c.get("/metrics").text


def test_openai_client_conventions(tiny: Live) -> None:
    """What the openai client and its wrappers do: retrieve a model, send null for a
    parameter they leave at its default, ask for the usage at the end of a stream."""
    c = tiny.client
    assert c.models.retrieve("ft-a").id == "ft-a"
    assert c.models.retrieve(tiny.base_id).owned_by == "base"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("nobody")
    assert e.value.body["code"] == "model_not_found" and "nobody" in e.value.body["message"]

    msgs = [{"role": "user", "content": "hello there"}]
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None}
    plain = c.chat.completions.create(model="ft-a", messages=msgs, max_tokens=6, seed=3)
    with_nulls = c.chat.completions.create(
        model="ft-a", messages=msgs, max_tokens=6, seed=3, **nulls
    )
    assert with_nulls.choices[0].message.content == plain.choices[0].message.content
    # a seed is any signed 64-bit integer, as OpenAI's; the same seed, the same sample
    lowest = [
        c.completions.create(model="ft-a", prompt="hi", max_tokens=6, seed=-(2**63)).choices[0]
        for _ in range(2)
    ]
    assert lowest[0].text == lowest[1].text and lowest[0].finish_reason == "length"
    done = c.completions.create(
        model="ft-a", prompt="hi", max_tokens=None, echo=None, temperature=0
    )
    assert done.usage.completion_tokens == 16  # the default, null or absent

    events = list(
        c.completions.create(
            model="ft-b",
            prompt="serving many",
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *tokens, last = events
    assert last.choices == [] and last.usage.completion_tokens == 7, last
    assert all(e.usage is None and len(e.choices) == 1 for e in tokens)
    assert tokens[-1].choices[0].finish_reason == "length"
    with httpx.Client(base_url=tiny.url, timeout=30) as h:
        body = {"model": "ft-a", "prompt": "hi", "max_tokens": 2}
        r = h.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}})
        assert r.status_code == 422 and r.json()["error"]["param"] == "stream_options", r.text
        with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.headers["cache-control"] == "no-cache", r.headers
            assert r.headers["x-accel-buffering"] == "no", r.headers
            assert r.read().endswith(b"data: [DONE]\n\n")


def test_token_id_prompts_answer_as_their_text(tiny: Live) -> None:
    """A prompt sent as token ids (one list, or a list of lists) gets the answer of the
    text those ids encode; echo gives the decoded prompt; an id outside the vocabulary is
    a 422 on prompt; top_p 0 keeps the top token only (greedy)."""
    text = "the quick brown fox"
    ids = encode_prompt(tiny.tok, text)
    kw = {"model": "ft-a", "max_tokens": 6, "temperature": 0}
    want = tiny.client.completions.create(prompt=text, **kw).choices[0].text
    assert tiny.client.completions.create(prompt=ids, **kw).choices[0].text == want
    both = tiny.client.completions.create(prompt=[ids, ids[:2]], **kw)
    assert both.choices[0].text == want and len(both.choices) == 2
    echoed = tiny.client.completions.create(prompt=ids, echo=True, **kw).choices[0].text
    assert echoed == tiny.tok.decode(ids) + want
    sampled = tiny.client.completions.create(prompt=text, **{**kw, "temperature": 1.0}, top_p=0)
    assert sampled.choices[0].text == want
    with pytest.raises(openai.UnprocessableEntityError) as e:
        tiny.client.completions.create(prompt=[*ids, 10**7], **kw)
    assert e.value.body["param"] == "prompt" and "10000000" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        tiny.client.completions.create(prompt=["a", None], **kw)  # type: ignore[list-item]
    assert e.value.body["param"] == "prompt.1", e.value.body


def test_a_client_that_leaves_stops_its_generation(tiny: Live) -> None:
    """A non-streaming completion whose client times out is cancelled: the engine stops
    generating for it instead of running on to max_tokens for nobody."""
    sched = tiny.app.state.darex.scheduler
    real_submit, chunks = sched._submit, []

    def spy(*args, **kw):
        req = real_submit(*args, **kw)
        put = req.sink.put
        # 20 ms a token: 250 tokens take 5 s or more on any machine, so the generation is
        # still running when the disconnect is seen (0.1 s timeout, 0.25 s polls)
        req.sink.put = lambda item: (chunks.append(item), time.sleep(0.02), put(item))
        return req

    sched._submit = spy
    try:
        body = {"model": tiny.base_id, "prompt": "hi", "max_tokens": 250, "temperature": 0}
        with (
            httpx.Client(base_url=tiny.url, timeout=0.1) as c,
            pytest.raises(httpx.TimeoutException),
        ):
            c.post("/v1/completions", json=body)
        deadline = time.monotonic() + 30
        while (sum(sched._running.values()) or sched.queue_depth()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sched._submit = real_submit
    assert chunks, "the request never reached the engine"
    assert not any(getattr(c, "finish_reason", None) for c in chunks), chunks[-1]
    assert len(chunks) < 250
    metrics = httpx.get(f"{tiny.url}/metrics").text  # the client's doing: 499, not a 5xx
    assert f'endpoint="/v1/completions",model="{tiny.base_id}",status="499"' in metrics


@pytest.mark.parametrize(
    ("route", "kind"), [("/v1/embeddings", "embed"), ("/v1/classify", "classify")]
)
def test_a_client_that_leaves_is_not_answered_on_the_encoder_routes(
    tmp_path_factory, tiny_bert_dir: Path, route: str, kind: str
) -> None:
    """An embeddings or classify request whose client times out while it waits in the
    queue is cancelled: the engine never runs it, and the metrics count a 499."""
    from tests.server.finetunes import save_classifier_finetune

    app = create_app(make_settings(tmp_path_factory.mktemp("e2e-leave"), str(tiny_bert_dir)))
    with live_server(app) as url:
        st = app.state.darex
        model = st.base_id
        if route == "/v1/classify":
            ft = save_classifier_finetune(tiny_bert_dir, tmp_path_factory.mktemp("cls"), seed=3)
            upload_and_wait(url, ft, model := "cls", method="dare", rate=0.5)
        real, ran = getattr(st.engine, kind), []
        setattr(st.engine, kind, lambda *a, **kw: (ran.append(a), real(*a, **kw))[1])
        # the worker is busy for 1.5 s: the request is still queued when its client leaves
        body = {"model": model, "input": ["a fine film"] * 8}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            busy = pool.submit(st.scheduler.call_sync, lambda: time.sleep(1.5))
            time.sleep(0.2)
            with (
                httpx.Client(base_url=url, timeout=0.3) as c,
                pytest.raises(httpx.TimeoutException),
            ):
                c.post(route, json=body)
            busy.result(timeout=30)
        with httpx.Client(base_url=url, timeout=30) as c:  # the worker has run everything queued
            assert c.post(route, json={**body, "input": ["next"]}).status_code == 200
        assert ran == [(["next"],)], ran
        metrics = httpx.get(f"{url}/metrics").text
        assert f'endpoint="{route}",model="{model}",status="499"' in metrics, metrics


@pytest.mark.slow
def test_real_encoder_base_classifies_an_uploaded_finetune(tmp_path_factory) -> None:
    """minilm-l6: a full classification fine-tune uploaded, served, equal to the engine."""
    from tests.server.finetunes import save_classifier_finetune

    data = tmp_path_factory.mktemp("e2e-minilm")
    app = create_app(make_settings(data, "minilm-l6"))
    texts = ["a wonderful, moving film", "dull and far too long", "it exists"]
    with live_server(app) as url:
        base_dir = app.state.darex.base.path
        ft = save_classifier_finetune(base_dir, tmp_path_factory.mktemp("ft-minilm"), seed=7)
        upload_and_wait(url, ft, "minilm-sent", method="dare", rate=0.99)
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/v1/classify", json={"model": "minilm-sent", "input": texts})
            e = c.post("/v1/embeddings", json={"model": "minilm-l6", "input": texts[:1]})
        st = app.state.darex

        def run():
            st.engine.activate("minilm-sent")
            return st.engine.classify(texts)

        expect = asyncio.run(st.scheduler.call(run))
    assert r.status_code == 200, r.text
    for d, row in zip(r.json()["data"], expect, strict=True):
        assert list(d["scores"].values()) == pytest.approx(row, abs=1e-6)
    assert e.status_code == 200 and len(e.json()["data"][0]["embedding"]) == 384


@pytest.mark.slow
def test_real_decoder_base_serves_an_uploaded_lora_adapter(tmp_path_factory) -> None:
    """smollm2-135m: a PEFT LoRA adapter uploaded; chat (its template) and streaming over HTTP."""
    import os

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from storage.bases import resolve_base

    env = os.environ.get("DAREX_DATA_DIR")
    bases_dir = Path(env) if env else tmp_path_factory.mktemp("bases")
    base = resolve_base("smollm2-135m", bases_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    cfg = LoraConfig(
        r=4,
        lora_alpha=64,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    adapter = tmp_path_factory.mktemp("lora")
    get_peft_model(model, cfg).save_pretrained(adapter)
    del model

    app = create_app(make_settings(tmp_path_factory.mktemp("e2e-smol"), "smollm2-135m"), base=base)
    with live_server(app) as url:
        upload_and_wait(url, adapter, "smol-lora")
        live = Live(app, url)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = live.client.chat.completions.create(
            model="smol-lora", messages=msgs, max_tokens=12, temperature=0
        )
        ids = render_chat(live.tok, [ChatMessage(**m) for m in msgs])
        assert live.tok.decode(ids).endswith("<|im_start|>assistant\n")  # its own template
        assert r.choices[0].message.content == direct(app, "smol-lora", ids, 12)
        assert r.choices[0].message.content != direct(app, None, ids, 12)
        events = list(
            live.client.chat.completions.create(
                model="smol-lora", messages=msgs, max_tokens=12, temperature=0, stream=True
            )
        )
        assert (
            "".join(e.choices[0].delta.content or "" for e in events)
            == r.choices[0].message.content
        )
