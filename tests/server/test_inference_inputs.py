"""Hostile or odd inference inputs on the real app: each fails alone, as a 4xx naming the field.

Tiny temperatures sample safely; lone surrogates, empty or oversized input lists, chat
templates that refuse a conversation and bodies over the JSON cap are refused before the
scheduler; one failing row of a batch does not fail the other requests in it; tokenizing a
long prompt does not hold the event loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import server.generation as generation
from server.api import create_app
from server.api.app import MAX_JSON_BYTES
from server.generation import Row, SamplingParams
from server.scheduler import Scheduler
from tests.server.live import ADMIN_TOKEN, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LONE = "ab\ud800cd"  # a lone (unpaired) surrogate: not encodable as UTF-8


def assert_error(r, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"type", "message", "param", "code", "request_id"}
    for w in words:
        assert w in err["message"], (w, err["message"])
    assert "Traceback" not in r.text
    return err


def raw_json(client: TestClient, url: str, body: dict) -> Any:
    """POST ``body`` as JSON with ``\\ud800`` escapes kept (httpx would refuse to encode them)."""
    data = json.dumps(body, ensure_ascii=True).encode()
    return client.post(url, content=data, headers={"content-type": "application/json"})


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_llama_dir: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(tmp_path_factory.mktemp("inputs-llama"), str(tiny_llama_dir)))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def bert(tmp_path_factory, tiny_bert_dir: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(tmp_path_factory.mktemp("inputs-bert"), str(tiny_bert_dir)))
    with TestClient(app) as client:
        yield client


# ---- 1. temperature ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1e-12, 1e-6])
def test_tiny_temperatures_sample_the_argmax_without_nan(temperature: float) -> None:
    logits = torch.tensor([3.0, 80.0, -1e4, 79.0, 0.0])
    row = Row([1], SamplingParams(temperature=temperature), lambda c: None, lambda: False)
    row.generator = torch.Generator().manual_seed(0)
    for top_p in (1.0, 0.5):
        row.params = SamplingParams(temperature=temperature, top_p=top_p)
        assert generation._sample(logits, row) == 1


def test_tiny_temperature_over_http_is_greedy_and_spares_its_batch(llama: TestClient) -> None:
    base = llama.app.state.darex.base_id
    prompt = {"model": base, "prompt": "hello world", "max_tokens": 6}
    bodies = [{**prompt, "temperature": t} for t in (1e-39, 0, 1e-39, 0)]
    with ThreadPoolExecutor(4) as pool:  # sent together: they share batches
        rs = list(pool.map(lambda b: llama.post("/v1/completions", json=b), bodies))
    for r in rs:
        assert r.status_code == 200, r.text
    texts = {r.json()["choices"][0]["text"] for r in rs}
    assert len(texts) == 1  # a vanishing temperature is the greedy answer

    r = llama.post("/v1/completions", json={**prompt, "temperature": 1e-39, "stream": True})
    assert r.status_code == 200
    assert '"error"' not in r.text and r.text.rstrip().endswith("data: [DONE]")


def test_a_failing_row_fails_alone(llama_engine, monkeypatch) -> None:
    """A row whose sampling raises gets the error; the other rows of its batch finish."""
    real = generation._sample

    def sample(logits: torch.Tensor, row: Row) -> int:
        if row.params.seed == 666:
            raise RuntimeError("this row's draw failed")
        return real(logits, row)

    monkeypatch.setattr(generation, "_sample", sample)
    sched = Scheduler(llama_engine, max_batch_size=4)
    gate = threading.Event()

    async def main() -> list[Any]:
        blocker = asyncio.ensure_future(sched.call(gate.wait))  # hold the worker: one batch
        await asyncio.sleep(0.05)
        good = SamplingParams(max_tokens=4)
        bad = SamplingParams(max_tokens=4, temperature=1.0, seed=666)
        jobs = [sched.complete(None, "hello world", p) for p in (good, bad, good)]
        tasks = [asyncio.ensure_future(j) for j in jobs]
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        good1, bad, good2 = asyncio.run(main())
    finally:
        gate.set()
        sched.close()
    assert isinstance(bad, RuntimeError) and "draw failed" in str(bad)
    assert good1.finish_reason is not None and good1.text == good2.text
    assert sched.stats.batches == 1


def test_a_failing_text_fails_alone_in_an_embedding_batch(bert_engine) -> None:
    """Forward batches join the texts of several requests; one bad text fails its request only."""
    sched = Scheduler(bert_engine, max_batch_size=4)
    gate = threading.Event()

    async def main() -> list[Any]:
        blocker = asyncio.ensure_future(sched.call(gate.wait))
        await asyncio.sleep(0.05)
        tasks = [
            asyncio.ensure_future(sched.embed(None, texts))
            for texts in (["good text"], [LONE], ["good text", "more"])
        ]
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        one, bad, two = asyncio.run(main())
    finally:
        gate.set()
        sched.close()
    assert isinstance(bad, Exception)
    assert len(one) == 1 and len(two) == 2
    torch.testing.assert_close(torch.tensor(one[0]), torch.tensor(two[0]), atol=1e-5, rtol=0)


# ---- 2. lone surrogates -------------------------------------------------------------------


def test_lone_surrogates_are_422_naming_the_field(llama: TestClient, bert: TestClient) -> None:
    base = llama.app.state.darex.base_id
    enc = bert.app.state.darex.base_id
    cases = [
        (llama, "/v1/completions", {"model": base, "prompt": LONE}, "prompt"),
        (llama, "/v1/completions", {"model": base, "prompt": ["ok", LONE]}, "prompt"),
        (
            llama,
            "/v1/chat/completions",
            {"model": base, "messages": [{"role": "user", "content": LONE}]},
            "messages.0.content",
        ),
        (
            llama,
            "/v1/chat/completions",
            {
                "model": base,
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": LONE}]},
                ],
            },
            "messages.1.content",
        ),
        (llama, "/v1/completions", {"model": base, "prompt": "x", "stop": [LONE]}, "stop"),
        (bert, "/v1/embeddings", {"model": enc, "input": LONE}, "input"),
        (bert, "/v1/embeddings", {"model": enc, "input": ["fine", LONE]}, "input"),
        (bert, "/v1/classify", {"model": enc, "input": [LONE]}, "input"),
    ]
    for client, url, body, field in cases:
        err = assert_error(raw_json(client, url, body), 422, "not valid Unicode", "lone surrogate")
        assert err["param"] == field, (url, body, err)
    r = raw_json(llama, "/v1/completions", {"model": LONE, "prompt": "x"})
    assert assert_error(r, 422)["param"] == "model"  # pydantic's own str check refuses it


def test_a_surrogate_embedding_does_not_fail_a_concurrent_one(bert: TestClient) -> None:
    enc = bert.app.state.darex.base_id
    good = {"model": enc, "input": ["good text"]}
    bad = {"model": enc, "input": [LONE]}
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda b: raw_json(bert, "/v1/embeddings", b), [good, bad] * 2))
    assert [r.status_code for r in rs] == [200, 422, 200, 422], [r.text for r in rs]


# ---- 3. embedding input bounds ------------------------------------------------------------


def test_embedding_inputs_are_1_to_256(bert: TestClient) -> None:
    enc = bert.app.state.darex.base_id
    for texts in ([], ["x"] * 257):
        r = bert.post("/v1/embeddings", json={"model": enc, "input": texts})
        assert assert_error(r, 422, "1 to 256")["param"] == "input"
    r = bert.post("/v1/embeddings", json={"model": enc, "input": ["x"] * 256})
    assert r.status_code == 200 and len(r.json()["data"]) == 256


def test_the_openai_client_gets_embeddings_as_base64_or_floats(bert: TestClient) -> None:
    """The openai client asks for base64 unless told otherwise and decodes it itself: both
    formats give the engine's vectors; a ``dimensions`` other than the model's is a 422."""
    import openai

    enc = bert.app.state.darex.base_id
    client = openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=bert, max_retries=0
    )
    texts = ["a wonderful film", "dull"]
    default = client.embeddings.create(model=enc, input=texts)
    floats = client.embeddings.create(model=enc, input=texts, encoding_format="float")
    raw = bert.post(
        "/v1/embeddings", json={"model": enc, "input": texts, "encoding_format": "base64"}
    )
    assert isinstance(raw.json()["data"][0]["embedding"], str)
    st = bert.app.state.darex
    want = asyncio.run(st.scheduler.embed(None, texts))
    width = len(want[0])
    for got in (default, floats):
        assert [d.embedding for d in got.data] == want  # float32 both ways: exact
    assert client.embeddings.create(model=enc, input="x", dimensions=width).data
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.embeddings.create(model=enc, input="x", dimensions=width - 1)
    assert e.value.body["param"] == "dimensions" and str(width) in e.value.body["message"]


# ---- 4. chat templates that refuse --------------------------------------------------------

ALTERNATE = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_a_chat_template_refusal_is_422_on_messages(llama: TestClient, monkeypatch) -> None:
    base = llama.app.state.darex.base_id
    monkeypatch.setattr(llama.app.state.darex.engine.tokenizer, "chat_template", ALTERNATE)
    user = {"role": "user", "content": "hi"}
    body = {"model": base, "max_tokens": 2, "messages": [user, user]}
    err = assert_error(llama.post("/v1/chat/completions", json=body), 422, "roles must alternate")
    assert err["param"] == "messages"
    body["messages"] = [user]
    assert llama.post("/v1/chat/completions", json=body).status_code == 200


# ---- 5. body size and the event loop ------------------------------------------------------


def test_json_bodies_over_the_cap_are_413(llama: TestClient) -> None:
    base = llama.app.state.darex.base_id
    body = json.dumps({"model": base, "prompt": "x" * MAX_JSON_BYTES}).encode()
    headers = {"content-type": "application/json"}
    err = assert_error(llama.post("/v1/completions", content=body, headers=headers), 413)
    assert err["code"] == "payload_too_large" and str(MAX_JSON_BYTES) in err["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + (1 << 20)]

    r = llama.post("/v1/completions", content=chunked(), headers=headers)
    assert assert_error(r, 413)["code"] == "payload_too_large"
    assert llama.get("/healthz").status_code == 200
    r = llama.post("/v1/completions", json={"model": base, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200, r.text


def test_uploads_are_not_held_to_the_json_cap(llama: TestClient) -> None:
    """/admin/models streams under max_upload_bytes: a body over the JSON cap reaches it."""
    files = [("files", ("pytorch_model.bin", b"\x80\x04" + b"x" * MAX_JSON_BYTES))]
    r = llama.post("/admin/models", headers=AUTH, data={"model_id": "p"}, files=files)
    assert_error(r, 422, "pickle")


class _SlowTokenizer:
    """The engine's tokenizer, but a call on a text holding ``BLOCK`` waits for ``gate``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, text: Any, *a: Any, **kw: Any) -> Any:
        if isinstance(text, str) and "BLOCK" in text:
            self.entered.set()
            self.gate.wait(30)
        return self.inner(text, *a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("/v1/completions", {"prompt": "BLOCK here"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "BLOCK here"}]}),
    ],
)
def test_tokenizing_does_not_hold_the_event_loop(
    llama: TestClient, monkeypatch, url: str, extra: dict
) -> None:
    st = llama.app.state.darex
    slow = _SlowTokenizer(st.engine.tokenizer)
    monkeypatch.setattr(st.engine, "tokenizer", slow)
    body = {"model": st.base_id, "max_tokens": 1, "temperature": 0, **extra}
    out: dict[str, Any] = {}
    post = threading.Thread(target=lambda: out.update(r=llama.post(url, json=body)))
    health = threading.Thread(target=lambda: out.update(h=llama.get("/healthz")))
    try:
        post.start()
        assert slow.entered.wait(30)
        health.start()
        health.join(5)
        answered = not health.is_alive()
    finally:
        slow.gate.set()
        post.join(30)
        health.join(30)
    assert answered, "/healthz waited for a tokenizer call"
    assert out["h"].status_code == 200 and out["r"].status_code == 200, out["r"].text


