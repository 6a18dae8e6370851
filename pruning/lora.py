"""LoRA deltas: ``d = (B @ A) * scaling`` with scaling = alpha/r (alpha/sqrt(r) for rsLoRA).

Two ways to prune a LoRA fine-tune:

- ``lora_delta`` then any method of ``pruning.methods`` on the full (out, in) delta
  (the paper's setting, DAREx-q on ``B @ A``);
- ``prune_factors``: DARE inside A and/or B (each factor keeps entries with prob 1-p,
  scaled 1/(1-p)), then ``B' @ A' * scaling``. Independent masks keep the product
  unbiased, ``E[B' A'] = B A``, but the result is a dense (out, in) delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pruning.errors import PruningError
from pruning.methods import dare


def lora_scaling(alpha: float, r: int, *, rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    if r <= 0:
        raise PruningError(f"LoRA rank must be > 0, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


def _check(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise PruningError(
            f"tensor {name!r}: LoRA needs A (r, in) and B (out, r), got "
            f"A {tuple(a.shape)} and B {tuple(b.shape)}"
        )


def lora_delta(
    a: torch.Tensor,
    b: torch.Tensor,
    alpha: float,
    r: int,
    *,
    rslora: bool = False,
    name: str = "?",
) -> torch.Tensor:
    """``d = (B @ A) * alpha/r`` in fp32, shape (out, in)."""
    _check(a, b, name)
    return (b.float() @ a.float()) * lora_scaling(alpha, r, rslora=rslora)  # (out, in)


@dataclass(frozen=True)
class PrunedFactors:
    """DARE-pruned LoRA factors (dense, zeros where dropped) and their scaling."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float

    def delta(self) -> torch.Tensor:
        return (self.b.float() @ self.a.float()) * self.scaling  # (out, in)


def prune_factors(
    a: torch.Tensor,
    b: torch.Tensor,
    alpha: float,
    r: int,
    p: float,
    *,
    seed: int,
    name: str,
    which: str = "both",
    rslora: bool = False,
) -> PrunedFactors:
    """DARE inside the factors: ``which`` in {"A", "B", "both"}; masks keyed by name.lora_A/B."""
    _check(a, b, name)
    if which not in ("A", "B", "both"):
        raise PruningError(f"tensor {name!r}: which must be 'A', 'B' or 'both', got {which!r}")
    if which in ("A", "both"):
        a = dare(a, p, seed=seed, name=f"{name}.lora_A").to_dense()
    if which in ("B", "both"):
        b = dare(b, p, seed=seed, name=f"{name}.lora_B").to_dense()
    return PrunedFactors(a, b, lora_scaling(alpha, r, rslora=rslora))
