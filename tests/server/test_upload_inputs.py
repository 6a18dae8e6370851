"""Bad upload inputs over the real app: malformed multipart bodies, unreadable headers and
configs, a model_id or task the base cannot serve, and models whose manifest is unreadable.

Every refusal is a 4xx naming the field and what is wrong (never the server's upload
path), and leaves nothing behind: no registry entry, no job, no upload folder, no open file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from server.api import create_app
from server.deltas import ModelDelta
from storage.bases import resolve_base
from tests.reliability.live import wait_job
from tests.server.finetunes import (
    apply_dense,
    multipart_files,
    perturb,
    save_causal_finetune,
    save_classifier_finetune,
)
from tests.server.live import ADMIN_TOKEN, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LLAMA_ID, BERT_ID = "tiny-llama", "tiny-bert"  # the bases' own ids (/v1/models lists them)
VAL_TARGET = '{"text": "Q: 1 plus 1?\\nA:", "target": "2"}'
VAL_LABEL = '{"text": "a fine film", "label": "positive"}'


# ---------------------------------------------------------------- fixtures and helpers


def _client(data: Path, base_dir: Path, name: str) -> Iterator[TestClient]:
    base = dataclasses.replace(resolve_base(base_dir, data), name=name)
    app = create_app(make_settings(data, str(base_dir), max_upload_bytes=20 << 20), base=base)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_llama_dir: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path_factory.mktemp("up-llama"), tiny_llama_dir, LLAMA_ID)


@pytest.fixture(scope="module")
def bert(tmp_path_factory, tiny_bert_dir: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path_factory.mktemp("up-bert"), tiny_bert_dir, BERT_ID)


@pytest.fixture(scope="module")
def llama_ft(tmp_path_factory, tiny_llama_dir: Path) -> Path:
    return save_causal_finetune(tiny_llama_dir, tmp_path_factory.mktemp("ft-llama"), seed=5)


@pytest.fixture(scope="module")
def bert_cls_ft(tmp_path_factory, tiny_bert_dir: Path) -> Path:
    return save_classifier_finetune(tiny_bert_dir, tmp_path_factory.mktemp("ft-cls"), seed=6)


@pytest.fixture(scope="module")
def bert_plain_ft(tmp_path_factory, tiny_bert_dir: Path) -> Path:
    """A BertModel fine-tune: no classification head."""
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_bert_dir)
    apply_dense(model, ModelDelta(perturb(model, 7)))
    out = tmp_path_factory.mktemp("ft-plain")
    model.save_pretrained(out)
    return out


def _files(folder: Path, **replace: bytes) -> list[tuple[str, tuple[str, bytes]]]:
    """A folder's files for httpx, some replaced or added (name -> bytes)."""
    files = [(n, (f, b)) for n, (f, b) in multipart_files(folder) if f not in replace]
    return files + [("files", (name, data)) for name, data in replace.items()]


