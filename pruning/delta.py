"""Deltas between a base and a fine-tuned tensor, with the checks that name the tensor."""

from __future__ import annotations

import torch

from pruning.errors import NonFiniteDelta, ShapeMismatch
from pruning.methods import all_finite


def check_names(base: set[str] | list[str], finetuned: set[str] | list[str]) -> None:
    """Raise ``ShapeMismatch`` when the fine-tune lacks tensors that the base has."""
    missing = sorted(set(base) - set(finetuned))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ShapeMismatch(f"fine-tune lacks base tensor(s) {missing[:5]}{more}")


def compute_delta(
    w_base: torch.Tensor, w_ft: torch.Tensor, name: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``d = W_ft - W_base`` computed in fp32 (returned as ``dtype``), after checks.

    Raises ``ShapeMismatch`` on a shape or kind mismatch and ``NonFiniteDelta`` when
    either side holds NaN/Inf, naming the tensor.
    """
    if tuple(w_base.shape) != tuple(w_ft.shape):
        raise ShapeMismatch(
            f"tensor {name!r}: base shape {tuple(w_base.shape)} != fine-tuned {tuple(w_ft.shape)}"
        )
    if w_base.is_floating_point() != w_ft.is_floating_point():
        raise ShapeMismatch(
            f"tensor {name!r}: base dtype {w_base.dtype} != fine-tuned {w_ft.dtype}"
        )
    if not w_base.is_floating_point():
        raise ShapeMismatch(f"tensor {name!r}: integer tensor ({w_base.dtype}) has no delta")
    for side, w in (("base", w_base), ("fine-tuned", w_ft)):
        if not all_finite(w):
            bad = int((~torch.isfinite(w)).sum())
            raise NonFiniteDelta(f"tensor {name!r}: {side} weight holds {bad} NaN/Inf value(s)")
    return (w_ft.float() - w_base.to(device=w_ft.device).float()).to(dtype)
