"""A stored delta is served only on the base it was ingested against, and a registered model
that lost a blob answers a clear ``missing_blob`` error. Real store, real app and Engine on
two same-shape tiny Llamas (seed 0 and seed 1) that differ only in their weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.engine import Engine
from storage.bases import BaseInfo, resolve_base
from storage.errors import BaseMismatch
from storage.ingest import ingest
from storage.store import DeltaStore
from tests.conftest import build_tiny_llama
from tests.server.finetunes import save_causal_finetune
from tests.server.live import ADMIN_TOKEN, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
OPTS = {"method": "dare", "p": 0.9, "task": "causal-lm", "show_progress": False}


def complete(client: TestClient, model: str):
    body = {"model": model, "prompt": "hello world", "max_tokens": 4, "temperature": 0}
    return client.post("/v1/completions", json=body)


def error_of(r, status: int, code: str, *words: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    for w in words:
        assert w in err["message"], (w, err["message"])
    assert "Traceback" not in r.text
    return err["message"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict:
    """A store holding fine-tunes of base 0 (``ft-0``) and of base 1 (``ft-1``, ``gone-*``)."""
    root = tmp_path_factory.mktemp("base-check")
    base1_dir = build_tiny_llama(root / "llama-seed1", seed=1)
    data = root / "data"
    info0 = resolve_base(str(tiny_llama_dir), data)
    info1 = resolve_base(str(base1_dir), data)
    assert info0.sha256 != info1.sha256
    ft0 = save_causal_finetune(tiny_llama_dir, root / "ft-on-0", seed=5)
    ft1 = save_causal_finetune(base1_dir, root / "ft-on-1", seed=5)
    store = DeltaStore(data)
    try:
        ingest(store, "ft-0", ft0, info0, seed=1, **OPTS)
        ingest(store, "ft-1", ft1, info1, seed=1, **OPTS)
        ingest(store, "gone-manifest", ft1, info1, seed=2, **OPTS)
        ingest(store, "gone-tensor", ft1, info1, seed=3, **OPTS)
    finally:
        store.close()
    return {"data": data, "info0": info0, "info1": info1}


@pytest.fixture(scope="module")
def client(world: dict) -> Iterator[TestClient]:
    """The server on base 1."""
    app = create_app(make_settings(world["data"], str(world["info1"].path)))
    with TestClient(app) as c:
        yield c


def test_a_delta_of_another_base_is_refused_and_not_listed(client: TestClient, world) -> None:
    sha0, sha1 = world["info0"].sha256, world["info1"].sha256
    engine = client.app.state.darex.engine
    msg = error_of(complete(client, "ft-0"), 422, "base_mismatch", "ft-0", sha0, sha1)
    assert "re-ingest" in msg.lower() or "again against this base" in msg
    body = {"model": "ft-0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    error_of(client.post("/v1/chat/completions", json=body), 422, "base_mismatch", sha0)
    assert engine.active is None and engine.base_fingerprint() == engine.loaded_fingerprint

    assert complete(client, "ft-1").status_code == 200  # the base's own fine-tune serves
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "ft-1" in ids and "ft-0" not in ids
    assert engine.base_sha256 == sha1  # the same weights_sha256 that ingest recorded
    info = client.get("/admin/models/ft-0", headers=AUTH)  # the operator can still inspect it
    assert info.status_code == 200 and info.json()["base_sha256"] == sha0


def test_engine_checks_the_base_once_per_model_not_per_request(world, monkeypatch) -> None:
    info0: BaseInfo = world["info0"]
    info1: BaseInfo = world["info1"]
    store = DeltaStore(world["data"])
    eng = Engine.load(info1, store, device="cpu", dtype="float32")
    try:
        with pytest.raises(BaseMismatch, match=info0.sha256):
            eng.task_of("ft-0")
        with pytest.raises(BaseMismatch, match=info1.sha256):
            eng.activate("ft-0")
        assert eng.active is None and eng.base_fingerprint() == eng.loaded_fingerprint

        assert eng.task_of("ft-1") == "causal-lm"
        eng.activate("ft-1")
        eng.restore()
        reads = []
        real = store.manifest
        monkeypatch.setattr(store, "manifest", lambda mid: reads.append(mid) or real(mid))
        for _ in range(3):  # cached: no manifest read, no comparison per request
            assert eng.task_of("ft-1") == "causal-lm"
            eng.activate("ft-1")
            eng.restore()
        assert reads == []
    finally:
        eng.close()
        store.close()
    # The same store on base 0: the other way round.
    store = DeltaStore(world["data"])
    eng = Engine.load(info0, store, device="cpu", dtype="float32")
    try:
        listed = set(store.models())  # this base's fine-tunes (and unreadable manifests)
        assert "ft-0" in listed and not listed & {"ft-1", "gone-tensor"}
        assert set(store.models(base_sha256=info1.sha256)) >= {"ft-1"}
        eng.activate("ft-0")
        with pytest.raises(BaseMismatch, match="ft-1"):
            eng.activate("ft-1")
    finally:
        eng.close()
        store.close()


def test_a_lost_manifest_blob_is_a_clear_missing_blob_error(client: TestClient) -> None:
    store = client.app.state.darex.store
    store.blobs.path(store.registry.get_model("gone-manifest")).unlink()
    error_of(complete(client, "gone-manifest"), 500, "missing_blob", "gone-manifest", "verify")
    r = client.get("/admin/models/gone-manifest", headers=AUTH)
    error_of(r, 500, "missing_blob", "gone-manifest")
    assert "gone-manifest" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert complete(client, "ft-1").status_code == 200  # the others keep serving


def test_a_lost_tensor_blob_is_a_clear_missing_blob_error(client: TestClient) -> None:
    store = client.app.state.darex.store
    m = store.manifest("gone-tensor")
    others = store.manifest("ft-1").keys()
    name, entry = max(
        ((n, e) for n, e in m.deltas.items() if e.key not in others), key=lambda x: x[1].nbytes
    )
    store.blobs.path(entry.key).unlink()
    for _ in range(2):  # nothing bad is cached
        error_of(complete(client, "gone-tensor"), 500, "missing_blob", "gone-tensor", name)
    assert complete(client, "ft-1").status_code == 200
