"""The Ray app's request handling (``Runtime.infer``) without a Ray cluster: the same
schemas, limits and refusals as ``darex serve``'s routes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.errors import InvalidRequest
from tests.server.live import make_settings

pytest.importorskip("ray", reason="Ray is not installed: pip install 'ray[serve]==2.60.*'")


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator:
    from server.ray_app import Runtime

    runtime = Runtime(make_settings(tmp_path_factory.mktemp("ray-rt"), str(tiny_llama_dir)))
    try:
        yield runtime
    finally:
        runtime.scheduler.close()


def infer(rt, kind: str, body: dict) -> dict:
    return asyncio.run(rt.infer(kind, None, body))


def test_completions_and_chat_answer_with_the_apps_defaults(rt) -> None:
    out = infer(rt, "completions", {"model": rt.base_name, "prompt": "hello", "max_tokens": 3})
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] <= 3
    msgs = [{"role": "user", "content": "hi"}]
    out = infer(rt, "chat", {"model": rt.base_name, "messages": msgs, "max_tokens": 2})
    assert out["choices"][0]["message"]["role"] == "assistant"


def test_completions_echo_and_default_length_as_darex_serve(rt, monkeypatch) -> None:
    """``echo`` puts the prompt before the completion; without max_tokens a completion is
    16 tokens, or the server's DAREX_MAX_NEW_TOKENS when that is lower."""
    body = {"model": rt.base_name, "prompt": "hello", "max_tokens": 3, "temperature": 0}
    plain = infer(rt, "completions", body)["choices"][0]["text"]
    echoed = infer(rt, "completions", {**body, "echo": True})["choices"][0]["text"]
    assert echoed == "hello" + plain
    del body["max_tokens"]
    assert infer(rt, "completions", body)["usage"]["completion_tokens"] == 16
    monkeypatch.setattr(rt.settings, "max_new_tokens", 5)
    assert infer(rt, "completions", body)["usage"]["completion_tokens"] == 5
    with pytest.raises(InvalidRequest, match="max_tokens: 6 is more than"):
        infer(rt, "completions", {**body, "max_tokens": 6})


@pytest.mark.parametrize(
    ("kind", "extra", "param", "words"),
    [
        ("completions", {"temperature": float("nan")}, "temperature", "finite number"),
        ("completions", {"logprobs": 1}, "logprobs", "not supported"),
        ("chat", {"tools": [{"type": "function"}]}, "tools", "not supported"),
        ("completions", {"max_tokens": 10**6}, "max_tokens", "limit of 512"),
        ("chat", {"max_completion_tokens": 10**6}, "max_completion_tokens", "limit of 512"),
        ("completions", {"prompt": ["a", None]}, "prompt.1", "valid string"),
        ("completions", {"prompt": ["a", "b"]}, "prompt", "one prompt"),
        ("embeddings", {"input": "x"}, "model", "feature-extraction"),
    ],
)
def test_refusals_name_the_field_as_darex_serve_does(
    rt, kind: str, extra: dict, param: str, words: str
) -> None:
    body = {"model": rt.base_name, "prompt": "hello", **extra}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    with pytest.raises(Exception) as e:
        infer(rt, kind, body)
    if isinstance(e.value, InvalidRequest):
        assert e.value.field == param, (e.value.field, str(e.value))
    assert words in str(e.value), str(e.value)
