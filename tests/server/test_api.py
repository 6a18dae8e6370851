"""The HTTP app on a real store and a real Engine over the tiny models: admin, errors, metrics."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from server.api import create_app
from server.engine import Engine
from server.generation import encode_prompt
from storage.bases import resolve_base
from storage.registry import open_registry
from storage.store import DeltaStore
from tests.reliability.live import wait_job
from tests.server.engine_util import faulting_swap
from tests.server.finetunes import (
    multipart_files,
    reference_generate,
    save_causal_finetune,
    save_classifier_finetune,
)
from tests.server.live import ADMIN_TOKEN, live_server, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def upload(client, folder: Path, model_id: str, **fields) -> dict:
    data = {"model_id": model_id, **{k: str(v) for k, v in fields.items()}}
    r = client.post("/admin/models", headers=AUTH, data=data, files=multipart_files(folder))
    assert r.status_code == 202, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"type", "message"}
    for w in words:
        assert w in err["message"], (w, err["message"])
    assert "Traceback" not in r.text
    return err


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_llama_dir: Path) -> Iterator[TestClient]:
    data = tmp_path_factory.mktemp("api-llama")
    app = create_app(make_settings(data, str(tiny_llama_dir), max_upload_bytes=20 << 20))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def llama_ft(tmp_path_factory, tiny_llama_dir: Path) -> Path:
    return save_causal_finetune(tiny_llama_dir, tmp_path_factory.mktemp("ft-llama"), seed=5)


def test_health_ready_and_models(llama: TestClient) -> None:
    assert llama.get("/healthz").json() == {"status": "ok"}
    r = llama.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["registry"] == "ok"
    base_id = llama.app.state.darex.base_id
    assert llama.get("/v1/models").json()["data"][0]["id"] == base_id


def test_upload_serve_inspect_delete(llama: TestClient, llama_ft: Path, tiny_llama_dir) -> None:
    acc = upload(llama, llama_ft, "ft-up", method="dare", rate=0.5)
    job = wait_job(llama, acc["job_id"])
    assert job["state"] == "done", job
    assert job["progress"] == 1.0

    info = llama.get("/admin/models/ft-up", headers=AUTH).json()
    assert info["method"] == "dare" and info["p"] == 0.5 and info["task"] == "causal-lm"
    assert 0 < info["ratio_vs_fp16"] < 1 and info["stored_bytes"] > 0
    cards = {m["id"]: m for m in llama.get("/v1/models").json()["data"]}
    assert cards["ft-up"]["created"] == int(info["created"]) > 0  # when it was stored

    body = {"model": "ft-up", "prompt": "hello world", "max_tokens": 8, "temperature": 0}
    got = llama.post("/v1/completions", json=body).json()
    st = llama.app.state.darex
    direct = Engine.load(st.base, st.store, st.settings)  # the engine used directly
    direct.activate("ft-up")
    ids = encode_prompt(direct.tokenizer, "hello world")
    assert got["choices"][0]["text"] == reference_generate(direct.model, direct.tokenizer, ids, 8)
    direct.activate(None)
    base_text = reference_generate(direct.model, direct.tokenizer, ids, 8)
    assert got["choices"][0]["text"] != base_text
    assert got["usage"]["prompt_tokens"] == len(ids)

    r = llama.delete("/admin/models/ft-up", headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"]
    assert_error(llama.post("/v1/completions", json=body), 404, "ft-up")
    assert_error(llama.get("/admin/models/ft-up", headers=AUTH), 404)


def test_a_replacing_upload_serves_its_new_weights_once_its_job_is_done(
    tmp_path: Path, tiny_llama_dir: Path, llama_ft: Path
) -> None:
    """Replace a model that this server has cached: the first request after the job reads
    done runs the new version. The registry watcher is kept out of it (a check an hour
    apart), so only the upload itself can have dropped the old copy."""
    other_ft = save_causal_finetune(tiny_llama_dir, tmp_path / "other", seed=9)
    settings = make_settings(
        tmp_path / "data", str(tiny_llama_dir), max_upload_bytes=20 << 20, registry_ttl_s=3600
    )
    body = {"model": "ft", "prompt": "hello world", "max_tokens": 8, "temperature": 0}

    def text(c: TestClient, model: str) -> str:
        r = c.post("/v1/completions", json={**body, "model": model})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with TestClient(create_app(settings)) as c:
        for model_id, folder in (("ft", llama_ft), ("other", other_ft)):
            assert wait_job(c, upload(c, folder, model_id, rate=0.5)["job_id"])["state"] == "done"
        old, new = text(c, "ft"), text(c, "other")  # ft is cached now
        assert old != new  # else the check below could not fail
        acc = upload(c, other_ft, "ft", rate=0.5, replace="true")
        assert wait_job(c, acc["job_id"])["state"] == "done"
        assert text(c, "ft") == new


def test_upload_with_calib_texts_searches_q(llama: TestClient, llama_ft: Path) -> None:
    """darex_q without q plus calibration texts: q is searched by the output change."""
    calib = "\n".join(f"question {i}: what is {i} plus {2 * i}?" for i in range(12))
    acc = upload(llama, llama_ft, "ft-cq", method="darex_q", rate=0.9, calib=calib)
    job = wait_job(llama, acc["job_id"])
    assert job["state"] == "done" and " q=" in job["message"], job
    info = llama.get("/admin/models/ft-cq", headers=AUTH).json()
    assert info["method"] == "darex_q" and 0.1 - 1e-9 <= info["q"] <= 1.0
    files = multipart_files(llama_ft)
    r = llama.post(
        "/admin/models", headers=AUTH, data={"model_id": "e", "calib": " \n"}, files=files
    )
    assert assert_error(r, 422, "no text")["param"] == "calib"
    assert llama.delete("/admin/models/ft-cq", headers=AUTH).status_code == 200


def test_upload_wanda_measures_on_the_calib_texts(llama: TestClient, llama_ft: Path) -> None:
    """method wanda weighs the delta by input norms measured on ``calib``: without the
    texts it is a 422 naming the field, with them the job stores WANDA."""
    files = multipart_files(llama_ft)
    r = llama.post(
        "/admin/models", headers=AUTH, data={"model_id": "w", "method": "wanda"}, files=files
    )
    assert assert_error(r, 422, "method wanda needs calibration texts")["param"] == "calib"
    assert llama.get("/admin/models/w", headers=AUTH).status_code == 404
    calib = "\n".join(f"question {i}: what is {i} plus {2 * i}?" for i in range(12))
    acc = upload(llama, llama_ft, "ft-w", method="wanda", rate=0.9, calib=calib)
    job = wait_job(llama, acc["job_id"])
    assert job["state"] == "done", job
    info = llama.get("/admin/models/ft-w", headers=AUTH).json()
    assert info["method"] == "wanda" and info["q"] is None
    assert llama.delete("/admin/models/ft-w", headers=AUTH).status_code == 200


def test_upload_with_val_examples_searches_q(llama: TestClient, llama_ft: Path) -> None:
    """Labeled ``val`` lines: q is searched for the best metric on them; bad lines are 422."""
    filler = "a longer question, to send more than the 4 KiB of a plain field " * 2
    val = "\n".join(
        json.dumps({"text": f"Q: {filler}{i} plus {i}?\nA:", "target": str(2 * i)})
        for i in range(40)
    )
    assert len(val) > 4096
    acc = upload(llama, llama_ft, "ft-lq", method="darex_q", rate=0.9, val=val)
    job = wait_job(llama, acc["job_id"])
    assert job["state"] == "done" and " q=" in job["message"], job
    info = llama.get("/admin/models/ft-lq", headers=AUTH).json()
    assert info["method"] == "darex_q" and 0.1 - 1e-9 <= info["q"] <= 1.0
    assert f"q={info['q']:g} by prefix on 40 labeled examples" in info["reason"]
    assert llama.delete("/admin/models/ft-lq", headers=AUTH).status_code == 200
    files = multipart_files(llama_ft)
    for data, match in (
        ({"val": "\n"}, "no labeled example"),
        ({"val": '{"text": "a"}'}, "val line 1: give exactly one of 'label' or 'target'"),
        ({"val": val, "method": "darex_q", "q": "0.2"}, "send either q or val"),
        ({"val": val, "method": "magnitude"}, "method magnitude takes no q"),
        ({"val": '{"text": "a", "label": 0}'}, "need a sequence-classification fine-tune, not"),
    ):
        r = llama.post("/admin/models", headers=AUTH, data={"model_id": "v", **data}, files=files)
        assert assert_error(r, 422, match)["param"] == "val"
    assert llama.get("/admin/models/v", headers=AUTH).status_code == 404  # nothing registered


def test_admin_needs_the_token(llama: TestClient, llama_ft: Path) -> None:
    r = llama.get("/admin/jobs/x")
    assert_error(r, 401, "missing")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(llama.get("/admin/jobs/x", headers={"Authorization": "Bearer nope"}), 401, "wrong")
    r = llama.post("/admin/models", data={"model_id": "m"}, files=multipart_files(llama_ft))
    assert_error(r, 401)


def test_upload_over_the_limit_is_413(llama: TestClient, llama_ft: Path) -> None:
    st = llama.app.state.darex
    saved = st.settings
    st.settings = saved.model_copy(update={"max_upload_bytes": 10_000})
    try:
        r = llama.post(
            "/admin/models", headers=AUTH, data={"model_id": "big"}, files=multipart_files(llama_ft)
        )
    finally:
        st.settings = saved
    assert_error(r, 413, "10000")
    uploads = st.settings.data_dir / "uploads"  # made by the first upload this app saw
    assert not uploads.exists() or not list(uploads.iterdir())  # partial upload removed


def test_checkpoint_of_another_shape_is_422_naming_the_tensor(llama, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=30522,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    r = llama.post(
        "/admin/models", headers=AUTH, data={"model_id": "odd"}, files=multipart_files(tmp_path)
    )
    err = assert_error(r, 422, "mlp", "(64, 128)", "(64, 96)")
    assert err["code"] == "base_mismatch"


def test_pickle_and_bad_fields_are_422(llama: TestClient, llama_ft: Path) -> None:
    pick = [("files", ("pytorch_model.bin", b"\x80\x04junk"))]
    r = llama.post("/admin/models", headers=AUTH, data={"model_id": "p"}, files=pick)
    assert_error(r, 422, "pickle")
    files = multipart_files(llama_ft)
    r = llama.post("/admin/models", headers=AUTH, data={"model_id": "x", "rate": "2"}, files=files)
    assert assert_error(r, 422, "rate")["param"] == "rate"
    r = llama.post("/admin/models", headers=AUTH, data={"model_id": "../x"}, files=files)
    assert_error(r, 422, "..")
    for data, match in (
        ({"method": "darex_q"}, "required with method darex_q unless val examples or calib"),
        ({"method": "dare", "q": "0.02"}, "only method darex_q"),
        ({"q": "0.02"}, "only method darex_q"),
        # the same range as `darex add --q` and the pruning library: any finite q > 0
        ({"method": "darex_q", "q": "0"}, "finite number >= 1e-06 (1 - the highest rate), got 0.0"),
        (
            {"method": "darex_q", "q": "1e-9"},
            "finite number >= 1e-06 (1 - the highest rate), got 1e-09",
        ),
        (
            {"method": "darex_q", "q": "-0.5"},
            "finite number >= 1e-06 (1 - the highest rate), got -0.5",
        ),
        (
            {"method": "darex_q", "q": "inf"},
            "finite number >= 1e-06 (1 - the highest rate), got inf",
        ),
        (
            {"method": "darex_q", "q": "nan"},
            "finite number >= 1e-06 (1 - the highest rate), got nan",
        ),
    ):
        r = llama.post("/admin/models", headers=AUTH, data={"model_id": "x", **data}, files=files)
        assert assert_error(r, 422, match)["param"] == "q"
    assert llama.get("/admin/models/x", headers=AUTH).status_code == 404  # nothing registered


def test_payload_errors_name_the_field(llama: TestClient) -> None:
    base_id = llama.app.state.darex.base_id
    r = llama.post("/v1/completions", json={"model": base_id, "prompt": "x", "temperature": 5})
    assert assert_error(r, 422, "temperature")["param"] == "temperature"
    r = llama.post("/v1/completions", json={"prompt": "x"})
    assert assert_error(r, 422, "model", "required")["param"] == "model"
    r = llama.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(r, 422)
    r = llama.post("/v1/completions", json={"model": base_id, "prompt": "x", "max_tokens": 10**6})
    assert_error(r, 422, "max_tokens")
    r = llama.post("/v1/completions", json={"model": "nobody", "prompt": "x"})
    err = assert_error(r, 404, "nobody")
    assert err["type"] == "not_found_error" and err["request_id"]
    r = llama.post("/v1/classify", json={"model": base_id, "input": "x"})
    assert_error(r, 422, "causal-lm", "/v1/classify")
    assert_error(llama.get("/admin/jobs/nope", headers=AUTH), 404)


def test_metrics_count_requests_swaps_and_cache(llama: TestClient, caplog) -> None:
    base_id = llama.app.state.darex.base_id
    with caplog.at_level("INFO", logger="server.api.metrics"):
        llama.post("/v1/completions", json={"model": base_id, "prompt": "x", "max_tokens": 2})
        llama.get("/admin/models/nobody", headers=AUTH)
        llama.get("/v1/nowhere")
        llama.get("/readyz")
    # one line a request on /v1 and /admin (not the probes), naming its model
    mine = [r for r in caplog.records if r.name == "server.api.metrics"]
    lines = [(r.endpoint, r.status, r.model_id) for r in mine]
    assert lines == [
        ("/v1/completions", 200, base_id),
        ("/admin/models/{model_id}", 404, "nobody"),
        ("unmatched", 404, None),
    ]
    text = llama.get("/metrics").text
    assert (
        f'darex_requests_total{{endpoint="/v1/completions",model="{base_id}",status="200"}}' in text
    )
    assert "darex_request_seconds_bucket" in text
    for name in (
        "darex_swap_seconds",
        "darex_cache_hits_total",
        "darex_cache_bytes",
        "darex_queue_depth",
    ):
        assert name in text, name


def test_classify_upload_matches_the_engine(tmp_path_factory, tiny_bert_dir: Path) -> None:
    data = tmp_path_factory.mktemp("api-bert")
    ft = save_classifier_finetune(tiny_bert_dir, tmp_path_factory.mktemp("ft-bert"), seed=6)
    app = create_app(make_settings(data, str(tiny_bert_dir)))
    texts = ["great movie", "it was fine I guess", "awful"]
    with TestClient(app) as client:
        job = wait_job(client, upload(client, ft, "sent", method="dare", rate=0.9)["job_id"])
        assert job["state"] == "done", job
        r = client.post("/v1/classify", json={"model": "sent", "input": texts})
        assert r.status_code == 200, r.text
        st = app.state.darex
        direct = Engine.load(st.base, st.store, st.settings)
        direct.activate("sent")
        expect = direct.classify(texts)
        # labels read before the request waited (as a replacement with other labels
        # could make them) do not name the scores: those of the head that ran do
        real = st.engine.describe
        st.engine.describe = lambda m: (real(m)[0], ["stale-a", "stale-b", "stale-c"])
        try:
            again = client.post("/v1/classify", json={"model": "sent", "input": texts})
        finally:
            st.engine.describe = real
        assert again.json()["data"] == r.json()["data"], again.text
    out = r.json()["data"]
    assert [d["index"] for d in out] == [0, 1, 2]
    got = [[d["scores"][lab] for lab in ("negative", "neutral", "positive")] for d in out]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), atol=1e-5, rtol=0)
    assert all(d["label"] == max(d["scores"], key=d["scores"].get) for d in out)


def test_registry_down_is_503(tmp_path, tiny_llama_dir: Path) -> None:
    settings = make_settings(tmp_path, str(tiny_llama_dir))
    registry = open_registry(settings.registry)
    store = DeltaStore(tmp_path, registry)
    app = create_app(settings, store=store, base=resolve_base(str(tiny_llama_dir), tmp_path))
    with TestClient(app) as client:
        registry.close()  # the registry goes away under a running server
        assert_error(client.post("/v1/completions", json={"model": "m", "prompt": "x"}), 503)
        assert client.get("/readyz").status_code == 503
        assert_error(client.get("/admin/models/m", headers=AUTH), 503)


def test_refuses_to_start_with_the_default_token(tmp_path, tiny_llama_dir: Path) -> None:
    from server.settings import DEFAULT_ADMIN_TOKEN, Settings

    settings = Settings(env="production", data_dir=tmp_path, base=str(tiny_llama_dir))
    assert settings.admin_token.get_secret_value() == DEFAULT_ADMIN_TOKEN
    with pytest.raises(ValueError, match="DAREX_ADMIN_TOKEN"), TestClient(create_app(settings)):
        pass
    dev = settings.model_copy(update={"env": "development"})
    with TestClient(create_app(dev)) as client:
        assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("reload_works", [True, False])
def test_a_faulting_swap_kernel_restores_the_base_or_takes_the_server_out_of_rotation(
    tmp_path: Path, tiny_llama_dir: Path, llama_ft: Path, monkeypatch, reload_works: bool
) -> None:
    """The request that hit the fault fails with a 500; then either the base was read back
    and verified (serving goes on, the base's text unchanged) or every request gets a 503
    ``weights_corrupt`` and ``/readyz`` reports the weights, so a load balancer stops
    sending traffic to weights that are neither the base nor a fine-tune."""
    import server.engine

    app = create_app(make_settings(tmp_path, str(tiny_llama_dir), max_upload_bytes=20 << 20))
    with TestClient(app, raise_server_exceptions=False) as client:  # the 500 as sent
        job = wait_job(client, upload(client, llama_ft, "ft-k", rate=0.5)["job_id"])
        assert job["state"] == "done", job
        st = client.app.state.darex
        base_id = st.base_id
        body = {"model": base_id, "prompt": "hello world", "max_tokens": 6, "temperature": 0}
        base_text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        real = server.engine.kernels.swap
        monkeypatch.setattr(server.engine.kernels, "swap", faulting_swap(real))
        if not reload_works:
            monkeypatch.setattr(st.engine, "_reload_base", lambda: {})
        assert_error(client.post("/v1/completions", json={**body, "model": "ft-k"}), 500)
        monkeypatch.setattr(server.engine.kernels, "swap", real)
        r = client.post("/v1/completions", json=body)
        ready = client.get("/readyz")
        if reload_works:
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == base_text
            assert ready.status_code == 200 and ready.json()["checks"]["weights"] == "ok"
            assert st.engine.base_fingerprint() == st.engine.loaded_fingerprint
        else:
            err = assert_error(r, 503, "unknown state", "reloading the base failed")
            assert err["code"] == "weights_corrupt"
            assert ready.status_code == 503
            assert ready.json()["checks"]["weights"].startswith("corrupt: a swap kernel failed")


def test_a_client_gone_mid_upload_is_499_not_a_server_error(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """The client closes the connection half-way through its upload: counted as 499 (the
    client's doing), not 500; nothing of it is kept."""
    app = create_app(make_settings(tmp_path / "data", str(tiny_llama_dir)))
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        part = (
            b'--XYZ\r\nContent-Disposition: form-data; name="model_id"\r\n\r\ngone\r\n'
            b'--XYZ\r\nContent-Disposition: form-data; name="files"; '
            b'filename="model.safetensors"\r\n\r\n' + b"\0" * 200_000
        )
        head = (
            f"POST /admin/models HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
            "Content-Type: multipart/form-data; boundary=XYZ\r\n"
            "Content-Length: 10000000\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(head + part)
            time.sleep(0.5)  # the server is reading the body
        with httpx.Client(base_url=url) as c:
            deadline = time.monotonic() + 30
            while 'endpoint="/admin/models",model="-",status="499"' not in (
                text := c.get("/metrics").text
            ):
                assert time.monotonic() < deadline, text
                time.sleep(0.1)
            assert 'status="500"' not in text
            assert "gone" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
    uploads = tmp_path / "data" / "uploads"
    assert not uploads.exists() or not list(uploads.iterdir()), list(uploads.iterdir())
    # what the log and a client still listening would read
    from starlette.requests import ClientDisconnect

    from server.api.errors import describe

    status, body = describe(ClientDisconnect())
    assert status == 499 and "closed the connection" in body["error"]["message"], body


def test_a_client_gone_mid_json_body_is_499_not_a_server_error(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """A JSON request whose client hangs up before its body is whole is the client's doing:
    the request count says 499, and no 500 sets off an alert."""
    app = create_app(make_settings(tmp_path / "data", str(tiny_llama_dir)))
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(head + b'{"model": "x", ')
            time.sleep(0.3)  # the server is reading the body
        with httpx.Client(base_url=url) as c:
            deadline = time.monotonic() + 30
            while 'status="499"' not in (text := c.get("/metrics").text):
                assert time.monotonic() < deadline, text
                time.sleep(0.1)
            assert 'status="500"' not in text


def test_the_ingest_workers_log_lines_name_the_model(
    llama: TestClient, llama_ft: Path, tmp_path: Path
) -> None:
    """The storage layer logs without naming the model (a tensor the fine-tune lacks);
    its lines from an upload's ingest, on a worker thread outside the request, still
    carry the model_id."""
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    from server.logging import ContextFilter

    lacking = tmp_path / "lacking"
    shutil.copytree(llama_ft, lacking)
    (weights,) = lacking.glob("*.safetensors")
    tensors = load_file(weights)
    del tensors["model.norm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.addFilter(ContextFilter())
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("storage.checkpoint")
    logger.addHandler(handler)
    try:
        job = wait_job(llama, upload(llama, lacking, "ft-ctx", method="dare", rate=0.5)["job_id"])
    finally:
        logger.removeHandler(handler)
    assert job["state"] == "done", job
    in_worker = [r for r in records if r.threadName.startswith("darex-ingest")]
    assert in_worker and "model.norm.weight" in in_worker[0].getMessage()
    seen = [(r.threadName, r.model_id) for r in records]
    assert {m for _, m in seen} == {"ft-ctx"}, seen
