"""``darex finetune`` refuses what it cannot use, with exit 2 and one line, before any work:
an --out that holds data it did not write, the base's folder, bad option values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import server.cli.commands  # registers every command, as `darex` does
import server.training
from server.cli import app
from server.training import RESULT_FILE, FinetuneError, finetune
from storage import bases
from storage.bases import BaseInfo, resolve_base

runner = CliRunner()
FAST = ["--max-steps", "2", "--max-train", "8", "--max-eval", "8", "--batch-size", "4"]


def _flat(text: str) -> str:
    """The output with rich's box drawing and line wrapping taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.fixture()
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model is the first piece of work: a refusal must come before it."""

    def fail(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded: the check came too late")

    monkeypatch.setattr(server.training, "_load_model", fail)


def _run(base: Path | str, out: Path, *extra: str, data_dir: Path) -> tuple[int, str]:
    args = ["finetune", str(base), "rt-sentiment", "--out", str(out), *FAST, *extra]
    res = runner.invoke(app, [*args, "--data-dir", str(data_dir)], env={"COLUMNS": "300"})
    assert "Traceback" not in res.output
    return res.exit_code, _flat(res.output)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["full-folder", "file", "under-a-file"])
def test_out_that_holds_other_data_is_refused(
    tiny_bert_dir: Path, tmp_path: Path, no_training: None, where: str
) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine too")
    out = {
        "full-folder": keep,
        "file": tmp_path / "a-file",
        "under-a-file": tmp_path / "a-file" / "ft",
    }[where]
    before = _tree(tmp_path)
    code, text = _run(tiny_bert_dir, out, data_dir=tmp_path / "data")
    assert code == 2, text
    assert text.startswith("error: --out ") and str(out) in text
    assert {"full-folder": "holds other files", "file": "is a file"}.get(where, "a file") in text
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("data/")} == before


@pytest.mark.parametrize("where", ["base", "inside", "holding"])
def test_out_must_not_be_the_base_folder(
    tiny_bert_dir: Path, tmp_path: Path, no_training: None, where: str
) -> None:
    base = tmp_path / "bases" / "bert"
    base.mkdir(parents=True)
    for f in tiny_bert_dir.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    out = {"base": base, "inside": base / "ft", "holding": tmp_path / "bases"}[where]
    before = _tree(base)
    code, text = _run(base, out, data_dir=tmp_path / "data")
    assert code == 2, text
    assert "must not be the base's folder" in text
    assert _tree(base) == before


def test_catalog_base_folder_is_refused_too(
    tiny_bert_dir: Path, tmp_path: Path, no_training: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catalog name is compared by the folder it resolves to."""
    base = tmp_path / "cat-bert"
    base.mkdir()
    for f in tiny_bert_dir.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    monkeypatch.setitem(bases.CATALOG, "tiny-cat", bases._Entry("encoder", "t", lambda _d: base))
    code, text = _run("tiny-cat", base / "ft", data_dir=tmp_path / "data")
    assert code == 2 and "must not be the base's folder" in text, text
    assert not (base / "ft").exists()


def test_previous_output_is_replaced_as_a_whole(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    out.mkdir()
    (out / RESULT_FILE).write_text("{}")  # a previous run's output
    (out / "stale.bin").write_text("from the previous run")
    code, text = _run(tiny_bert_dir, out, "--lr", "1e-3", data_dir=tmp_path / "data")
    assert code == 0, text
    assert not (out / "stale.bin").exists()
    assert json.loads((out / RESULT_FILE).read_text())["steps"] == 2
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ft")] == []


def test_check_out_dir_allows_new_empty_and_previous_output(tmp_path: Path) -> None:
    check_out_dir = server.training.check_out_dir
    check_out_dir(tmp_path / "new" / "deeper")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / RESULT_FILE).write_text("{}")
    (tmp_path / "prev" / "model.safetensors").write_text("x")
    check_out_dir(tmp_path / "prev", tmp_path / "base")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FinetuneError, match="dangling"):
        check_out_dir(tmp_path / "dangling")


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BaseInfo:
    return resolve_base(str(tiny_bert_dir), tmp_path_factory.mktemp("data"))


def test_library_finetune_refuses_too(
    tiny_bert: BaseInfo, tmp_path: Path, no_training: None
) -> None:
    """Python callers are protected as the CLI is, before the model is loaded."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine too")
    with pytest.raises(FinetuneError, match="holds other files"):
        finetune(tiny_bert, "rt-sentiment", full, max_steps=1)
    with pytest.raises(FinetuneError, match="is a file"):
        finetune(tiny_bert, "rt-sentiment", tmp_path / "a-file", max_steps=1)
    with pytest.raises(FinetuneError, match="base's folder"):
        finetune(tiny_bert, "rt-sentiment", tiny_bert.path, max_steps=1)
    with pytest.raises(FinetuneError, match="base's folder"):
        finetune(tiny_bert, "rt-sentiment", tiny_bert.path / "ft", max_steps=1)
    assert (full / "notes.txt").read_text() == "mine"
    assert (tmp_path / "a-file").read_text() == "mine too"
    assert not (tiny_bert.path / "ft").exists()
    bad = {"batch_size": 0, "lr": -1.0, "max_train": -5, "max_length": 0, "device": "tpu"}
    for key, value in bad.items():
        with pytest.raises(FinetuneError):
            finetune(tiny_bert, "rt-sentiment", tmp_path / "x", **{key: value})
    with pytest.raises(FinetuneError, match="rank"):
        finetune(tiny_bert, "rt-sentiment", tmp_path / "x", lora=True, rank=0)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--device", "tpu"], "--device"),
        (["--device", "cuda"], "no CUDA device"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lora", "--rank", "0"], "--rank"),
        (["--max-train", "-5"], "--max-train"),
        (["--max-length", "0"], "--max-length"),
        (["--max-eval", "-1"], "--max-eval"),
        (["--epochs", "0"], "--epochs"),
        (["--max-steps", "0"], "--max-steps"),
        (["--reg", "-1"], "--reg"),
    ],
)
def test_bad_values_exit_2_before_any_work(
    tiny_bert_dir: Path,
    tmp_path: Path,
    no_training: None,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    expect: str,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, text = _run(tiny_bert_dir, tmp_path / "out", *args, data_dir=tmp_path / "data")
    assert code == 2, text
    assert expect in text
    assert not (tmp_path / "out").exists()


def test_other_failures_print_one_line(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*_a: object, **_k: object) -> None:
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")

    monkeypatch.setattr(server.training, "_load_model", oom)
    args = ["finetune", str(tiny_bert_dir), "rt-sentiment", "--out", str(tmp_path / "o"), *FAST]
    res = runner.invoke(app, [*args, "--data-dir", str(tmp_path / "data")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert lines == ["error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    assert not (tmp_path / "o").exists()


def test_out_where_nothing_can_be_written_is_refused_before_training(
    tiny_bert_dir: Path, tmp_path: Path, no_training: None
) -> None:
    """/proc takes no new folder, even from root: found before the base loads, not after
    the training when the checkpoint is written."""
    code, text = _run(tiny_bert_dir, Path("/proc/darex-out"), data_dir=tmp_path)
    assert code == 2 and "--out /proc/darex-out: cannot write in /proc" in text, text
