"""The bad-input corpus over real HTTP: uploads, model ids, request bodies.

Every case gets a 4xx whose body has the OpenAI error shape and a message that says what
is wrong (value checks that need every byte read answer 202 and the job fails with that
message), and the store and registry are exactly as before.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from storage.bases import resolve_base
from storage.ingest import ingest
from storage.store import DeltaStore
from tests.reliability.conftest import snapshot
from tests.reliability.corpus import BAD_MODEL_IDS, CHECKPOINT_CASES, Case
from tests.reliability.live import AUTH, serve_in_thread, upload_files, wait_job

MAX_UPLOAD = 12 << 20  # the tiny Llama checkpoint is ~8 MiB
MAX_TENSORS = 64


class Live:
    def __init__(self, url: str, app, store: DeltaStore, base_id: str) -> None:
        self.url, self.app, self.store, self.base_id = url, app, store, base_id
        self.client = httpx.Client(base_url=url, timeout=60)


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_llama_dir: Path, good_ft_dir: Path) -> Iterator[Live]:
    data = tmp_path_factory.mktemp("rel-http")
    store = DeltaStore(data)
    ingest(
        store, "good", good_ft_dir, resolve_base(tiny_llama_dir, data), p=0.9, show_progress=False
    )
    with serve_in_thread(
        data, tiny_llama_dir, max_upload_bytes=MAX_UPLOAD, max_tensors=MAX_TENSORS
    ) as (url, app):
        lv = Live(url, app, store, app.state.darex.base_id)
        yield lv
        lv.client.close()
    store.close()


def assert_error(r: httpx.Response, status: int | tuple[int, ...], match: str = "") -> dict:
    """A 4xx with the OpenAI error body; returns ``error``."""
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert err["type"] and err["message"], err
    assert re.search(match, err["message"], re.S), (match, err["message"])
    return err


def unchanged(live: Live, before: dict) -> None:
    """Same names, version, blobs and temp files; the upload folder is gone (a failed job
    removes it right after it records the failure, hence the short wait)."""
    assert snapshot(live.store) == before
    uploads = live.store.root / "uploads"
    deadline = time.monotonic() + 10
    while uploads.exists() and any(uploads.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not uploads.exists() or not any(uploads.iterdir()), list(uploads.iterdir())


# ---------------------------------------------------------------- uploads


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[c.name for c in CHECKPOINT_CASES])
def test_bad_upload_is_refused(
    case: Case, live: Live, tiny_llama_dir, tiny_bert_dir, tmp_path, pickle_marker, category
) -> None:
    category(f"upload/{case.category}")
    folder = case.build(tmp_path / "ft", tiny_llama_dir, tiny_bert_dir)
    before = snapshot(live.store)
    data = {"model_id": f"victim-{case.name.strip('+-')}", "rate": "0.9"}
    if case.method:
        data["method"] = case.method
    r = live.client.post("/admin/models", headers=AUTH, data=data, files=upload_files(folder))
    if case.when == "sync":
        assert_error(r, 422, case.match if case.category != "pickle" else "pickle|readable")
    else:
        assert r.status_code == 202, r.text
        job = wait_job(live.client, r.json()["job_id"])
        assert job["state"] == "failed" and re.search(case.match, job["error"]), job
    unchanged(live, before)


def test_oversized_upload_is_413_with_and_without_content_length(live: Live, category) -> None:
    category("upload/size-limit")
    before = snapshot(live.store)
    big = b"\0" * (MAX_UPLOAD + 1)
    files = [("files", ("model.safetensors", big))]
    r = live.client.post("/admin/models", headers=AUTH, data={"model_id": "big"}, files=files)
    assert_error(r, 413, "exceeds")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="model_id"\r\n\r\nbig\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="files"; '
        yield b'filename="m.safetensors"\r\n\r\n'
        for _ in range(MAX_UPLOAD // (1 << 20) + 2):
            yield b"\0" * (1 << 20)
        yield b"\r\n--b--\r\n"

    headers = {**AUTH, "content-type": "multipart/form-data; boundary=b"}
    r = live.client.post("/admin/models", headers=headers, content=chunked())
    assert_error(r, 413, "exceeds")
    unchanged(live, before)


def assert_upload_refused(live: Live, folder: Path, model_id: str, match: str) -> None:
    """Uploading ``folder`` is a 422 whose message matches, and the store is unchanged."""
    before = snapshot(live.store)
    r = live.client.post(
        "/admin/models", headers=AUTH, data={"model_id": model_id}, files=upload_files(folder)
    )
    assert_error(r, 422, match)
    unchanged(live, before)


def test_too_many_tensors_is_refused_at_upload(live: Live, good_ft_dir, tmp_path, category) -> None:
    """``DAREX_MAX_TENSORS`` is checked with the headers, before a job exists (422)."""
    category("upload/tensor-limit")
    from safetensors.torch import load_file, save_file

    t = load_file(str(good_ft_dir / "model.safetensors"))
    t.update({f"extra.{i}.weight": t["model.norm.weight"].clone() for i in range(MAX_TENSORS)})
    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "config.json").write_bytes((good_ft_dir / "config.json").read_bytes())
    save_file(t, str(folder / "model.safetensors"))
    assert_upload_refused(live, folder, "many", "tensors")


def test_upload_file_names_are_not_paths(live: Live, tmp_path: Path, category) -> None:
    """A client names files, never where they go: a name is cut to its last component and
    written inside a fresh upload folder; the server reads no other path."""
    category("upload/filename")
    before = snapshot(live.store)
    names = ("../../escape.safetensors", "/etc/passwd", "..", "a\x00b.safetensors", ".env", "")
    for name in names:
        files = [("files", (name, b"x")), ("files", ("config.json", b"{}"))]
        r = live.client.post("/admin/models", headers=AUTH, data={"model_id": "fn"}, files=files)
        assert_error(r, 422)
    assert not (live.store.root.parent / "escape.safetensors").exists()
    assert not (live.store.root / "escape.safetensors").exists()
    unchanged(live, before)


# ---------------------------------------------------------------- model ids


@pytest.mark.parametrize("model_id", BAD_MODEL_IDS, ids=[ascii(m)[:24] for m in BAD_MODEL_IDS])
def test_bad_model_id_over_http(model_id: str, live: Live, good_ft_dir, category) -> None:
    category("model_id/http")
    before = snapshot(live.store)
    r = live.client.post(
        "/admin/models", headers=AUTH, data={"model_id": model_id}, files=upload_files(good_ft_dir)
    )
    assert_error(r, 422, "model_id")
    quoted = urllib.parse.quote(model_id, safe="")
    if quoted not in ("", ".", ".."):
        for method in ("GET", "DELETE"):
            r = live.client.request(method, f"/admin/models/{quoted}", headers=AUTH)
            assert 400 <= r.status_code < 500, (method, r.status_code, r.text[:300])
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = {"model": model_id, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
        assert_error(live.client.post(path, json=body), (404, 422))
    unchanged(live, before)


# ---------------------------------------------------------------- request bodies

_CHAT = [{"role": "user", "content": "hello"}]
BODY_CASES: list[tuple[str, str, object, str]] = [
    # (name, path, body (dict, or raw bytes), regex of the message)
    ("model-int", "/v1/completions", {"model": 123, "prompt": "hi"}, "model"),
    ("model-null", "/v1/completions", {"model": None, "prompt": "hi"}, "model"),
    ("model-missing", "/v1/completions", {"prompt": "hi"}, "model"),
    ("model-empty", "/v1/completions", {"model": "", "prompt": "hi"}, "model"),
    ("model-long", "/v1/completions", {"model": "m" * 10_000, "prompt": "hi"}, "model"),
    ("prompt-dict", "/v1/completions", {"model": "good", "prompt": {"a": 1}}, "prompt"),
    ("prompt-missing", "/v1/completions", {"model": "good"}, "prompt"),
    ("prompt-empty", "/v1/completions", {"model": "good", "prompt": ""}, "prompt"),
    ("prompt-empty-list", "/v1/completions", {"model": "good", "prompt": []}, "prompt"),
    ("prompt-list-of-empty", "/v1/completions", {"model": "good", "prompt": [""]}, "prompt"),
    ("prompt-too-many", "/v1/completions", {"model": "good", "prompt": ["a"] * 65}, "prompt"),
    (
        "prompt-over-context",
        "/v1/completions",
        {"model": "good", "prompt": "word " * 400},
        "prompt|context",
    ),
    (
        "max-tokens-zero",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "max_tokens": 0},
        "max_tokens",
    ),
    (
        "max-tokens-negative",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "max_tokens": -5},
        "max_tokens",
    ),
    (
        "max-tokens-huge",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "max_tokens": 10**12},
        "max_tokens",
    ),
    (
        "max-tokens-2^70",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "max_tokens": 2**70},
        "max_tokens",
    ),
    (
        "max-tokens-string",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "max_tokens": "ten"},
        "max_tokens",
    ),
    (
        "max-tokens-float",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "max_tokens": 3.5},
        "max_tokens",
    ),
    (
        "temperature-negative",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "temperature": -1},
        "temperature",
    ),
    (
        "temperature-string",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "temperature": "hot"},
        "temperature",
    ),
    (
        "temperature-nan",
        "/v1/completions",
        b'{"model": "good", "prompt": "hi", "temperature": NaN}',
        "temperature|JSON",
    ),
    (
        "top-p-infinity",
        "/v1/completions",
        b'{"model": "good", "prompt": "hi", "top_p": Infinity}',
        "top_p|JSON",
    ),
    ("top-p-negative", "/v1/completions", {"model": "good", "prompt": "hi", "top_p": -1}, "top_p"),
    (
        "prompt-token-past-vocab",
        "/v1/completions",
        {"model": "good", "prompt": [1, 2, 10**9]},
        "prompt.*vocabulary",
    ),
    ("prompt-token-float", "/v1/completions", {"model": "good", "prompt": [1, 2.5]}, "prompt.1"),
    (
        "seed-below-int64",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "seed": -(2**63) - 1},
        "seed",
    ),
    ("seed-2^63", "/v1/completions", {"model": "good", "prompt": "hi", "seed": 2**63}, "seed"),
    (
        "stop-five",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "stop": list("abcde")},
        "stop",
    ),
    (
        "stop-empty-string",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "stop": [""]},
        "stop",
    ),
    ("n-two", "/v1/completions", {"model": "good", "prompt": "hi", "n": 2}, "n"),
    (
        "stream-string",
        "/v1/completions",
        {"model": "good", "prompt": "hi", "stream": "maybe"},
        "stream",
    ),
    ("body-array", "/v1/completions", [1, 2, 3], "body|object|dict|valid"),
    ("body-string", "/v1/completions", "hello", "body|object|dict|valid"),
    ("body-not-json", "/v1/completions", b"{model: good", "JSON|json|decode"),
    ("body-empty", "/v1/completions", b"", "body|JSON|json|required|Field"),
    ("body-deep-nesting", "/v1/completions", b"[" * 50_000 + b"]" * 50_000, "."),
    ("body-invalid-utf8", "/v1/completions", b'{"model": "good", "prompt": "\xff\xfe"}', "."),
    ("messages-string", "/v1/chat/completions", {"model": "good", "messages": "hi"}, "messages"),
    ("messages-empty", "/v1/chat/completions", {"model": "good", "messages": []}, "messages"),
    (
        "messages-bad-role",
        "/v1/chat/completions",
        {"model": "good", "messages": [{"role": "root", "content": "x"}]},
        "role",
    ),
    (
        "messages-content-int",
        "/v1/chat/completions",
        {"model": "good", "messages": [{"role": "user", "content": 5}]},
        "content",
    ),
    (
        "chat-max-tokens-negative",
        "/v1/chat/completions",
        {"model": "good", "messages": _CHAT, "max_tokens": -1},
        "max_tokens",
    ),
    (
        "chat-max-completion-huge",
        "/v1/chat/completions",
        {"model": "good", "messages": _CHAT, "max_completion_tokens": 10**9},
        "max_completion_tokens: 1000000000",
    ),
    ("classify-causal-model", "/v1/classify", {"model": "good", "input": "x"}, "classif|causal"),
    ("classify-input-empty-list", "/v1/classify", {"model": "good", "input": []}, "input"),
    ("classify-input-int", "/v1/classify", {"model": "good", "input": 7}, "input"),
    (
        "embeddings-input-empty-list",
        "/v1/embeddings",
        {"model": "good", "input": []},
        "input|causal|embed",
    ),
    ("embeddings-input-dict", "/v1/embeddings", {"model": "good", "input": {"a": 1}}, "input"),
    (
        "unknown-model",
        "/v1/completions",
        {"model": "no-such-model", "prompt": "hi"},
        "no-such-model",
    ),
]


@pytest.mark.parametrize("name,path,body,match", BODY_CASES, ids=[c[0] for c in BODY_CASES])
def test_bad_body_is_a_4xx(name: str, path: str, body, match: str, live: Live, category) -> None:
    category("body/" + path.rsplit("/", 1)[-1])
    before = snapshot(live.store)
    if isinstance(body, bytes):
        r = live.client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = live.client.post(
            path, content=json.dumps(body), headers={"content-type": "application/json"}
        )
    assert_error(r, (400, 404, 413, 422), match)
    unchanged(live, before)
    # and the server still answers a good request afterwards
    ok = live.client.post(
        "/v1/completions", json={"model": "good", "prompt": "hi", "max_tokens": 2}
    )
    assert ok.status_code == 200, ok.text


def test_wrong_content_type_and_method(live: Live, category) -> None:
    category("body/protocol")
    r = live.client.post(
        "/v1/completions", content=b"model=good", headers={"content-type": "text/plain"}
    )
    assert_error(r, (415, 422))
    r = live.client.get("/v1/completions")
    assert_error(r, 405)
    r = live.client.post(
        "/admin/models", headers={**AUTH, "content-type": "application/json"}, content=b"{}"
    )
    assert_error(r, (415, 422), "multipart")


def test_lora_adapter_with_too_many_tensors_is_refused(
    live: Live, tiny_llama_dir: Path, tmp_path: Path, category
) -> None:
    """The tensor limit holds for PEFT adapters too (headers only, 422, nothing stored)."""
    category("upload/tensor-limit")
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    cfg = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    folder = tmp_path / "adapter"
    get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama_dir), cfg).save_pretrained(folder)
    t = load_file(str(folder / "adapter_model.safetensors"))
    one = next(iter(t.values()))
    t.update({f"base_model.model.extra.{i}.weight": one.clone() for i in range(MAX_TENSORS)})
    save_file(t, str(folder / "adapter_model.safetensors"))
    assert_upload_refused(live, folder, "many-lora", "DAREX_MAX_TENSORS")
