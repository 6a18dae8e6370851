"""Calibration statistics of the inputs of nn.Linear layers, captured with forward hooks.

Per linear layer (keyed by its weight's parameter name, ``<module>.weight``):
``xbar`` (mean input feature, for the analytical q), ``col_norm`` (L2 norm of each
input feature over all calibration tokens, for WANDA) and optionally a bounded sample
``x`` of input rows (for the least-squares q). Statistics are streamed: each batch
adds to running sums, nothing grows with the number of batches except the capped sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

Batch = Mapping[str, torch.Tensor]


@dataclass
class LayerStats:
    """Running input statistics of one linear layer."""

    count: int
    total: torch.Tensor  # (in,) fp64 sum of inputs
    sq_total: torch.Tensor  # (in,) fp64 sum of squared inputs
    x: torch.Tensor | None = None  # (n <= max_rows, in) sample of input rows

    @property
    def xbar(self) -> torch.Tensor:
        """Mean input feature (in,), fp32."""
        return (self.total / max(self.count, 1)).float()

    @property
    def col_norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all calibration tokens (in,), fp32."""
        return self.sq_total.sqrt().float()


def on_device(batch: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``batch`` moved to the device ``model``'s parameters are on (a no-op on CPU)."""
    dev = next(model.parameters()).device
    return {k: v.to(dev) for k, v in batch.items()}


def linear_layers(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """``{"<module>.weight": module}`` for the nn.Linear modules (optionally only ``names``)."""
    wanted = None if names is None else set(names)
    out = {}
    for mname, mod in model.named_modules():
        key = f"{mname}.weight" if mname else "weight"
        if isinstance(mod, nn.Linear) and (wanted is None or key in wanted):
            out[key] = mod
    return out


def _hook(stats: dict[str, LayerStats], key: str, max_rows: int, valid: list) -> Callable:
    def hook(_mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
        x = args[0].detach()
        rows = x.reshape(-1, x.shape[-1])  # (B*T, in)
        if valid and valid[0] is not None and valid[0].numel() == rows.shape[0]:
            rows = rows[valid[0]]  # drop padding tokens
        r64 = rows.double()
        st = stats.get(key)
        if st is None:
            z = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
            st = stats[key] = LayerStats(0, z, z.clone())
        st.count += rows.shape[0]
        st.total += r64.sum(0)
        st.sq_total += (r64 * r64).sum(0)
        if max_rows > 0:
            have = 0 if st.x is None else st.x.shape[0]
            take = rows[: max(0, max_rows - have)].float().cpu()
            if take.shape[0]:
                st.x = take if st.x is None else torch.cat([st.x, take])

    return hook


@torch.no_grad()
def capture(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    names: Iterable[str] | None = None,
    max_rows: int = 0,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, LayerStats]:
    """Run ``batches`` through ``model`` once, with a forward hook on each selected Linear.

    Padding tokens (``attention_mask == 0``) are left out. ``max_rows`` > 0 also keeps the
    first ``max_rows`` input rows of each layer (on CPU, fp32) for the least-squares q.
    """
    layers = linear_layers(model, names)
    stats: dict[str, LayerStats] = {}
    valid: list = [None]
    handles = [m.register_forward_hook(_hook(stats, k, max_rows, valid)) for k, m in layers.items()]
    try:
        for b in progress(batches) if progress else batches:
            b = on_device(b, model)
            am = b.get("attention_mask")
            valid[0] = None if am is None else am.reshape(-1).bool()
            model(**b)
    finally:
        for h in handles:
            h.remove()
    return stats


def iter_layer_inputs(
    model: nn.Module,
    batches: Iterable[Batch],
    names: Iterable[str],
    *,
    max_rows: int = 1024,
) -> Iterator[tuple[str, LayerStats]]:
    """One layer at a time: for each name, one pass over ``batches`` capturing that layer only.

    Memory holds one layer's sample at a time (``max_rows x in``) at the cost of one
    forward pass per layer; use ``capture`` when all samples fit.
    """
    batches = list(batches)
    for name in names:
        st = capture(model, batches, names=[name], max_rows=max_rows)
        if name in st:
            yield name, st[name]
