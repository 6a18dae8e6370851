"""The experiment bench: one fine-tuned model with its base's weights at hand.

``Lab`` holds a fine-tune loaded in memory, the base weights of every parameter the
base has, and the deltas ``d = W_ft - W_base``. ``apply(pruned)`` sets each pruned
parameter to ``W_base + sparse(d)`` (a scatter-add on the base weights, as the server
does), ``restore()`` puts the fine-tuned weights back, ``metric(exs)`` evaluates the
task. Parameters the base lacks (a new classification head) keep their fine-tuned
values; on decoders only the tensors ``pruning.select.default_patterns`` selects are
pruned (the others keep their exact fine-tuned values, as ingest stores them).

Masks are keyed by the base's own tensor names, so the DARE mask drawn here is the one
``darex add`` would store for the same seed and rate.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pruning.methods import dare, method_for, prune_tensor
from pruning.recommend import DeltaStats, delta_stats, merge_stats
from pruning.select import default_patterns
from pruning.sparse import SparseDelta
from server.evaluation import load_finetuned, pick_device, predict, reference
from storage.bases import BaseInfo, safetensors_files
from storage.tasks import Example, Task

log = logging.getLogger(__name__)

Pruned = dict[str, SparseDelta]  # parameter name -> sparse delta (values rescaled)


def by_length(exs: Sequence[Example]) -> list[Example]:
    """Examples sorted by text length: batches pad less, the metric is order-free."""
    return sorted(exs, key=lambda e: len(e.text))


def slug(name: str) -> str:
    """A catalog name as is; a folder path as its last part (a safe directory name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name or name).strip("-") or "base"


def _base_tensors(base: BaseInfo) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(base.path):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118  (safe_open has no __iter__)
                out[k] = fh.get_tensor(k)
    return out