def test_a_failing_prompt_cancels_the_others_of_its_request(
    llama: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/v1/completions with several prompts: when one fails, the others stop instead of
    generating up to max_tokens for a response that is already an error."""
    from server.errors import ModelRetired

    sched = llama.app.state.darex.scheduler
    cancelled: list[int] = []
    calls = 0

    async def complete(model_id, ids, params):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ModelRetired(f"model {model_id!r} is being deleted")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(calls)
            raise

    monkeypatch.setattr(sched, "complete", complete)
    body = {"model": llama.app.state.darex.base_id, "prompt": ["a", "b", "c"], "max_tokens": 4}
    r = llama.post("/v1/completions", json=body)
    assert r.status_code == 404 and "being deleted" in r.text, r.text
    assert len(cancelled) == 2


# ---- 6. refusals that say what was wrong ---------------------------------------------------


def post_bytes(client: TestClient, url: str, data: bytes):
    return client.post(url, content=data, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"model": "m", "input":', ["not valid JSON", "Expecting value", "character 23"]),
        (b'{"model": "m"} trailing', ["not valid JSON", "Extra data", "character 15"]),
        (b'{"model": "m", "input": "\xff\xfe"}', ["not valid UTF-8", "0xff", "position 25"]),
        (b'{"model": "m", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}", ["nests too deeply"]),
    ],
    ids=["cut-off", "trailing", "not-utf8", "deep"],
)
def test_a_body_that_is_not_json_is_a_422_saying_why(
    bert: TestClient, data: bytes, words: list[str]
) -> None:
    """Not "There was an error parsing the body" (400), nor a character offset as the
    field: a 422 whose message says what is wrong with the body, on no field."""
    err = assert_error(post_bytes(bert, "/v1/classify", data), 422, *words)
    assert err["code"] == "invalid_request" and err["param"] is None, err


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": ["a", None]}, "input.1", ["input.1: Input should be a valid string"]),
        ({"input": 5}, "input", ["valid string", "valid list"]),
        ({"input": ""}, "input", ["the text is empty"]),
        ({"input": ["fine", ""]}, "input", ["text 1 is empty"]),
    ],
)
def test_inputs_of_the_wrong_shape_name_the_item(
    bert: TestClient, body: dict, param: str, words: list[str]
) -> None:
    enc = bert.app.state.darex.base_id
    for route in ("/v1/embeddings", "/v1/classify"):
        err = assert_error(bert.post(route, json={"model": enc, **body}), 422, *words)
        assert err["param"] == param, err
        assert "list[str]" not in err["message"] and "input.str" not in err["message"], err


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"temperature": "NaN"}, "temperature", ["finite number"]),
        ({"top_p": "Infinity"}, "top_p", ["finite number"]),
        ({"logprobs": 5}, "logprobs", ["not supported"]),
        ({"logprobs": 0}, "logprobs", ["not supported"]),  # completions' 0 asks for one
        ({"presence_penalty": 0.5}, "presence_penalty", ["not supported"]),
        ({"response_format": {"type": "json_object"}}, "response_format", ["not supported"]),
        ({"max_completion_tokens": 10**5}, "max_completion_tokens", ["limit of 512"]),
        ({"max_tokens": 100}, "max_tokens", ["prompt tokens and 100", "context of 256"]),
    ],
)
def test_sampling_refusals_name_the_field_the_client_sent(
    llama: TestClient, extra: dict, param: str, words: list[str]
) -> None:
    base = llama.app.state.darex.base_id
    content = "hello " * (200 if "max_tokens" in extra else 1)
    body = {"model": base, "messages": [{"role": "user", "content": content}], **extra}
    data = json.dumps(body).encode()  # NaN and Infinity as JSON's non-standard literals
    data = data.replace(b'"NaN"', b"NaN").replace(b'"Infinity"', b"Infinity")
    err = assert_error(post_bytes(llama, "/v1/chat/completions", data), 422, *words)
    assert err["param"] == param, err


def test_completions_default_length_follows_a_lower_server_limit(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """With DAREX_MAX_NEW_TOKENS=5 a completion that sends no max_tokens (or null) gets 5
    tokens, not a 422 about the 16 it never asked for; asking for more is still refused."""
    settings = make_settings(tmp_path, str(tiny_llama_dir), max_new_tokens=5)
    with TestClient(create_app(settings)) as c:
        body = {"model": c.app.state.darex.base_id, "prompt": "hi", "temperature": 0}
        for extra in ({}, {"max_tokens": None}):
            r = c.post("/v1/completions", json={**body, **extra})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 5
        err = assert_error(c.post("/v1/completions", json={**body, "max_tokens": 6}), 422)
        assert err["param"] == "max_tokens" and "limit of 5" in err["message"], err


def test_the_off_values_of_unsupported_parameters_are_accepted(llama: TestClient) -> None:
    """What clients send by default (logprobs false, penalties 0, best_of 1, text format)."""
    base = llama.app.state.darex.base_id
    off = {
        "logprobs": False,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
    }
    msgs = [{"role": "user", "content": "hi"}]
    r = llama.post(
        "/v1/chat/completions", json={"model": base, "messages": msgs, "max_tokens": 2, **off}
    )
    assert r.status_code == 200, r.text
    body = {"model": base, "prompt": "hi", "max_tokens": 2, "best_of": 1, "logprobs": None}
    assert llama.post("/v1/completions", json=body).status_code == 200


def test_router_and_job_errors_carry_a_code_and_param(llama: TestClient) -> None:
    err = assert_error(llama.get("/v1/nowhere"), 404)
    assert (err["code"], err["type"]) == ("not_found", "not_found_error"), err
    err = assert_error(llama.get("/v1/classify"), 405)
    assert err["code"] == "method_not_allowed", err
    err = assert_error(llama.get("/admin/jobs/nope", headers=AUTH), 404, "nope")
    assert (err["code"], err["param"]) == ("job_not_found", "job_id"), err
