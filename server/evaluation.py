"""Evaluation of a fine-tune on a task split: predictions, then ``Task.metric``.

Classification predicts ``argmax`` of the logits; generation decodes greedily
(``Task.max_new_tokens`` tokens, stopping at EOS) from left-padded prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from storage.predict import DEFAULT_MAX_LENGTH, eos_id, load_tokenizer, pad_id, predict, reference
from storage.tasks import Task, load_task

__all__ = [  # predict and its helpers live in storage.predict (ingest uses them too)
    "DEFAULT_MAX_LENGTH",
    "RESULT_FILE",
    "eos_id",
    "evaluate",
    "load_finetuned",
    "pad_id",
    "pick_device",
    "predict",
    "reference",
]

RESULT_FILE = "darex_finetune.json"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_finetuned(path: Path | str, device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) of a folder written by ``finetune`` (full or LoRA)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    cfg_file = path / (
        "adapter_config.json" if (path / "adapter_config.json").is_file() else "config.json"
    )
    cfg = json.loads(cfg_file.read_text())
    if cfg_file.name == "adapter_config.json":
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        cls = (
            AutoPeftModelForCausalLM
            if cfg.get("task_type") == "CAUSAL_LM"
            else AutoPeftModelForSequenceClassification
        )
    else:
        archs = cfg.get("architectures") or []
        cls = (
            AutoModelForSequenceClassification
            if any(a.endswith("ForSequenceClassification") for a in archs)
            else AutoModelForCausalLM
        )
    model = cls.from_pretrained(path, dtype=torch.float32).to(pick_device(device)).eval()
    return model, load_tokenizer(path)


def evaluate(
    model_dir_or_model: Any,
    task: Task | str,
    split: str = "validation",
    *,
    tokenizer: Any = None,
    limit: int | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = False,
) -> float:
    """Task metric of a fine-tune (folder, or a loaded model plus its tokenizer) on a split.

    ``max_length`` defaults to the one the folder was trained with, else 64 tokens.
    """
    task = load_task(task) if isinstance(task, str) else task
    if isinstance(model_dir_or_model, str | Path):
        folder = Path(model_dir_or_model)
        model, tok = load_finetuned(folder)
        tokenizer = tokenizer or tok
        if max_length is None and (folder / RESULT_FILE).is_file():
            settings = json.loads((folder / RESULT_FILE).read_text()).get("settings", {})
            max_length = settings.get("max_length")
    else:
        model = model_dir_or_model
        if tokenizer is None:
            tokenizer = load_tokenizer(model.name_or_path)
    was_training = model.training
    model.eval()
    exs = task.split(split)[:limit] if limit else task.split(split)
    preds = predict(
        model,
        tokenizer,
        task,
        exs,
        batch_size=batch_size,
        max_length=max_length or DEFAULT_MAX_LENGTH,
        progress=progress,
    )
    model.train(was_training)
    return task.metric(preds, [reference(task, e) for e in exs])