def _raw_safetensors(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def _jobs(client: TestClient) -> int:
    path = client.app.state.darex.store.registry.path
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


def _uploads(client: TestClient) -> Path:
    return client.app.state.darex.settings.data_dir / "uploads"


def _open_files_under(folder: Path) -> list[str]:
    if not Path("/proc/self/fd").is_dir():
        return []
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            out.append(target)
    return out


def refused(
    client: TestClient,
    r: httpx.Response,
    status: int,
    code: str,
    param: str | None,
    *words: str,
    jobs_before: int,
    model_id: str | None = None,
) -> dict:
    """The 4xx with its code, param and words; the message holds no server path; nothing
    was left behind (registry entry, job, upload folder, open file)."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], (w, err["message"])
    data_dir = str(client.app.state.darex.settings.data_dir)
    assert data_dir not in err["message"] and "upload-" not in err["message"], err["message"]
    if model_id is not None:
        assert model_id not in client.app.state.darex.store.models()
    assert _jobs(client) == jobs_before
    uploads = _uploads(client)
    assert not uploads.exists() or not list(uploads.iterdir()), list(uploads.iterdir())
    assert _open_files_under(uploads) == []
    return err


def hold_ingest(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Ingests wait for ``go`` once started (``started`` is set): an upload stays in flight."""
    import storage.ingest

    go, started = threading.Event(), threading.Event()
    real = storage.ingest.ingest

    def held(*a, **k):
        started.set()
        assert go.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(storage.ingest, "ingest", held)
    return go, started


def post(client: TestClient, data: dict, files: list) -> tuple[httpx.Response, int]:
    before = _jobs(client)
    return client.post("/admin/models", headers=AUTH, data=data, files=files), before


def post_raw(client: TestClient, body: bytes, boundary: str = "XYZ") -> tuple[httpx.Response, int]:
    before = _jobs(client)
    headers = {**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"}
    return client.post("/admin/models", headers=headers, content=body), before


# ---------------------------------------------------------------- multipart framing


@pytest.mark.parametrize(
    "body",
    [b"this is not multipart at all", b"--XYZ\r\nbogus\r\n\r\n"],
    ids=["not-multipart", "bogus-part-header"],
)
def test_malformed_multipart_body_is_422(llama: TestClient, body: bytes) -> None:
    r, jobs = post_raw(llama, body)
    refused(llama, r, 422, "invalid_request", "files", "malformed multipart body", jobs_before=jobs)


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XYZ") -> bytes:
    """(name, filename, value) parts framed by ``boundary``, closing boundary included."""
    out = b""
    for name, filename, value in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("last", ["file", "model_id"])
def test_multipart_body_without_closing_boundary_is_422(
    llama: TestClient, llama_ft: Path, last: str
) -> None:
    files = [("files", f.name, f.read_bytes()) for f in sorted(llama_ft.iterdir()) if f.is_file()]
    field = [("model_id", None, b"cut-off")]
    parts = [*field, *files] if last == "file" else [*files, *field]
    body = _multipart(parts)
    cut = body[: -len(b"\r\n--XYZ--\r\n")]  # the last part's data, never closed
    r, jobs = post_raw(llama, cut)
    refused(
        llama,
        r,
        422,
        "invalid_request",
        "files",
        "multipart body ended before its closing boundary",
        jobs_before=jobs,
        model_id="cut-off",
    )


@pytest.mark.parametrize(
    "filename", ["model.safetensors\n", "a b.safetensors", "..safetensors", ".hidden"]
)
def test_a_file_name_outside_the_safe_set_is_422(
    llama: TestClient, llama_ft: Path, filename: str
) -> None:
    files = [("files", f.name, f.read_bytes()) for f in sorted(llama_ft.iterdir()) if f.is_file()]
    body = _multipart([("model_id", None, b"bad-name"), *files, ("files", filename, b"x")])
    r, jobs = post_raw(llama, body)
    refused(
        llama,
        r,
        422,
        "invalid_request",
        "files",
        f"file name {filename!r} is not allowed",
        jobs_before=jobs,
        model_id="bad-name",
    )


# ---------------------------------------------------------------- unreadable files


@pytest.mark.parametrize(
    "header",
    [b"\xff\xfe not utf-8", b"not json at all", b"[1, 2, 3]", b"[" * 100_000],
    ids=["not-utf8", "not-json", "json-list", "deep-nesting"],
)
def test_lora_adapter_with_unreadable_header_is_422(
    llama: TestClient, tmp_path: Path, header: bytes
) -> None:
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    files = [
        ("files", ("adapter_config.json", json.dumps({**cfg, "task_type": "CAUSAL_LM"}).encode())),
        ("files", ("adapter_model.safetensors", _raw_safetensors(header))),
    ]
    r, jobs = post(llama, {"model_id": "bad-lora"}, files)
    refused(
        llama,
        r,
        422,
        "bad_checkpoint",
        "files",
        "adapter_model.safetensors",
        "not a readable safetensors file",
        jobs_before=jobs,
        model_id="bad-lora",
    )


@pytest.mark.parametrize(
    "index",
    [
        b'{"weight_map": []}',
        b'{"weight_map": {"a": 1}}',
        b'{"weight_map": {"a": "model.safetensors"}, "x": "\xff\xfe"}',
        b"[" * 100_000,
    ],
    ids=["list", "non-string-shard", "not-utf8", "deep-nesting"],
)
def test_bad_sharded_index_is_422(llama: TestClient, llama_ft: Path, index: bytes) -> None:
    files = _files(llama_ft, **{"model.safetensors.index.json": index})
    r, jobs = post(llama, {"model_id": "bad-index"}, files)
    refused(
        llama,
        r,
        422,
        "bad_checkpoint",
        "files",
        "model.safetensors.index.json",
        "not a safetensors index",
        jobs_before=jobs,
        model_id="bad-index",
    )


@pytest.mark.parametrize(
    ("config", "why"),
    [
        (b'{"architectures": ["LlamaForCausalLM"], "x": "\xff\xfe"}', "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"[1]", "not a JSON object"),
    ],
    ids=["not-utf8", "deep-nesting", "json-list"],
)
@pytest.mark.parametrize("with_val", [False, True], ids=["", "val"])
def test_bad_config_json_is_422(
    llama: TestClient, llama_ft: Path, config: bytes, why: str, with_val: bool
) -> None:
    data = {"model_id": "bad-config", **({"val": VAL_TARGET} if with_val else {})}
    r, jobs = post(llama, data, _files(llama_ft, **{"config.json": config}))
    refused(
        llama,
        r,
        422,
        "bad_checkpoint",
        "files",
        "config.json",
        why,
        jobs_before=jobs,
        model_id="bad-config",
    )


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"architectures": [1]}, ("architectures", "strings")),
        ({"architectures": "LlamaForCausalLM"}, ("architectures", "list")),
        ({"id2label": ["negative", "positive"]}, ("id2label", "object")),
        ({"id2label": [5, 6]}, ("id2label", "object")),
        ({"id2label": {"one": "x"}}, ("id2label", "integers")),
    ],
    ids=["arch-int", "arch-str", "id2label-names", "id2label-ints", "id2label-keys"],
)
@pytest.mark.parametrize("with_val", [False, True], ids=["", "val"])
def test_config_fields_of_the_wrong_shape_are_422(
    bert: TestClient, bert_cls_ft: Path, edit: dict, words: tuple[str, ...], with_val: bool
) -> None:
    """Up front, with or without ``val``: a list-shaped id2label used to pass the upload and
    fail the job with a bare ``IndexError``."""
    cfg = {**json.loads((bert_cls_ft / "config.json").read_text()), **edit}
    data = {"model_id": "odd-config", **({"val": VAL_LABEL} if with_val else {})}
    r, jobs = post(bert, data, _files(bert_cls_ft, **{"config.json": json.dumps(cfg).encode()}))
    refused(
        bert,
        r,
        422,
        "bad_checkpoint",
        "files",
        "config.json",
        *words,
        jobs_before=jobs,
        model_id="odd-config",
    )


