"""``darex finetune`` through typer's CliRunner, on the tiny real models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import server.cli.commands  # noqa: F401  (registers every command, as `darex` does)
from server.cli import app

runner = CliRunner()
FAST = ["--max-steps", "5", "--max-train", "16", "--max-eval", "16", "--batch-size", "8"]


def test_finetune_command_writes_a_checkpoint(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    args = ["finetune", str(tiny_bert_dir), "rt-sentiment", "--out", str(out), "--lr", "3e-3"]
    args += [*FAST, "--freeze-embeddings", "--data-dir", str(tmp_path / "data")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "validation accuracy:" in result.output
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    record = json.loads((out / "darex_finetune.json").read_text())
    assert record["steps"] == 5 and record["train_examples"] == 16
    assert record["settings"]["batch_size"] == 8 and record["settings"]["lr"] == 3e-3
    assert record["settings"]["train_embeddings"] is False
    emb = "embeddings.word_embeddings.weight"
    base = load_file(tiny_bert_dir / "model.safetensors")[emb]
    assert torch.equal(load_file(out / "model.safetensors")[f"bert.{emb}"], base)


def test_finetune_command_lora(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    args = ["finetune", str(tiny_llama_dir), "arith", "--out", str(out), "--lora", "--rank", "2"]
    result = runner.invoke(app, [*args, *FAST])
    assert result.exit_code == 0, result.output
    assert "validation exact-number:" in result.output and "LoRA adapter" in result.output
    settings = json.loads((out / "darex_finetune.json").read_text())["settings"]
    assert settings["lora"] and settings["rank"] == 2 and settings["lr"] == 1e-3
    assert (out / "adapter_model.safetensors").is_file()


def test_unknown_base_and_task_exit_with_the_names(tmp_path: Path, tiny_bert_dir: Path) -> None:
    out = ["--out", str(tmp_path / "x"), "--data-dir", str(tmp_path)]
    result = runner.invoke(app, ["finetune", "no-such-base", "rt-sentiment", *out])
    assert result.exit_code == 2
    assert "minilm-l6" in result.output and "smollm2-135m" in result.output
    result = runner.invoke(app, ["finetune", str(tiny_bert_dir), "no-such-task", *out])
    assert result.exit_code == 2
    assert "rt-sentiment" in result.output and "arith" in result.output
    result = runner.invoke(app, ["finetune", str(tiny_bert_dir), "arith", *out])
    assert result.exit_code == 2 and "encoder" in result.output
