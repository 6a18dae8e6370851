"""Swap kernels: restore A + save-and-apply B over a flat buffer.

``reference.swap_reference`` is the semantics (torch ops) and the fallback;
``cpu.swap_cpu`` (numba) and ``gpu.swap_cuda`` (Triton) implement it in one call.
"""

from __future__ import annotations

import torch

from server.kernels import cpu, gpu
from server.kernels.reference import swap_reference

__all__ = ["kernel_name", "swap", "swap_reference"]


def kernel_name(buf: torch.Tensor) -> str:
    """Which implementation ``swap`` uses for this buffer."""
    if cpu.supports(buf):
        return "numba"
    if gpu.supports(buf):
        return "triton"
    return "torch"


def swap(
    buf: torch.Tensor,
    idx_a: torch.Tensor,
    saved_a: torch.Tensor,
    idx_b: torch.Tensor,
    val_b: torch.Tensor,
    saved_b: torch.Tensor,
    *,
    impl: str | None = None,
) -> None:
    """Restore A, then save and apply B; ``impl`` forces "torch", "numba" or "triton"."""
    impl = impl or kernel_name(buf)
    if impl == "numba":
        cpu.swap_cpu(buf, idx_a, saved_a, idx_b, val_b, saved_b)
    elif impl == "triton":
        gpu.swap_cuda(buf, idx_a, saved_a, idx_b, val_b, saved_b)
    elif impl == "torch":
        swap_reference(buf, idx_a, saved_a, idx_b, val_b, saved_b)
    else:
        raise ValueError(f"unknown swap kernel {impl!r}")
