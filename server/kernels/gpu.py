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
MERGE_BLOCK = 64
VARIANT = "ranged"
# Triton's interpreter (TRITON_INTERPRET=1, read when the kernel is decorated) runs the
# kernel on CPU tensors with numpy: the tests check it against the reference without a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if HAVE_TRITON:

    @triton.jit
    def _search(arr, lo0, hi0, key, n_iter):  # type: ignore[no-untyped-def]
        """Vectorised lower_bound of ``key`` in sorted ``arr[lo0:hi0]``: (position, found)."""
        lo = tl.zeros(key.shape, dtype=tl.int64) + lo0
        hi = tl.zeros(key.shape, dtype=tl.int64) + hi0
        for _ in range(n_iter):
            active = lo < hi
            mid = (lo + hi) // 2
            v = tl.load(arr + mid, mask=active, other=0)
            right = v < key
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & (~right), mid, hi)
        inb = lo < hi0
        hit = tl.load(arr + lo, mask=inb, other=-1)
        return lo, inb & (hit == key)

    @triton.jit
    def _lower_bound(arr, n, key, n_iter):  # type: ignore[no-untyped-def]
        """Scalar lower_bound of ``key`` in sorted ``arr[:n]``."""
        lo = tl.program_id(0).to(tl.int64) * 0  # a runtime scalar (n may be a constexpr 1)
        hi = lo + n
        for _ in range(n_iter):
            active = lo < hi
            mid = (lo + hi) // 2
            v = tl.load(arr + mid, mask=active, other=0)
            right = v < key
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & (~right), mid, hi)
        return lo

    @triton.jit
    def _other_range(keys, m, other, n_other, iter_other, RANGED: tl.constexpr):  # type: ignore[no-untyped-def]
        """Where to search the other set for this block's sorted ``keys``: all of it, or
        (RANGED) only the part between the block's first and last key, found by two
        scalar searches, so that each element's own search takes fewer steps."""
        if RANGED:
            first = tl.min(tl.where(m, keys, 0x7FFFFFFFFFFFFFFF))
            last = tl.max(tl.where(m, keys, -1))
            lo = _lower_bound(other, n_other, first, iter_other)
            hi = _lower_bound(other, n_other, last + 1, iter_other)
            n_iter = tl.log2((hi - lo + 1).to(tl.float32)).to(tl.int32) + 1
        else:
            lo = 0
            hi = n_other
            n_iter = iter_other
        return lo, hi, n_iter

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
        RANGED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        blocks_a = tl.cdiv(n_a, BLOCK)
        if pid < blocks_a:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n_a
            k = tl.load(idx_a + offs, mask=m, other=0)
            lo, hi, n_iter = _other_range(k, m, idx_b, n_b, iter_b, RANGED)
            _, in_b = _search(idx_b, lo, hi, k, n_iter)
            s = tl.load(saved_a + offs, mask=m)
            tl.store(buf + k, s, mask=m & (~in_b))
        else:
            offs = (pid - blocks_a).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n_b
            k = tl.load(idx_b + offs, mask=m, other=0)
            lo, hi, n_iter = _other_range(k, m, idx_a, n_a, iter_a, RANGED)
            pos, in_a = _search(idx_a, lo, hi, k, n_iter)
            from_a = tl.load(saved_a + pos, mask=m & in_a)
            from_buf = tl.load(buf + k, mask=m & (~in_a))
            base = tl.where(in_a, from_a, from_buf)
            v = tl.load(val_b + offs, mask=m)
            tl.store(saved_b + offs, base, mask=m)
            out = base.to(tl.float32) + v.to(tl.float32)
            tl.store(buf + k, out.to(base.dtype), mask=m)

    @triton.jit
    def _diagonal(idx_a, n_a, idx_b, n_b, d, n_iter):  # type: ignore[no-untyped-def]
        """Merge path: (i, j), i + j = d (+1), the A and B elements among the first ``d`` of
        the merged order (ties: A first), moved so that a key in both lands on one side."""
        lo = tl.maximum(d - n_b, 0)
        hi = tl.minimum(d, n_a)
        for _ in range(n_iter):
            active = lo < hi
            mid = (lo + hi) // 2
            a = tl.load(idx_a + mid, mask=active, other=0)
            b = tl.load(idx_b + (d - mid - 1), mask=active, other=0)
            take_a = a <= b
            lo = tl.where(active & take_a, mid + 1, lo)
            hi = tl.where(active & (~take_a), mid, hi)
        i = lo
        j = d - i
        # A's copy of a shared key is the last of this prefix: take B's copy along with it
        last_a = tl.load(idx_a + (i - 1), mask=i > 0, other=-1)
        next_b = tl.load(idx_b + j, mask=j < n_b, other=-2)
        j = tl.where((i > 0) & (j < n_b) & (last_a == next_b), j + 1, j)
        return i, j

    @triton.jit
    def _merge_swap_kernel(  # type: ignore[no-untyped-def]
        buf,
        idx_a,
        saved_a,
        n_a,
        idx_b,
        val_b,
        saved_b,
        n_b,
        n_iter,
        BLOCK: tl.constexpr,
        BITS: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        chunk = BLOCK - 1  # + at most one B copy of a shared key taken at the end
        d0 = pid * chunk
        d1 = tl.minimum(d0 + chunk, n_a + n_b)
        ia, ib = _diagonal(idx_a, n_a, idx_b, n_b, d0, n_iter)
        ia1, ib1 = _diagonal(idx_a, n_a, idx_b, n_b, d1, n_iter)
        offs = tl.arange(0, BLOCK)
        ma = offs < ia1 - ia
        mb = offs < ib1 - ib
        ka = tl.load(idx_a + ia + offs, mask=ma, other=-1)
        kb = tl.load(idx_b + ib + offs, mask=mb, other=-2)
        eq = ka[:, None] == kb[None, :]  # a shared key: both copies are in this program
        in_b = tl.max(eq.to(tl.int32), axis=1) > 0
        in_a = tl.max(eq.to(tl.int32), axis=0) > 0
        s = tl.load(saved_a + ia + offs, mask=ma, other=0)
        tl.store(buf + ka, s, mask=ma & (~in_b))
        # B's base value for a shared key is A's saved one: move its bits (exact, -0.0 too)
        s_bits = s.to(BITS, bitcast=True)
        from_a = tl.sum(tl.where(eq, s_bits[:, None], 0), axis=0).to(BITS)
        from_buf = tl.load(buf + kb, mask=mb & (~in_a))
        base = tl.where(in_a, from_a.to(from_buf.dtype, bitcast=True), from_buf)
        v = tl.load(val_b + ib + offs, mask=mb)
        tl.store(saved_b + ib + offs, base, mask=mb)
        out = base.to(tl.float32) + v.to(tl.float32)
        tl.store(buf + kb, out.to(base.dtype), mask=mb)


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
    *,
    variant: str | None = None,
    block: int | None = None,
) -> None:
    """Restore A, then save and apply B, in one Triton launch (see module docstring)."""
    if not can_run(buf):
        raise RuntimeError(
            "the triton swap needs triton and a CUDA buffer (or TRITON_INTERPRET=1 on CPU)"
        )
    n_a, n_b = idx_a.numel(), idx_b.numel()
    if n_a + n_b == 0:
        return
    # an empty tensor may have a null pointer, which the launcher refuses: pass a dummy
    if n_a == 0:
        idx_a, saved_a = buf.new_zeros(1, dtype=torch.int64), buf.new_zeros(1)
    if n_b == 0:
        idx_b, val_b = buf.new_zeros(1, dtype=torch.int64), buf.new_zeros(1)
        saved_b = buf.new_zeros(1)
    if (variant or VARIANT) == "merge":
        blk = block or MERGE_BLOCK
        grid = (triton.cdiv(n_a + n_b, blk - 1),)
        bits = {4: tl.int32, 2: tl.int16}[buf.element_size()]
        _merge_swap_kernel[grid](
            buf,
            idx_a,
            saved_a,
            n_a,
            idx_b,
            val_b,
            saved_b,
            n_b,
            max(min(n_a, n_b), 1).bit_length() + 1,
            BLOCK=blk,
            BITS=bits,
        )
        return
    blk = block or BLOCK
    grid = (triton.cdiv(n_a, blk) + triton.cdiv(n_b, blk),)
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
        BLOCK=blk,
        RANGED=(variant or VARIANT) == "ranged",
    )