def test_messages_name_the_file_not_the_upload_path(llama: TestClient, llama_ft: Path) -> None:
    files = _files(llama_ft, **{"model.safetensors": b"\x10\x00"})
    r, jobs = post(llama, {"model_id": "short"}, files)
    err = refused(
        llama,
        r,
        422,
        "bad_checkpoint",
        "files",
        "model.safetensors",
        "not a readable",
        jobs_before=jobs,
        model_id="short",
    )
    assert "/" not in err["message"].split(":")[0], err["message"]


# ---------------------------------------------------------------- model_id and task


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        ({"model_id": "../evil"}, "invalid_model_id", ["'../evil'"]),
        ({"model_id": "has space"}, "invalid_model_id", ["'has space'"]),
        ({"model_id": "fresh", "replace": "maybe"}, "invalid_request", ["replace", "'maybe'"]),
    ],
)
def test_model_id_and_replace_refusals_name_their_field(
    llama: TestClient, llama_ft: Path, data: dict, code: str, words: list[str]
) -> None:
    r, jobs = post(llama, data, multipart_files(llama_ft))
    param = "replace" if "replace" in data else "model_id"
    refused(llama, r, 422, code, param, *words, jobs_before=jobs, model_id=data["model_id"])


def test_a_taken_model_id_is_409_on_model_id_saying_how_to_replace_it(
    llama: TestClient, llama_ft: Path
) -> None:
    r, _ = post(llama, {"model_id": "taken", "rate": "0.9"}, multipart_files(llama_ft))
    assert wait_job(llama, r.json()["job_id"])["state"] == "done"
    key = llama.app.state.darex.store.registry.get_model("taken")
    r, jobs = post(llama, {"model_id": "taken", "replace": "no"}, multipart_files(llama_ft))
    refused(llama, r, 409, "model_exists", "model_id", "'taken'", "replace=true", jobs_before=jobs)
    assert llama.app.state.darex.store.registry.get_model("taken") == key


