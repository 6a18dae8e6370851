"""The CUDA swap kernel: restore A and save-and-apply B in one Triton launch.

Semantics are exactly ``reference.swap_reference``. One launch has no barrier
between "restore A" and "apply B", so each element is owned by exactly one
program and shared indices are resolved by a binary search in the other
(sorted) index set::

    for i in range(len(idx_a)):                      # programs over A
        if idx_a[i] not in idx_b:  buf[idx_a[i]] = saved_a[i]
    for j in range(len(idx_b)):                      # programs over B
        k = idx_b[j]
        base = saved_a[pos of k in idx_a] if k in idx_a else buf[k]
        saved_b[j] = base;  buf[k] = base + val_b[j]

A program over A writes only indices not in B, and a program over B reads
``buf[k]`` only when ``k`` is not in A, so no element is both read and written
by different programs: the result does not depend on scheduling. The add is
done in float32 and rounded once to the buffer dtype, which equals the
correctly rounded fp16/bf16/fp32 sum that ``index_add_`` produces.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

BLOCK = 1024
# Triton's interpreter (TRITON_INTERPRET=1, read when the kernel is decorated) runs the
# kernel on CPU tensors with numpy: the tests check it against the reference without a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if HAVE_TRITON:

    @triton.jit
    def _search(arr, n, key, n_iter):  # type: ignore[no-untyped-def]
        """Vectorised lower_bound of ``key`` in sorted ``arr[:n]``: (position, found)."""
        lo = tl.zeros(key.shape, dtype=tl.int64)
        hi = tl.zeros(key.shape, dtype=tl.int64) + n
        for _ in range(n_iter):
            active = lo < hi
            mid = (lo + hi) // 2
            v = tl.load(arr + mid, mask=active, other=0)
            right = v < key
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & (~right), mid, hi)
        inb = lo < n
        hit = tl.load(arr + lo, mask=inb, other=-1)
        return lo, inb & (hit == key)

    @triton.jit
    def _swap_kernel(  # type: ignore[no-untyped-def]
        buf,
        idx_a,
        saved_a,
        n_a,
        iter_a,
        idx_b,
        val_b,
        saved_b,
        n_b,
        iter_b,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        blocks_a = tl.cdiv(n_a, BLOCK)
        if pid < blocks_a:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n_a
            k = tl.load(idx_a + offs, mask=m, other=0)
            _, in_b = _search(idx_b, n_b, k, iter_b)
            s = tl.load(saved_a + offs, mask=m)
            tl.store(buf + k, s, mask=m & (~in_b))
        else:
            offs = (pid - blocks_a).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n_b
            k = tl.load(idx_b + offs, mask=m, other=0)
            pos, in_a = _search(idx_a, n_a, k, iter_a)
            from_a = tl.load(saved_a + pos, mask=m & in_a)
            from_buf = tl.load(buf + k, mask=m & (~in_a))
            base = tl.where(in_a, from_a, from_buf)
            v = tl.load(val_b + offs, mask=m)
            tl.store(saved_b + offs, base, mask=m)
            out = base.to(tl.float32) + v.to(tl.float32)
            tl.store(buf + k, out.to(base.dtype), mask=m)


def supports(buf: torch.Tensor) -> bool:
    """Whether the engine picks this kernel by default for ``buf``: CUDA only."""
    return HAVE_TRITON and buf.device.type == "cuda"


def can_run(buf: torch.Tensor) -> bool:
    """``supports``, or a CPU buffer under Triton's interpreter (tests)."""
    return supports(buf) or (HAVE_TRITON and INTERPRET and buf.device.type == "cpu")


def swap_cuda(
    buf: torch.Tensor,
    idx_a: torch.Tensor,
    saved_a: torch.Tensor,
    idx_b: torch.Tensor,
    val_b: torch.Tensor,
    saved_b: torch.Tensor,
) -> None:
    """Restore A, then save and apply B, in one Triton launch (see module docstring)."""
    if not can_run(buf):
        raise RuntimeError(
            "the triton swap needs triton and a CUDA buffer (or TRITON_INTERPRET=1 on CPU)"
        )
    n_a, n_b = idx_a.numel(), idx_b.numel()
    grid = (triton.cdiv(n_a, BLOCK) + triton.cdiv(n_b, BLOCK),)
    if grid[0] == 0:
        return
    # an empty tensor may have a null pointer, which the launcher refuses: pass a dummy
    if n_a == 0:
        idx_a, saved_a = buf.new_zeros(1, dtype=torch.int64), buf.new_zeros(1)
    if n_b == 0:
        idx_b, val_b = buf.new_zeros(1, dtype=torch.int64), buf.new_zeros(1)
        saved_b = buf.new_zeros(1)
    _swap_kernel[grid](
        buf,
        idx_a,
        saved_a,
        n_a,
        max(n_a, 1).bit_length(),
        idx_b,
        val_b,
        saved_b,
        n_b,
        max(n_b, 1).bit_length(),
        BLOCK=BLOCK,
    )
