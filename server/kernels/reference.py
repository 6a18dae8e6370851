"""The reference semantics of every swap kernel, in torch ops (also the fallback path).

``swap(buf, idx_a, saved_a, idx_b, val_b, saved_b)``, with ``idx_a`` / ``idx_b``
sorted unique int64 indices into the flat buffer ``buf`` (either may be empty)::

    buf[idx_a] = saved_a            # restore A bit-exactly (index_copy_, never subtract)
    saved_b[:] = buf[idx_b]         # save what B is about to change (after A's restore)
    buf[idx_b] += val_b             # apply B (index_add_)

Indices shared by A and B are first restored, then saved, so ``saved_b`` always
holds base values and a later restore of B gives the base back bit for bit.
"""

from __future__ import annotations

import torch


def swap_reference(
    buf: torch.Tensor,
    idx_a: torch.Tensor,
    saved_a: torch.Tensor,
    idx_b: torch.Tensor,
    val_b: torch.Tensor,
    saved_b: torch.Tensor,
) -> None:
    """Restore A, then save and apply B (the semantics in the module docstring)."""
    if idx_a.numel():
        buf.index_copy_(0, idx_a, saved_a)
    if idx_b.numel():
        torch.index_select(buf, 0, idx_b, out=saved_b)
        buf.index_add_(0, idx_b, val_b)
