"""Batched generation for causal LMs: left padding, KV cache, per-request sampling and stops.

One call of :func:`generate_batch` runs a prefill over the left-padded prompts of
one batch, then a decode loop that feeds one token per live row and reuses the
KV cache. Rows that finish (EOS, stop string, ``max_tokens``, cancelled) leave
the batch: their cache rows are dropped, so the remaining rows run narrower.

Sampling of row ``i`` at a step: ``argmax(logits)`` when ``temperature <
MIN_TEMPERATURE`` (0 included), else a draw from ``softmax(logits / temperature)``
restricted to the smallest top-p nucleus, using the row's own ``torch.Generator``
seeded by the request. A row whose step raises fails alone when it has a ``fail``
callback; the other rows of the batch go on.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# Below this, sampling is argmax: softmax(logits / T) is one-hot to float precision for
# any logit gap that matters, and logits / T would overflow to inf (then NaN) as T -> 0.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """What one completion request asks for."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text; the last chunk of a request carries ``finish_reason``."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Row:
    """The decode state of one request inside a batch."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Chunk], None]
    is_cancelled: Callable[[], bool]
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of decoded text already sent
    text: str = ""  # text sent so far
    generator: torch.Generator | None = None
    done: bool = False
    fail: Callable[[BaseException], None] | None = None  # None: a row's error ends the batch


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids fed for a text prompt: its tokens, after BOS when the tokenizer adds one.

    No end-of-sequence marker is appended (an encoder tokenizer would add ``[SEP]``,
    which a decoder reads as the end of the text).
    """
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [bos, *ids]
    return ids


def _cache_arg(model) -> str:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _sample(logits: torch.Tensor, row: Row) -> int:
    """One next token for a row from its last-position logits (V,)."""
    p = row.params
    if p.temperature < MIN_TEMPERATURE:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < p.top_p
        keep[0] = True  # the top token, also at top_p 0 (where the sum before it, 0, is not < 0)
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=row.generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _advance_text(row: Row, tokenizer, final: bool) -> str | None:
    """Emit the newly decoded text of a row; returns 'stop' when a stop string ended it."""
    full = tokenizer.decode(row.generated, skip_special_tokens=True)
    stops = row.params.stop
    if stops:
        start = max(0, row.emitted - max(len(s) for s in stops))
        hits = [i for s in stops if (i := full.find(s, start)) >= 0]
        if hits:
            cut = min(hits)
            _send(row, full[row.emitted : cut] if cut > row.emitted else "")
            return "stop"
    safe = len(full)
    if not final:
        if full.endswith("\ufffd"):  # a multi-byte character split over tokens
            safe = len(full.rstrip("\ufffd"))
        if stops:  # hold back what could still become a stop string
            safe = min(safe, len(full) - max(len(s) for s in stops) + 1)
    if safe > row.emitted:
        _send(row, full[row.emitted : safe])
    return None


def _send(row: Row, piece: str) -> None:
    if piece:
        row.text += piece
        row.emitted += len(piece)
        row.emit(Chunk(piece))


def _finish(row: Row, reason: str) -> None:
    row.done = True
    row.emit(
        Chunk(
            "",
            finish_reason=reason,
            prompt_tokens=len(row.prompt),
            completion_tokens=len(row.generated),
        )
    )


def _step(row: Row, logits: torch.Tensor, tokenizer, eos_ids: set[int], max_pos: int) -> int | None:
    """Sample, emit and maybe finish one row; the token to feed next, None when it finished."""
    tok = _sample(logits, row)
    if tok in eos_ids:
        _advance_text(row, tokenizer, final=True)
        _finish(row, "stop")
        return None
    row.generated.append(tok)
    reason = _advance_text(row, tokenizer, final=False)
    if reason is None and len(row.generated) >= row.params.max_tokens:
        _advance_text(row, tokenizer, final=True)
        reason = "length"
    if reason is None and len(row.prompt) + len(row.generated) >= max_pos:
        _advance_text(row, tokenizer, final=True)
        reason = "length"
    if reason is not None:
        _finish(row, reason)
        return None
    return tok


@torch.inference_mode()
def generate_batch(model, tokenizer, rows: Sequence[Row], device: torch.device) -> None:
    """Generate for every row together; each row's chunks go to its own ``emit``."""
    rows = [r for r in rows if not r.is_cancelled()]
    if not rows:
        return
    for r in rows:
        seed = (
            r.params.seed if r.params.seed is not None else int.from_bytes(os.urandom(8), "little")
        )
        # OpenAI's seed is a signed 64-bit integer; a generator takes it modulo 2**64
        r.generator = torch.Generator(device=device).manual_seed(seed % 2**64)
    max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    eos = tokenizer.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    cfg_eos = getattr(model.config, "eos_token_id", None)
    eos_ids |= {cfg_eos} if isinstance(cfg_eos, int) else set(cfg_eos or ())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    width = max(len(r.prompt) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long)
        mask[i, width - len(r.prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)  # (B, T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions ignore the left padding
    cache_arg = _cache_arg(model)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
    )
    past, logits = getattr(out, cache_arg), out.logits[:, -1, :]  # (B, V)
    last_pos = pos[:, -1]  # (B,)
    live = list(range(len(rows)))  # rows[live[j]] is row j of the cache

    while True:
        nxt: list[int] = []
        keep: list[int] = []
        for j, i in enumerate(live):
            r = rows[i]
            if r.is_cancelled():
                r.done = True
                continue
            try:
                tok = _step(r, logits[j], tokenizer, eos_ids, max_pos)
            except Exception as e:  # this row's own failure (a bad draw): it alone ends
                if r.fail is None:
                    raise
                r.done = True
                r.fail(e)
                continue
            if tok is not None:
                nxt.append(tok)
                keep.append(j)
        if not keep:
            return
        if len(keep) < len(live):  # finished rows leave the batch and free their cache rows
            sel = torch.tensor(keep, device=device)
            past.batch_select_indices(sel)
            mask, last_pos = mask[sel], last_pos[sel]
            live = [live[j] for j in keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T+1)
        last_pos = last_pos + 1
        step_ids = torch.tensor(nxt, dtype=torch.long, device=device)[:, None]  # (B, 1)
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=last_pos[:, None],
            use_cache=True,
            **{cache_arg: past},
        )
        past, logits = getattr(out, cache_arg), out.logits[:, -1, :]
