"""``darex demo --no-serve`` on the tiny BERT: fine-tunes, stores at p = 0.99, reuses on rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import server.cli.lab  # noqa: F401  (registers the commands)
from server.cli import app
from server.demo import EVAL_FILE, demo_dir
from server.training import RESULT_FILE
from storage.bases import resolve_base
from storage.registry import open_registry
from storage.store import DeltaStore

runner = CliRunner()
TASKS = ("rt-sentiment", "rt-subjectivity")


def _demo(base: Path, steps: int = 3, eval_n: int = 24, rate: float = 0.99) -> str:
    args = ["demo", "--base", str(base), "--steps", str(steps), "--train", "48"]
    args += ["--eval", str(eval_n), "--rate", str(rate)]
    for t in TASKS:
        args += ["--task", t]
    res = runner.invoke(app, [*args, "--no-serve"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DAREX_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DAREX_REGISTRY_URL", raising=False)
    return tmp_path


def test_demo_builds_stores_and_reuses(tiny_bert_dir: Path, data_dir: Path) -> None:
    out = _demo(tiny_bert_dir)
    base = resolve_base(tiny_bert_dir, data_dir)
    store = DeltaStore(data_dir, open_registry(f"sqlite:///{data_dir / 'registry.sqlite3'}"))
    try:
        keys, stamps = {}, {}
        for t in TASKS:
            model_id = f"demo-{t}"
            m = store.manifest(model_id)
            keys[t] = store.registry.get_model(model_id)
            assert m.p == 0.99 and m.method  # stored with the recommended method
            # 99% of the pruned entries dropped: far smaller than the fp16 checkpoint
            pruned = [e for e in m.deltas.values() if e.pruned]
            assert pruned and sum(e.nnz for e in pruned) < 0.02 * sum(
                e.shape[0] * (e.shape[1] if len(e.shape) > 1 else 1) for e in pruned
            )
            assert m.stored_bytes() < m.fp16_bytes / 10
            row = json.loads((demo_dir(data_dir, base, t) / EVAL_FILE).read_text())
            assert 0.0 <= row["unpruned"] <= 1.0 and 0.0 <= row["stored"] <= 1.0
            assert row["manifest_key"] == keys[t]
            stamps[t] = (demo_dir(data_dir, base, t) / RESULT_FILE).stat().st_mtime
            # working request lines for every model
            assert "/v1/classify" in out and f'"model": "{model_id}"' in out
        assert "reused" not in out
    finally:
        store.close()

    again = _demo(tiny_bert_dir)
    assert again.count("reused the fine-tune") == len(TASKS)
    store = DeltaStore(data_dir, open_registry(f"sqlite:///{data_dir / 'registry.sqlite3'}"))
    try:
        for t in TASKS:
            assert store.registry.get_model(f"demo-{t}") == keys[t]  # not re-ingested
            path = demo_dir(data_dir, base, t) / RESULT_FILE
            assert path.stat().st_mtime == stamps[t]  # not re-trained
    finally:
        store.close()


def test_a_rerun_with_another_budget_trains_or_scores_again_what_it_changes(
    tiny_bert_dir: Path, data_dir: Path
) -> None:
    """The cache follows the options: more steps train the fine-tune again and store the new
    delta (its old scores go with the old fine-tune); another ``--eval`` keeps the
    fine-tune and the stored delta and only measures again; another ``--rate`` keeps the
    fine-tune and stores it again."""
    task = TASKS[0]
    _demo(tiny_bert_dir)
    base = resolve_base(tiny_bert_dir, data_dir)
    ft = demo_dir(data_dir, base, task)
    reg = f"sqlite:///{data_dir / 'registry.sqlite3'}"

    def state() -> tuple[str, float, dict]:
        store = DeltaStore(data_dir, open_registry(reg))
        try:
            key = store.registry.get_model(f"demo-{task}")
        finally:
            store.close()
        return key, (ft / RESULT_FILE).stat().st_mtime, json.loads((ft / EVAL_FILE).read_text())

    key, stamp, row = state()
    assert row["examples"] == 24
    out = _demo(tiny_bert_dir, eval_n=16)
    assert "reused" not in out
    key2, stamp2, row2 = state()
    assert (key2, stamp2) == (key, stamp) and row2["examples"] == 16
    out = _demo(tiny_bert_dir, steps=5, eval_n=16)
    assert "reused" not in out
    key3, stamp3, row3 = state()
    rec = json.loads((ft / RESULT_FILE).read_text())
    assert rec["steps"] == 5 and stamp3 != stamp
    assert key3 != key and row3["manifest_key"] == key3  # the new fine-tune's delta
    assert _demo(tiny_bert_dir, steps=5, eval_n=16).count("reused the fine-tune") == len(TASKS)
    _demo(tiny_bert_dir, steps=5, eval_n=16, rate=0.9)
    key4, stamp4, row4 = state()
    assert stamp4 == stamp3 and key4 != key3 and (row4["manifest_key"], row4["p"]) == (key4, 0.9)


def test_port_0_serves_on_the_free_port_its_request_lines_name(
    tiny_bert_dir: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--port 0` picks a free port before the fine-tunes; the curl and openai lines and
    the server use that port, not 0 and not DAREX_PORT (taken here)."""
    import socket

    import uvicorn

    served: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(kw))
    args = ["demo", "--base", str(tiny_bert_dir), "--steps", "2", "--train", "32", "--eval", "8"]
    args += ["--task", "rt-sentiment", "--host", "127.0.0.1", "--port", "0"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("DAREX_PORT", str(taken.getsockname()[1]))
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output + repr(res.exception)
        port = served["port"]
        assert port != taken.getsockname()[1]
    assert served["host"] == "127.0.0.1" and 0 < port < 65536
    assert f"http://127.0.0.1:{port}/v1/classify" in res.output
    assert f"on http://127.0.0.1:{port} (Ctrl-C stops)" in res.output
    assert "127.0.0.1:0" not in res.output
