"""Swap kernels against the torch reference, bit for bit, with overlapping index sets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.kernels import cpu, gpu, swap, swap_reference


@st.composite
def swap_case(draw: st.DrawFn, dtype: torch.dtype = torch.float32):
    """A buffer, A's indices + saved values, B's indices + values; A and B often overlap."""
    n = draw(st.integers(1, 3000))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    fa, fb = draw(st.floats(0, 1)), draw(st.floats(0, 1))
    idx_a = torch.nonzero(torch.rand(n, generator=g) < fa).flatten()
    idx_b = torch.nonzero(torch.rand(n, generator=g) < fb).flatten()

    # values spanning many exponents, so that the adds round
    def vals(k: int) -> torch.Tensor:
        span = 20 if dtype in (torch.float32, torch.float64) else 8
        exp = torch.randint(-span, span, (k,), generator=g).to(torch.float64)
        return (torch.randn(k, generator=g, dtype=torch.float64) * 2.0**exp).to(dtype)

    buf = vals(n)
    saved_a = vals(idx_a.numel())
    return buf, idx_a, saved_a, idx_b, vals(idx_b.numel())


def _run(impl: str, case, device: str = "cpu"):
    buf, idx_a, saved_a, idx_b, val_b = (t.clone().to(device) for t in case)
    saved_b = torch.full_like(val_b, float("nan"))
    swap(buf, idx_a, saved_a, idx_b, val_b, saved_b, impl=impl)
    return buf.cpu(), saved_b.cpu()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int64)


@pytest.mark.skipif(not cpu.HAVE_NUMBA, reason="numba not installed")
@settings(max_examples=300, deadline=None)
@given(swap_case())
def test_numba_equals_reference_bit_for_bit(case) -> None:
    ref_buf, ref_saved = _run("torch", case)
    got_buf, got_saved = _run("numba", case)
    assert torch.equal(_bits(got_buf), _bits(ref_buf))
    assert torch.equal(_bits(got_saved), _bits(ref_saved))


@pytest.mark.skipif(not cpu.HAVE_NUMBA, reason="numba not installed")
@settings(max_examples=50, deadline=None)
@given(swap_case(torch.float64))
def test_numba_float64_equals_reference(case) -> None:
    ref_buf, ref_saved = _run("torch", case)
    got_buf, got_saved = _run("numba", case)
    assert torch.equal(_bits(got_buf), _bits(ref_buf))
    assert torch.equal(_bits(got_saved), _bits(ref_saved))


@settings(max_examples=100, deadline=None)
@given(swap_case())
def test_reference_restore_then_undo_is_identity(case) -> None:
    """Apply B over a base, then swap B -> nothing: the base comes back bit for bit."""
    buf, _, _, idx_b, val_b = (t.clone() for t in case)
    base = buf.clone()
    empty = torch.empty(0, dtype=torch.int64)
    saved_b = torch.empty_like(val_b)
    swap_reference(buf, empty, val_b[:0], idx_b, val_b, saved_b)
    assert torch.equal(saved_b, base[idx_b])
    swap_reference(buf, idx_b, saved_b, empty, val_b[:0], val_b[:0])
    assert torch.equal(_bits(buf), _bits(base))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not gpu.HAVE_TRITON, reason="needs CUDA+triton"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_triton_equals_reference_bit_for_bit(dtype: torch.dtype, data: st.DataObject) -> None:
    case = data.draw(swap_case(dtype))
    ref_buf, ref_saved = _run("torch", case, "cuda")
    got_buf, got_saved = _run("triton", case, "cuda")
    bits = {4: torch.int32, 2: torch.int16}[ref_buf.element_size()]
    assert torch.equal(got_buf.view(bits), ref_buf.view(bits))
    assert torch.equal(got_saved.view(bits), ref_saved.view(bits))