@pytest.mark.parametrize("replace", [False, True])
def test_model_id_of_the_base_is_refused(llama: TestClient, llama_ft: Path, replace: bool) -> None:
    assert llama.app.state.darex.base_id == LLAMA_ID
    data = {"model_id": LLAMA_ID, **({"replace": "true"} if replace else {})}
    r, jobs = post(llama, data, multipart_files(llama_ft))
    refused(
        llama,
        r,
        422,
        "invalid_request",
        "model_id",
        repr(LLAMA_ID),
        "the base model's own id",
        jobs_before=jobs,
    )
    ids = [m["id"] for m in llama.get("/v1/models").json()["data"]]
    assert ids.count(LLAMA_ID) == 1


@pytest.mark.parametrize(
    ("task", "words"),
    [
        ("causal-lm", ("'causal-lm'", "encoder", "feature-extraction")),
        ("sequence-classification", ("'sequence-classification'", "classifier.weight")),
    ],
)
def test_task_the_encoder_base_cannot_serve_is_422(
    bert: TestClient, bert_plain_ft: Path, task: str, words: tuple[str, ...]
) -> None:
    r, jobs = post(bert, {"model_id": "odd-task", "task": task}, multipart_files(bert_plain_ft))
    refused(bert, r, 422, "invalid_request", "task", *words, jobs_before=jobs, model_id="odd-task")


@pytest.mark.parametrize(
    ("head", "words"),
    [
        ({"classifier.weight": torch.zeros(2, 7)}, ("[2, 7]", "[labels, 64]")),
        ({"classifier.weight": torch.zeros(4, 64)}, ("4 rows", "3 labels")),
    ],
    ids=["width", "rows"],
)
def test_a_head_the_encoder_base_cannot_apply_is_422(
    bert: TestClient, bert_cls_ft: Path, tmp_path: Path, head: dict, words: tuple[str, ...]
) -> None:
    """A classifier the engine could not apply (it would answer 500 at the first
    /v1/classify) is refused before a job exists, naming the tensor."""
    from safetensors.torch import load_file

    sd = load_file(bert_cls_ft / "model.safetensors")
    sd.pop("classifier.bias", None)
    save_file({**sd, **head}, tmp_path / "model.safetensors")
    files = _files(
        bert_cls_ft, **{"model.safetensors": (tmp_path / "model.safetensors").read_bytes()}
    )
    r, jobs = post(bert, {"model_id": "odd-head"}, files)
    refused(bert, r, 422, "invalid_request", "task", "classifier.weight", *words, jobs_before=jobs)


@pytest.mark.parametrize("task", ["sequence-classification", "feature-extraction"])
def test_task_the_decoder_base_cannot_serve_is_422(
    llama: TestClient, llama_ft: Path, task: str
) -> None:
    r, jobs = post(llama, {"model_id": "odd-task", "task": task}, multipart_files(llama_ft))
    refused(
        llama,
        r,
        422,
        "invalid_request",
        "task",
        repr(task),
        "decoder",
        "'causal-lm'",
        jobs_before=jobs,
        model_id="odd-task",
    )


