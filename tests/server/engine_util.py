"""Engine test helpers: random fine-tunes pruned with DARE, and their merged checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pruning.methods import dare
from pruning.sparse import SparseDelta
from server.deltas import MemorySource


def base_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The base checkpoint's own tensors (names as stored)."""
    return load_file(str(model_dir / "model.safetensors"))


def random_finetune(
    base: dict[str, torch.Tensor], *, seed: int, p: float, scale: float = 0.05
) -> dict[str, SparseDelta]:
    """d = scale * N(0, 1) per floating tensor, pruned by DARE at rate p (mask seed = seed)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in sorted(base.items()):
        if not w.is_floating_point():
            continue
        d = torch.randn(w.shape, generator=g, dtype=torch.float32) * scale
        out[name] = dare(d.to(w.dtype), p, seed=seed, name=name)
    return out


def merged_state(
    base: dict[str, torch.Tensor], deltas: dict[str, SparseDelta]
) -> dict[str, torch.Tensor]:
    """base + to_dense(delta) per tensor: the merged pruned checkpoint."""
    return {
        k: (v + deltas[k].to_dense(v.dtype)) if k in deltas else v.clone() for k, v in base.items()
    }


def save_merged(
    src_dir: Path,
    dst_dir: Path,
    state: dict[str, torch.Tensor],
    *,
    prefix: str = "",
    extras: dict[str, torch.Tensor] | None = None,
    config_update: dict | None = None,
) -> Path:
    """Write a plain HF folder: src config (+ update) and tokenizer, merged weights."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, dst_dir / f.name)
    if config_update:
        cfg = json.loads((src_dir / "config.json").read_text())
        cfg.update(config_update)
        (dst_dir / "config.json").write_text(json.dumps(cfg))
    tensors = {prefix + k: v.contiguous() for k, v in state.items()}
    tensors.update(extras or {})
    save_file(tensors, str(dst_dir / "model.safetensors"), metadata={"format": "pt"})
    return dst_dir


def random_source(
    base: dict[str, torch.Tensor], models: dict[str, tuple[int, float]]
) -> tuple[MemorySource, dict[str, dict[str, SparseDelta]]]:
    """A source holding ``model_id -> random_finetune(seed, p)`` causal-LM deltas."""
    src = MemorySource()
    fts = {}
    for mid, (seed, p) in models.items():
        fts[mid] = random_finetune(base, seed=seed, p=p)
        src.add_sparse(mid, fts[mid], task="causal-lm")
    return src, fts


def expected_buffers(eng, model_ids) -> dict[str | None, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The flat buffer each model should leave: base (None) and base + delta per model."""
    base_flat = eng.buf.clone()
    out: dict[str | None, torch.Tensor] = {None: base_flat}
    for mid in model_ids:
        rd = eng.cache.get(mid)
        out[mid] = base_flat.clone().index_add_(0, rd.idx, rd.val)
    return out


def faulting_swap(real):  # type: ignore[no-untyped-def]
    """A swap kernel that faults part-way: A restored, half of B saved and applied, then
    an error, as a device fault mid-kernel leaves the buffer."""

    def swap(buf, idx_a, saved_a, idx_b, val_b, saved_b, impl=None) -> None:  # type: ignore[no-untyped-def]
        k = idx_b.numel() // 2
        real(buf, idx_a, saved_a, idx_b[:k], val_b[:k], saved_b[:k], impl=impl)
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    return swap
