"""DAREx-q's q from unlabeled texts: the output-change search on base + delta.

Used by ``darex prune --q outchange`` and by ingest when calibration texts come
with a fine-tune. The fine-tune is rebuilt as base + delta (so a LoRA adapter's
B @ A works the same as a full checkpoint), the texts run through it once, and
``pruning.q.search_q_global`` scans q from 1-p (plain DARE) up for the q whose
DAREx-q mask changes those outputs least: the last hidden state for encoders, the
fine-tune's top-5 logits for decoders. The masks are drawn by the checkpoint's
tensor names, so the q is scored on the very mask that is stored.

In the reproduction grid (docs/results/reproduce.md) this unlabeled choice came
within 3.3 points of a q searched on labels wherever DARE's noise mattered.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pruning.errors import PruningError
from pruning.q import output_change_score, search_q_global
from storage.predict import load_tokenizer

BATCH = 8
MAX_TEXTS = 64  # 8 batches: a few hundred tokens per batch on CPU


def read_calib_texts(raw: str) -> list[str]:
    """One sample per line (blank lines skipped; a JSON line's ``text`` field is used)."""
    texts = []
    for line in raw.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError, AttributeError):  # plain text after all
                line = str(json.loads(line).get("text", ""))
        if line:
            texts.append(line)
    return texts


def parameter_for(
    own: Mapping[str, torch.Tensor], name: str, shape: torch.Size, prefix: str
) -> str | None:
    """The model parameter a base tensor ``name`` is: the name as is, with the model's
    ``base_model_prefix`` added (a head model over the base) or removed; None when no
    parameter of that shape has one of those names."""
    key = next((k for k in (name, prefix + name, name.removeprefix(prefix)) if k in own), None)
    return key if key is not None and own[key].shape == shape else None


def _finetuned(
    base_path: Path, arch: str, deltas: Mapping[str, torch.Tensor]
) -> tuple[Any, Any, dict[str, torch.Tensor], dict[str, str]]:
    """The base model with the deltas added (the fine-tune), its tokenizer, and the
    deltas and base tensor names by the model's parameter names."""
    import transformers

    cls = transformers.AutoModelForCausalLM if arch == "decoder" else transformers.AutoModel
    model = cls.from_pretrained(str(base_path), dtype=torch.float32).eval()
    tok = load_tokenizer(base_path)
    own = dict(model.named_parameters())
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    mapped: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    with torch.no_grad():
        for name, d in deltas.items():
            key = parameter_for(own, name, d.shape, prefix)
            if key is None or key in mapped:
                continue
            own[key].add_(d.to(own[key].dtype))  # the fine-tune: base + delta
            mapped[key], names[key] = d, name
    if not mapped:
        raise PruningError("no pruned tensor is a parameter of the base model")
    return model, tok, mapped, names


def text_batches(
    tok: Any,
    texts: Sequence[str],
    max_length: int,
    limit: int | None = MAX_TEXTS,
    batch: int = BATCH,
) -> list[dict[str, torch.Tensor]]:
    """The first ``limit`` non-blank texts tokenized in padded batches (ids and mask)."""
    texts = [t for t in texts if t.strip()][:limit]
    if not texts:
        raise PruningError("calibration texts are empty: nothing to measure on them")
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(
            list(texts[i : i + batch]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        out.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")})
    return out


@torch.no_grad()
def outchange_q(
    base_path: Path,
    arch: str,
    deltas: Mapping[str, torch.Tensor],
    texts: Sequence[str],
    p: float,
    *,
    seed: int = 0,
    max_length: int = 128,
    on_step: Callable[[], None] | None = None,
) -> float:
    """The q of the output-change search; ``deltas`` are keyed by the base's tensor names."""
    if not any(t.strip() for t in texts):
        raise PruningError("calibration texts are empty: no q can be chosen from them")
    model, tok, mapped, mask_names = _finetuned(base_path, arch, deltas)
    batches = text_batches(tok, texts, max_length)
    score = output_change_score(
        model, mapped, p, batches, arch=arch, seeds=(seed,), mask_names=mask_names
    )

    def counted(q: float) -> float:
        if on_step is not None:
            on_step()
        return score(q)

    return search_q_global(counted, p, refine=4).q


@torch.no_grad()
def wanda_col_norms(
    base_path: Path,
    arch: str,
    deltas: Mapping[str, torch.Tensor],
    texts: Sequence[str],
    *,
    max_length: int = 128,
) -> dict[str, torch.Tensor]:
    """WANDA's input-feature norms ``||X_j||_2`` of each pruned linear weight, by the
    base's tensor name, over the texts' tokens through the fine-tune (base + delta), as
    ``darex prune --method wanda --calib`` measures them. Tensors that are no linear
    layer's weight (embeddings, norms, biases) have none."""
    model, tok, _, names = _finetuned(base_path, arch, deltas)
    return input_col_norms(model, tok, names, texts, max_length)


@torch.no_grad()
def input_col_norms(
    model: Any,
    tok: Any,
    names: Mapping[str, str],
    texts: Sequence[str],
    max_length: int,
    limit: int | None = MAX_TEXTS,
    batch: int = BATCH,
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` of each linear weight ``names`` lists (model parameter name -> base
    tensor name) over the texts' tokens through ``model``, keyed by the base name."""
    from pruning.calib import capture

    batches = text_batches(tok, texts, max_length, limit=limit, batch=batch)
    stats = capture(model, batches, names=list(names))
    return {names[k]: s.col_norm for k, s in stats.items()}
