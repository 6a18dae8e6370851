"""Predictions of a loaded model on task examples: the part of evaluation ingest needs too.

Classification predicts ``argmax`` of the logits; generation decodes greedily
(``Task.max_new_tokens`` tokens, stopping at EOS) from left-padded prompts.
``server.evaluation`` adds loading a fine-tune and a task split on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from storage.tasks import Example, Task

DEFAULT_MAX_LENGTH = 64  # tokens per example, as in training


def load_tokenizer(path: Any) -> Any:
    """The ``AutoTokenizer`` in ``path`` with a pad token (its own, else EOS): batches of
    several texts are padded, and some conversions (a GGUF's) leave none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


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
    """Predicted label indices (classification) or greedy continuations (generation), in
    the order of ``exs``. Batches are formed shortest first (``by_length``)."""
    if not exs:
        return []
    device = next(model.parameters()).device
    texts = [e.text for e in exs]
    rows = token_rows(tokenizer, task, texts, max_length)
    preds: list = [None] * len(exs)
    batches = by_length([len(r) for r in rows], batch_size)
    for batch in tqdm(batches, desc="evaluate", disable=not progress):
        if task.kind == "classification":
            # tokenized again with padding: padding the rows above with ``tokenizer.pad``
            # is what fast tokenizers warn is slower than this call
            enc = tokenizer(
                [texts[i] for i in batch],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            out = model(**enc).logits.argmax(-1).tolist()
        else:
            out = _generate(model, tokenizer, [rows[i] for i in batch], task.max_new_tokens, device)
        for i, pred in zip(batch, out, strict=True):
            preds[i] = pred
    return preds


def token_rows(tokenizer: Any, task: Task, texts: Sequence[str], max_length: int) -> list:
    """The token ids the model sees for each text: a classifier's with special tokens,
    truncated to ``max_length``; a decoder prompt's last ``max_length``, without them."""
    if task.kind == "classification":
        return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return [r[-max_length:] for r in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the examples in batches of ``batch_size``, shortest first (ties in the
    given order). A batch is padded to its longest example, so batches of similar lengths
    pad far less than batches in file order. At the reproduction's budgets (batches of 64)
    a row is 25.7 tokens instead of 32 on rt-sentiment's test split and 41.9 instead of
    60.9 on rt-sentiment-gen's prompts, and evaluation 1.33x and 1.49x faster on one
    thread (``bench/predict_order.py``).
    Padding is masked, so an example's prediction does not depend on its batch (its
    logits can, in the last bits of float rounding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _generate(
    model: Any,
    tokenizer: Any,
    rows: list[list[int]],
    new_tokens: int,
    device: torch.device,
) -> list[str]:
    """Greedy continuations of prompts given as token ids."""
    pad, eos = pad_id(tokenizer, model), eos_id(tokenizer, model)
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
