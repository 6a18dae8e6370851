"""Evaluation of a fine-tune on a task split: predictions, then ``Task.metric``.

Classification predicts ``argmax`` of the logits; generation decodes greedily
(``Task.max_new_tokens`` tokens, stopping at EOS) from left-padded prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from storage.tasks import Example, Task, load_task

DEFAULT_MAX_LENGTH = 64  # tokens per example, as in training
RESULT_FILE = "darex_finetune.json"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pad_id(tokenizer: Any, model: Any) -> int:
    """The tokenizer's pad token, else EOS, else 0."""
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, model.config.eos_token_id, 0):
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def eos_id(tokenizer: Any, model: Any) -> int | None:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else None
    if eos is None:
        eos = model.config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos


def reference(task: Task, e: Example) -> int | str:
    return e.label if task.kind == "classification" else e.target


@torch.no_grad()
def predict(
    model: Any,
    tokenizer: Any,
    task: Task,
    exs: Sequence[Example],
    batch_size: int = 32,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = False,
) -> list[int] | list[str]:
    """Predicted label indices (classification) or greedy continuations (generation)."""
    device = next(model.parameters()).device
    preds: list = []
    for i in tqdm(range(0, len(exs), batch_size), desc="evaluate", disable=not progress):
        chunk = exs[i : i + batch_size]
        if task.kind == "classification":
            enc = tokenizer(
                [e.text for e in chunk],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            preds += model(**enc).logits.argmax(-1).tolist()
        else:
            preds += _generate(
                model, tokenizer, [e.text for e in chunk], task.max_new_tokens, max_length, device
            )
    return preds


def _generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    new_tokens: int,
    max_length: int,
    device: torch.device,
) -> list[str]:
    pad, eos = pad_id(tokenizer, model), eos_id(tokenizer, model)
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_length:] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every prompt ends at the same column
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def load_finetuned(path: Path | str, device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) of a folder written by ``finetune`` (full or LoRA)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

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
    return model, AutoTokenizer.from_pretrained(path)


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
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
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
