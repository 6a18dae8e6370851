"""`darex add / ls / rm / gc / verify` through typer's CliRunner, on a real tiny fine-tune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import server.cli.store  # noqa: F401  (registers the commands)
from server.cli import app
from server.settings import get_settings

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    monkeypatch.setenv("DAREX_ENV", "development")
    monkeypatch.setenv("DAREX_DATA_DIR", str(data))
    monkeypatch.setenv("DAREX_BASE", str(tiny_bert_dir))
    monkeypatch.delenv("DAREX_REGISTRY_URL", raising=False)
    get_settings.cache_clear()
    yield data
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def ft(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    out = tmp_path_factory.mktemp("cli-ft")
    model.save_pretrained(out)
    return out


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_add_ls_verify_rm_gc(env: Path, ft: Path) -> None:
    r = run("add", "feat", str(ft), "--method", "dare", "--rate", "0.9")
    assert r.exit_code == 0, r.output
    assert "added feat" in r.output and "dare" in r.output
    r = run("add", "feat-q", str(ft), "--method", "darex_q", "--rate", "0.9", "--q", "0.2")
    assert r.exit_code == 0, r.output
    r = run("ls")
    assert r.exit_code == 0 and "feat" in r.output and "darex_q" in r.output and "1/" in r.output
    r = run("verify")
    assert r.exit_code == 0 and "0 problem(s)" in r.output
    r = run("rm", "feat-q")
    assert r.exit_code == 0
    assert run("rm", "feat-q").exit_code == 1
    r = run("gc", "--grace-s", "0")
    assert r.exit_code == 0 and "deleted" in r.output
    assert "deleted 0 blob" not in r.output
    assert "feat-q" not in run("ls").output


def test_verify_fails_on_a_corrupted_blob(env: Path, ft: Path) -> None:
    assert run("add", "m", str(ft), "--method", "magnitude", "--rate", "0.99").exit_code == 0
    blob = max((env / "objects").rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else 0)
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    blob.write_bytes(bytes(raw))
    r = run("verify")
    assert r.exit_code == 1 and "corrupt" in r.output


def test_add_refuses_bad_input_with_a_message(env: Path, ft: Path) -> None:
    r = run("add", "../evil", str(ft), "--method", "dare")
    assert r.exit_code == 1 and "InvalidModelId" in r.output
    r = run("add", "ok", str(ft / "nope.bin"), "--method", "dare")
    assert r.exit_code == 1 and "pickle" in r.output
    r = run("add", "minilm-l6", str(ft), "--method", "dare", "--base", "minilm-l6")
    assert r.exit_code == 1 and "the base's own id" in r.output, r.output
    assert "minilm-l6" not in run("ls").output  # nothing stored