def test_task_an_encoder_lora_adapter_names_is_checked(bert: TestClient, tmp_path: Path) -> None:
    """A CAUSAL_LM adapter on an encoder base: the task it implies is refused up front."""
    tensors = {
        "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(2, 64),
        "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight": torch.zeros(64, 2),
    }
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "task_type": "CAUSAL_LM"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    r, jobs = post(bert, {"model_id": "lora-lm"}, multipart_files(tmp_path))
    refused(
        bert,
        r,
        422,
        "invalid_request",
        "task",
        "'causal-lm'",
        "adapter_config.json",
        jobs_before=jobs,
        model_id="lora-lm",
    )


def test_a_second_upload_of_a_model_id_in_flight_is_409(
    llama: TestClient, llama_ft: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an upload of a model_id is being ingested, another of the same id is refused
    at once (it would redo the work, then fail or race the first), with nothing kept;
    when the first has ended, the id can be uploaded again."""
    go, started = hold_ingest(monkeypatch)
    r, _ = post(llama, {"model_id": "twice", "rate": "0.9"}, multipart_files(llama_ft))
    assert r.status_code == 202, r.text
    first = r.json()["job_id"]
    try:
        assert started.wait(30)
        in_flight = list(_uploads(llama).iterdir())  # the first upload's folder
        for data in ({"model_id": "twice"}, {"model_id": "twice", "replace": "true"}):
            r, jobs = post(llama, data, multipart_files(llama_ft))
            assert r.status_code == 409, r.text
            err = r.json()["error"]
            assert (err["code"], err["param"]) == ("ingest_in_progress", "model_id"), err
            assert "'twice'" in err["message"] and f"GET /admin/jobs/{first}" in err["message"]
            assert _jobs(llama) == jobs and list(_uploads(llama).iterdir()) == in_flight
        # a DELETE of the id while its first upload is stored: 409 too, not "not registered"
        d = llama.delete("/admin/models/twice", headers=AUTH)
        assert d.status_code == 409 and d.json()["error"]["code"] == "ingest_in_progress", d.text
    finally:
        go.set()
    assert wait_job(llama, first)["state"] == "done"
    r, _ = post(llama, {"model_id": "twice", "replace": "true"}, multipart_files(llama_ft))
    assert r.status_code == 202, r.text
    assert wait_job(llama, r.json()["job_id"])["state"] == "done"


def test_delete_never_removes_a_version_uploaded_while_it_waited(
    llama: TestClient, llama_ft: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELETE during a re-upload of the id is a 409 naming the job; a re-upload that lands
    while the delete waits for the model's requests, or (from another replica) just before
    the registry deletes, is not deleted (409, kept)."""
    r, _ = post(llama, {"model_id": "del-race", "rate": "0.9"}, multipart_files(llama_ft))
    assert wait_job(llama, r.json()["job_id"])["state"] == "done"
    reg = llama.app.state.darex.store.registry
    first_key = reg.get_model("del-race")
    go, started = hold_ingest(monkeypatch)
    data = {"model_id": "del-race", "rate": "0.5", "replace": "true"}
    r, _ = post(llama, data, multipart_files(llama_ft))
    job = r.json()["job_id"]
    try:
        assert started.wait(30)
        d = llama.delete("/admin/models/del-race", headers=AUTH)
        assert d.status_code == 409, d.text
        assert d.json()["error"]["code"] == "ingest_in_progress" and job in d.text
        assert reg.get_model("del-race") == first_key
    finally:
        go.set()
    assert wait_job(llama, job)["state"] == "done"
    monkeypatch.undo()
    new_key = reg.get_model("del-race")
    assert new_key != first_key
    # a replacement that lands while the delete drains the model's requests
    sched = llama.app.state.darex.scheduler
    real_drain = sched._drain

    def drain_then_replaced(model_id: str, timeout: float) -> None:
        real_drain(model_id, timeout)
        reg.set_model(model_id, first_key, replace=True)

    monkeypatch.setattr(sched, "_drain", drain_then_replaced)
    d = llama.delete("/admin/models/del-race", headers=AUTH)
    assert d.status_code == 409, d.text
    assert d.json()["error"]["code"] == "model_exists" and "was replaced" in d.text
    assert reg.get_model("del-race") == first_key
    monkeypatch.undo()
    # another replica replaces it after this delete's last look: the registry compares and
    # deletes in one step, so the new version stays
    real_delete = reg.delete_model

    def replaced_first(model_id: str, *, expected: str | None = None) -> bool:
        reg.set_model(model_id, new_key, replace=True)
        return real_delete(model_id, expected=expected)

    monkeypatch.setattr(reg, "delete_model", replaced_first)
    d = llama.delete("/admin/models/del-race", headers=AUTH)
    assert d.status_code == 409 and "was replaced" in d.text, d.text
    assert reg.get_model("del-race") == new_key
    monkeypatch.undo()
    assert llama.delete("/admin/models/del-race", headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("rate", "words"),
    [
        ("0.9999995", ["at most 0.999999", "0.9999995"]),
        ("1", ["[0, 1)"]),
        ("-0.1", ["[0, 1)"]),
        ("nan", ["[0, 1)"]),
        ("0.99x", ["'0.99x' is not a number"]),
    ],
)
def test_a_rate_the_mask_cannot_draw_is_422_on_rate(
    llama: TestClient, llama_ft: Path, rate: str, words: list[str]
) -> None:
    """The upload checks ``rate`` as `darex add --rate` does: [0, 1), at most 0.999999."""
    data = {"model_id": "bad-rate", "rate": rate}
    r, jobs = post(llama, data, multipart_files(llama_ft))
    refused(llama, r, 422, "invalid_request", "rate", *words, jobs_before=jobs, model_id="bad-rate")


def test_the_highest_rate_darex_add_takes_is_taken_by_an_upload(
    llama: TestClient, llama_ft: Path
) -> None:
    """p = 0.999999 (the cap of `darex add` and DAREX_DEFAULT_RATE) is stored, not refused."""
    r, _ = post(llama, {"model_id": "sparsest", "rate": "0.999999"}, multipart_files(llama_ft))
    assert r.status_code == 202, r.text
    assert wait_job(llama, r.json()["job_id"])["state"] == "done"
    assert llama.app.state.darex.store.manifest("sparsest").p == 0.999999


def test_task_that_fits_is_accepted(bert: TestClient, bert_cls_ft: Path) -> None:
    data = {"model_id": "cls-ok", "task": "sequence-classification", "rate": "0.9"}
    r, _ = post(bert, data, multipart_files(bert_cls_ft))
    assert r.status_code == 202, r.text
    assert wait_job(bert, r.json()["job_id"])["state"] == "done"
    out = bert.post("/v1/classify", json={"model": "cls-ok", "input": ["fine"]})
    assert out.status_code == 200, out.text


# ---------------------------------------------------------------- unreadable manifests


@pytest.mark.parametrize("how", ["corrupt", "missing"])
def test_model_with_unreadable_manifest_can_be_deleted(
    llama: TestClient, llama_ft: Path, how: str
) -> None:
    from storage.ingest import ingest

    st = llama.app.state.darex
    model_id = f"broken-{how}"
    ingest(st.store, model_id, llama_ft, st.base, method="dare", p=0.9, show_progress=False)
    blob = st.store.blobs.path(st.store.registry.get_model(model_id))
    if how == "corrupt":
        blob.chmod(0o644)
        blob.write_bytes(b"not a manifest")
    else:
        blob.unlink()

    r = llama.get(f"/admin/models/{model_id}", headers=AUTH)  # says what is wrong
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == f"{how}_blob", err
    for w in (repr(model_id), "manifest", how, f"DELETE /admin/models/{model_id}"):
        assert w in err["message"], (w, err["message"])

    r = llama.delete(f"/admin/models/{model_id}", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": model_id, "deleted": True}
    assert model_id not in st.store.models()
    assert llama.get(f"/admin/models/{model_id}", headers=AUTH).status_code == 404
    st.store.gc(grace_s=0)  # one broken entry no longer blocks gc for the whole store
    assert llama.delete(f"/admin/models/{model_id}", headers=AUTH).status_code == 404