@dataclass
class Lab:
    """A fine-tune in memory with its base weights: apply pruned deltas, evaluate, restore."""

    model: Any
    tokenizer: Any
    task: Task
    arch: str
    base_w: dict[str, torch.Tensor]  # parameter name -> base weight (fp32)
    ft_w: dict[str, torch.Tensor]  # parameter name -> fine-tuned weight (fp32)
    base_names: dict[str, str]  # parameter name -> the base checkpoint's tensor name
    pruned_names: list[str]  # parameters that are pruned (the others stay exact)
    batch_size: int = 64
    max_length: int = 128

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    @property
    def device(self) -> torch.device:
        """Where the model runs; the weights and the pruning stay on the CPU."""
        return next(self.model.parameters()).device

    def delta(self, name: str) -> torch.Tensor:
        return self.ft_w[name] - self.base_w[name]

    def stats(self, names: Sequence[str] | None = None) -> DeltaStats:
        """Merged delta statistics (with the base rms) over the pruned parameters."""
        names = self.pruned_names if names is None else names
        return merge_stats(delta_stats(self.delta(n), self.base_w[n]) for n in names)

    # -- weights ---------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self, pruned: Pruned, factor: float = 1.0) -> None:
        """``W = W_base + factor * sparse(d)`` for every pruned parameter."""
        params = self.params
        dev = self.device
        for n in self.pruned_names:
            sd = pruned[n]
            w = self.base_w[n].to(dev, copy=True)
            vals = sd.values.float() if factor == 1.0 else sd.values.float() * factor
            w.view(-1).index_add_(0, sd.indices.to(dev), vals.to(dev))
            params[n].data.copy_(w)

    @torch.no_grad()
    def apply_base(self) -> None:
        """Every pruned parameter back to the base (the fine-tune's head stays)."""
        params = self.params
        for n in self.pruned_names:
            params[n].data.copy_(self.base_w[n])

    @torch.no_grad()
    def restore(self) -> None:
        params = self.params
        for n in self.pruned_names:
            params[n].data.copy_(self.ft_w[n])

    # -- pruning ---------------------------------------------------------------------------

    def prune(
        self,
        method: str,
        p: float,
        seed: int = 0,
        *,
        q: float | dict[str, float] | None = None,
        col_norms: dict[str, torch.Tensor] | None = None,
        **kw: Any,
    ) -> Pruned:
        """One method on every pruned parameter; ``q`` a number or per-parameter dict."""
        out: Pruned = {}
        for n in self.pruned_names:
            d = self.delta(n)
            tq = q.get(n) if isinstance(q, dict) else q
            cn = (col_norms or {}).get(n)
            m = method_for(method, d, cn)  # WANDA without input norms: magnitude
            out[n] = prune_tensor(
                m, d, p, name=self.base_names[n], seed=seed, q=tq, col_norm=cn, **kw
            )
        return out

    def dare_masks(self, p: float, seed: int) -> Pruned:
        """DARE (scale 1/(1-p)); DAREx-q with q is ``apply(masks, (1-p)/q)``."""
        return {
            n: dare(self.delta(n), p, seed=seed, name=self.base_names[n]) for n in self.pruned_names
        }

    # -- evaluation ------------------------------------------------------------------------

    def metric(self, exs: Sequence[Example]) -> float:
        preds = predict(
            self.model,
            self.tokenizer,
            self.task,
            exs,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
        return self.task.metric(preds, [reference(self.task, e) for e in exs])

    def metric_with(self, pruned: Pruned, exs: Sequence[Example], factor: float = 1.0) -> float:
        try:
            self.apply(pruned, factor)
            return self.metric(exs)
        finally:
            self.restore()

    def q_scorer(self, masks: Pruned, p: float, exs: Sequence[Example]) -> Callable[[float], float]:
        """Score callback for ``search_q_global``: the metric on ``exs`` with scale 1/q."""
        return lambda q: self.metric_with(masks, exs, (1.0 - p) / q)

    def bytes_fp16(self, pruned: Pruned) -> int:
        """Stored size estimate: fp16 values, plus int32 indices unless the mask is a seed."""
        total = 0
        for sd in pruned.values():
            total += 2 * sd.nnz + (0 if sd.mask_seed is not None else 4 * sd.nnz)
        return total


def open_lab(
    base: BaseInfo, ft_dir: Path | str, task: Task, device: str = "auto", **kw: Any
) -> Lab:
    """Load the fine-tune in ``ft_dir`` (a full checkpoint) next to its base's weights.

    The model runs on ``device`` (``auto``: the GPU when there is one); the base and
    fine-tuned weights stay on the CPU, where the masks are drawn, so a mask is the one
    ``darex add`` stores whatever the device."""
    model, tokenizer = load_finetuned(ft_dir, device="cpu")  # with a pad token
    lora = (Path(ft_dir) / "adapter_config.json").is_file()
    if lora:  # W = W_base + B @ A * scaling: the LoRA delta, dense, on the targeted linears
        model = model.merge_and_unload()
    base_t = _base_tensors(base)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    selector = default_patterns(base.arch)
    base_w, ft_w, names, pruned = {}, {}, {}, []
    for n, prm in model.named_parameters():
        bn = n if n in base_t else n.removeprefix(prefix)
        if bn not in base_t or not prm.is_floating_point():
            continue  # a new head: stays as fine-tuned
        names[n] = bn
        base_w[n] = base_t[bn].float()
        ft_w[n] = prm.detach().float().clone()
        if selector.matches(bn) and not (lora and torch.equal(ft_w[n], base_w[n])):
            pruned.append(n)
    if not pruned:
        raise ValueError(f"{ft_dir}: no parameter matches the base {base.name}")
    model.to(pick_device(device))
    log.info("lab %s: %d pruned tensors", task.name, len(pruned), extra={"model_id": str(ft_dir)})
    return Lab(model, tokenizer, task, base.arch, base_w, ft_w, names, pruned, **kw)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not xs:
        return float("nan"), 0.0
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
