"""PEFT LoRA adapter -> a ``Source`` of per-module deltas ``d = (B @ A) * alpha / r``.

Module names (PEFT's ``base_model.model.`` prefix stripped by ``storage.lora``)
are mapped onto the base's names like a full fine-tune's. A ``modules_to_save``
tensor the base has becomes an exact delta ``t - W_base``; one it lacks (a new
classification head) is an extra, stored dense.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from storage.checkpoint import Checkpoint, _best_mapping
from storage.errors import BaseMismatch
from storage.ingest import Source, storable_extra
from storage.lora import read_adapter

_TASKS = {"SEQ_CLS": "sequence-classification", "CAUSAL_LM": "causal-lm"}


def lora_task(config: dict) -> str:
    """The task an adapter's ``task_type`` names (feature-extraction when it names none)."""
    return _TASKS.get(str(config.get("task_type", "")).upper(), "feature-extraction")


def lora_source(folder: Path, base: Checkpoint) -> Source:
    adapter = read_adapter(folder)
    names = [*adapter.modules, *adapter.extras]
    mapping, _how = _best_mapping(names, set(base.names()))
    unmapped = [n for n in adapter.modules if n not in mapping]
    if unmapped:
        raise BaseMismatch(
            f"LoRA module(s) {unmapped[:3]} have no tensor in the base "
            f"(base has e.g. {base.names()[:3]}): wrong base?"
        )
    deltas: dict[str, Callable[[], torch.Tensor]] = {}
    for name, module in adapter.modules.items():
        bname = mapping[name]
        want = base.meta[bname].shape
        got = (module.b.shape[0], module.a.shape[1])
        if tuple(got[::-1] if module.transpose else got) != tuple(want):
            raise BaseMismatch(
                f"LoRA module {name!r}: B @ A has shape {got}, base {bname!r} has {want}"
            )
        deltas[bname] = lambda m=module, n=name: m.delta(n).float()
    extras: dict[str, Callable[[], torch.Tensor]] = {}
    for name, t in adapter.extras.items():
        if name in mapping:
            bname = mapping[name]
            if tuple(t.shape) != base.meta[bname].shape:
                raise BaseMismatch(
                    f"tensor {name!r}: base {bname!r} has shape {base.meta[bname].shape}, "
                    f"adapter has {tuple(t.shape)}"
                )
            deltas[bname] = lambda t=t, b=bname: t.float() - base.get(b).float()
        else:
            extras[name] = lambda t=t, n=name: storable_extra(t, n)
    task = lora_task(adapter.config)
    numel = sum(m.numel for m in base.meta.values() if m.dtype.is_floating_point)
    numel += sum(adapter.extras[n].numel() for n in extras)
    return Source(
        kind="lora",
        deltas=deltas,
        base_dtypes={b: base.meta[b].dtype for b in deltas},
        extras=extras,
        task=task,
        labels=None,
        fp16_bytes=2 * numel,
    )
