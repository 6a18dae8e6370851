"""Two replicas sharing one redis-server and one blob store.

Each replica is the container's entry point, ``docker/entrypoint.sh``, run
outside Docker (no engine here) with the environment compose would give it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import REDIS_SERVER, RedisServer
from tests.deploy.finetunes import TEXTS, make_classifier, reference_probs
from tests.deploy.procs import Replica, admin

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TTL_S = 0.5
LABELS = {"cls-a": ["negative", "positive"], "cls-b": ["sports", "politics", "science"]}


@pytest.fixture(scope="module")
def ckpts(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replica-ckpts")
    return {
        m: make_classifier(tiny_bert_dir, root / m, labels, seed)
        for seed, (m, labels) in enumerate(LABELS.items(), start=1)
    }


@pytest.fixture(scope="module")
def redis_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the module (the replicas outlive a single test)."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server not installed: apt-get install -y redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(
    redis_shared: RedisServer, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Replica]]:
    """Replicas a and b: same Redis registry, same data dir (blob store), short registry TTL."""
    tmp_path = tmp_path_factory.mktemp("replicas")
    redis_server = redis_shared
    env = {
        "DAREX_REGISTRY_URL": redis_server.url,
        "DAREX_DATA_DIR": str(tmp_path / "shared-data"),  # one blob store for both
        "DAREX_BASE": str(tiny_bert_dir),
        "DAREX_REGISTRY_TTL_S": str(TTL_S),
    }
    reps = [Replica(name, tmp_path, env) for name in ("a", "b")]
    try:
        for r in reps:
            r.wait_ready()
        yield reps
    finally:
        codes = {r.name: r.stop() for r in reps}
    for r in reps:  # SIGTERM -> graceful shutdown; uvicorn re-raises the signal when done
        assert codes[r.name] in (0, -signal.SIGTERM), r.tail()


def test_entrypoint_comes_up_ready(replicas, tiny_bert_dir: Path) -> None:
    for rep in replicas:
        r = httpx.get(f"{rep.url}/readyz", timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["registry"] == "ok"  # the Redis registry answers
        assert httpx.get(f"{rep.url}/healthz", timeout=10).json() == {"status": "ok"}
        models = httpx.get(f"{rep.url}/v1/models", timeout=10).json()["data"]
        assert models[0]["id"] == r.json()["base"] == str(tiny_bert_dir)


def upload(rep: Replica, model_id: str, ckpt: Path) -> None:
    """Multipart upload through ``rep``, then wait for its ingest job to finish."""
    files = [
        ("files", (name, (ckpt / name).read_bytes()))
        for name in ("model.safetensors", "config.json")
    ]
    data = {"model_id": model_id, "method": "dare", "rate": "0.0"}
    r = httpx.post(f"{rep.url}/admin/models", files=files, data=data, headers=admin(), timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = httpx.get(f"{rep.url}/admin/jobs/{job}", headers=admin(), timeout=10).json()
        if state["state"] in ("done", "failed"):
            assert state["state"] == "done", state
            return
        time.sleep(0.1)
    raise TimeoutError(f"ingest of {model_id} not done: {state}")


def classify(rep: Replica, model: str) -> httpx.Response:
    return httpx.post(f"{rep.url}/v1/classify", json={"model": model, "input": TEXTS}, timeout=30)


def probs(r: httpx.Response, labels: list[str]) -> list[list[float]]:
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    assert all(list(row["scores"]) == labels for row in rows), rows
    return [[row["scores"][k] for k in labels] for row in rows]


def until(fn, timeout: float, what: str):
    """Poll ``fn`` until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = fn()
        if out:
            return out
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout}s")


def test_upload_on_a_serves_on_b_and_delete_on_b_reaches_a(replicas, ckpts) -> None:
    a, b = replicas
    upload(a, "cls-a", ckpts["cls-a"])
    want = reference_probs(ckpts["cls-a"], TEXTS)
    from_b = probs(classify(b, "cls-a"), LABELS["cls-a"])  # B never saw the upload
    from_a = probs(classify(a, "cls-a"), LABELS["cls-a"])
    assert from_a == from_b  # one model, the same answer on every replica
    assert from_b == [pytest.approx(w, abs=2e-3) for w in want]  # fp16 values, p = 0

    # both replicas now hold the decoded delta; delete through B
    r = httpx.delete(f"{b.url}/admin/models/cls-a", headers=admin(), timeout=30)
    assert r.status_code == 200, r.text
    assert classify(b, "cls-a").status_code == 404
    t0 = time.monotonic()
    gone = until(lambda: classify(a, "cls-a").status_code == 404, 5 * TTL_S + 2, "404 on A")
    assert gone and time.monotonic() - t0 < 5 * TTL_S + 2
    body = classify(a, "cls-a").json()
    assert body["error"]["code"] == "model_not_found" and "cls-a" in body["error"]["message"]
    ids = {m["id"] for m in httpx.get(f"{a.url}/v1/models", timeout=10).json()["data"]}
    assert "cls-a" not in ids


def test_redis_outage_gives_503_and_service_resumes(replicas, ckpts, redis_shared) -> None:
    a, b = replicas
    redis_server = redis_shared
    upload(b, "cls-b", ckpts["cls-b"])
    before = probs(classify(a, "cls-b"), LABELS["cls-b"])  # cached on A from here on

    redis_server.stop(save=True)
    ready = until(
        lambda: (r := httpx.get(f"{a.url}/readyz", timeout=10)).status_code == 503 and r,
        10,
        "/readyz 503",
    )
    assert ready.json()["checks"]["registry"].startswith("unavailable")
    for model in ("cls-b", "never-uploaded"):  # cached or not: this replica cannot vouch for it
        r = until(lambda m=model: (x := classify(a, m)).status_code == 503 and x, 5, "503")
        err = r.json()["error"]
        assert err["type"] == "service_unavailable" and "registry" in err["message"], err
    assert a.proc.poll() is None and b.proc.poll() is None  # nothing crashed

    redis_server.start()  # same port, same data
    for rep in (a, b):
        until(lambda rep=rep: httpx.get(f"{rep.url}/readyz", timeout=10).status_code == 200,
              15, f"{rep.name} ready again")  # fmt: skip
    assert probs(classify(a, "cls-b"), LABELS["cls-b"]) == before
    assert probs(classify(b, "cls-b"), LABELS["cls-b"]) == before
