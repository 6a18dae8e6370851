"""The CPU swap kernel: two parallel loops over sorted indices, compiled by numba.

Semantics are exactly ``reference.swap_reference`` (see its docstring)::

    for i in prange(len(idx_a)):  buf[idx_a[i]] = saved_a[i]
    for j in prange(len(idx_b)):  s = buf[idx_b[j]]; saved_b[j] = s; buf[idx_b[j]] = s + val_b[j]

Indices are unique within a set, so the loops are race-free; the second loop
starts after the first has finished, so indices shared by A and B see the
restored base. ``s + val_b[j]`` is one IEEE add in the buffer dtype (no
fastmath), the same rounding as ``index_add_``. Sorted indices make each
thread walk memory forward, so the cost is close to the touched cache lines.
torch's ``index_add_`` spends ~5x that floor on 2 cores; this loop ~1.2x.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

try:
    import numba
    from numba import prange

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _swap_nb(buf, idx_a, saved_a, idx_b, val_b, saved_b):  # type: ignore[no-untyped-def]
        for i in prange(idx_a.shape[0]):
            buf[idx_a[i]] = saved_a[i]
        for j in prange(idx_b.shape[0]):
            k = idx_b[j]
            s = buf[k]
            saved_b[j] = s
            buf[k] = s + val_b[j]

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency, kept optional for odd platforms
    HAVE_NUMBA = False

SUPPORTED = (torch.float32, torch.float64)  # numpy has no bfloat16; float16 add in numba is slow


def supports(buf: torch.Tensor) -> bool:
    return HAVE_NUMBA and buf.device.type == "cpu" and buf.dtype in SUPPORTED


def swap_cpu(
    buf: torch.Tensor,
    idx_a: torch.Tensor,
    saved_a: torch.Tensor,
    idx_b: torch.Tensor,
    val_b: torch.Tensor,
    saved_b: torch.Tensor,
) -> None:
    """Restore A, then save and apply B, in one numba call (tensors share memory with numpy)."""
    assert supports(buf), f"numba swap needs a CPU float32/float64 buffer, got {buf.dtype}"
    assert val_b.dtype == buf.dtype and saved_a.dtype == buf.dtype and saved_b.dtype == buf.dtype
    assert idx_a.dtype == torch.int64 and idx_b.dtype == torch.int64
    _swap_nb(
        buf.numpy(), idx_a.numpy(), saved_a.numpy(), idx_b.numpy(), val_b.numpy(), saved_b.numpy()
    )


def warmup() -> None:
    """Compile (or load from numba's cache) the kernel for each supported dtype."""
    if not HAVE_NUMBA:
        return
    for dt in SUPPORTED:
        b = torch.zeros(4, dtype=dt)
        i = torch.tensor([1], dtype=torch.int64)
        v = torch.ones(1, dtype=dt)
        swap_cpu(b, i, v.clone(), i, v, v.clone())
