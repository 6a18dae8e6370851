"""Ray Serve with model multiplexing on a local Ray instance: two replicas, two fine-tunes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import free_port
from tests.deploy.finetunes import TEXTS, make_classifier, reference_probs

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'ray[serve]==2.60.*'")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"cls-a": ["negative", "positive"], "cls-b": ["sports", "politics", "science"]}
API_KEY = "ray-inference-key-0123456789"
KEY = {"Authorization": f"Bearer {API_KEY}"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from storage.bases import resolve_base
    from storage.ingest import ingest
    from storage.store import DeltaStore

    root = tmp_path_factory.mktemp("ray-store")
    data = root / "data"
    registry = f"sqlite:///{data / 'registry.sqlite3'}"
    store = DeltaStore(data, registry)
    base = resolve_base(str(tiny_bert_dir), data)
    ckpts = {}
    for seed, (model_id, labels) in enumerate(LABELS.items(), start=1):
        ckpts[model_id] = make_classifier(tiny_bert_dir, root / model_id, labels, seed)
        # p = 0 and fp32 values: the stored delta is exact, so answers equal the checkpoint's
        ingest(store, model_id, ckpts[model_id], base, method="dare", p=0.0,
               value_dtype="float32", show_progress=False)  # fmt: skip
    store.close()
    return {"data": data, "registry": registry, "ckpts": ckpts}


@pytest.fixture(scope="module")
def ray_url(store_dir: dict, tiny_bert_dir: Path) -> Iterator[str]:
    from server.ray_app import build_app

    port = free_port()
    # Ray Serve kills a proxy that is not ready within 5 s; on a 2-core runner busy with
    # the rest of the suite its start can take longer (seen: killed three times in a row,
    # every test of the module errored). The actors inherit this environment.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        mp.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "DAREX_LOG_JSON": "false"}},
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            target = build_app(
                {
                    "num_replicas": 2,
                    "num_cpus": 0.5,
                    "base": str(tiny_bert_dir),
                    "data_dir": str(store_dir["data"]),
                    "registry_url": store_dir["registry"],
                    "device": "cpu",
                    "dtype": "float32",
                    "env": "development",
                    "api_key": API_KEY,
                }
            )
            serve.run(target, blocking=False, name="darex")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


def _classify(url: str, model: str, headers: dict | None = None) -> httpx.Response:
    body = {"model": model, "input": TEXTS}
    return httpx.post(
        f"{url}/v1/classify", json=body, headers=KEY if headers is None else headers, timeout=60
    )


def test_each_model_id_gets_its_own_finetune(ray_url: str, store_dir: dict) -> None:
    assert httpx.get(f"{ray_url}/readyz", timeout=30).status_code == 200
    expected = {m: reference_probs(c, TEXTS) for m, c in store_dir["ckpts"].items()}
    assert expected["cls-a"][0] != pytest.approx(expected["cls-b"][0][:2], abs=1e-3)
    served_by: dict[str, list[str]] = {m: [] for m in LABELS}
    for model in ["cls-a", "cls-b", "cls-a", "cls-b", "cls-b", "cls-a"]:
        r = _classify(ray_url, model)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == model
        for row, want in zip(body["data"], expected[model], strict=True):
            labels = LABELS[model]
            assert list(row["scores"]) == labels  # its own head, its own label names
            assert [row["scores"][k] for k in labels] == pytest.approx(want, abs=1e-5)
            assert row["label"] == labels[max(range(len(want)), key=want.__getitem__)]
        served_by[model].append(r.headers["x-darex-replica"])
    print("replicas per model:", served_by)


def test_unknown_model_is_404_with_openai_error(ray_url: str) -> None:
    r = _classify(ray_url, "no-such-model")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert "no-such-model" in r.json()["error"]["message"]


def test_models_lists_base_and_registry(ray_url: str, tiny_bert_dir: Path) -> None:
    models = httpx.get(f"{ray_url}/v1/models", headers=KEY, timeout=30).json()
    ids = [m["id"] for m in models["data"]]
    assert ids == [str(tiny_bert_dir), *sorted(LABELS)]
    for card in models["data"]:  # GET /v1/models/{id}, a base id with slashes included
        r = httpx.get(f"{ray_url}/v1/models/{card['id']}", headers=KEY, timeout=30)
        assert r.status_code == 200, r.text
        if card["owned_by"] == "base":  # created: when the answering replica started
            card = {**card, "created": r.json()["created"]}
        assert r.json() == card
    r = httpx.get(f"{ray_url}/v1/models/no-such-model", headers=KEY, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert httpx.get(f"{ray_url}/v1/models/cls-a", timeout=30).status_code == 401


def test_multiplexing_keeps_a_model_on_the_replica_that_holds_it(ray_url: str) -> None:
    for model in LABELS:  # load both, then let the routers learn where they are
        assert _classify(ray_url, model).status_code == 200
    time.sleep(2.0)
    for model in LABELS:
        seen = {_classify(ray_url, model).headers["x-darex-replica"] for _ in range(4)}
        assert len(seen) == 1, f"{model} bounced between replicas {seen}"


def test_inference_needs_the_api_key_when_one_is_set(ray_url: str) -> None:
    """DAREX_API_KEY guards the Ray app's /v1 routes as it guards `darex serve`'s."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"}):
        r = _classify(ray_url, "cls-a", headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers.get("www-authenticate") == "Bearer"
        m = httpx.get(f"{ray_url}/v1/models", headers=headers, timeout=30)
        assert m.status_code == 401, m.text
    assert _classify(ray_url, "cls-a").status_code == 200
    assert httpx.get(f"{ray_url}/healthz", timeout=30).status_code == 200  # operations stay open


def test_a_body_over_the_json_cap_is_413(ray_url: str) -> None:
    from server.api.app import MAX_JSON_BYTES

    body = {"model": "cls-a", "input": "x" * (MAX_JSON_BYTES + 1)}
    r = httpx.post(f"{ray_url}/v1/classify", json=body, headers=KEY, timeout=60)
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "payload_too_large"
