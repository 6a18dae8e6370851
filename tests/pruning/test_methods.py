"""Property tests of the pruning methods: unbiasedness, keep ratio, determinism, top-k order."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.delta import check_names, compute_delta
from pruning.errors import NonFiniteDelta, PruningError, ShapeMismatch
from pruning.methods import (
    Method,
    dare,
    darex_q,
    keep_count,
    magnitude,
    prune_tensor,
    structural,
    wanda,
)
from pruning.sparse import keep_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _delta(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 1e-2).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.5, 0.9])
def test_dare_is_unbiased_over_seeds(dtype: torch.dtype, p: float) -> None:
    # Positive entries so the total does not cancel; mean of N draws -> d.
    g = torch.Generator().manual_seed(1)
    d = (torch.rand(32, 64, generator=g) + 0.5).mul(1e-2).to(dtype)
    n = 400
    acc = torch.zeros(d.shape, dtype=torch.float64)
    for seed in range(n):
        acc += dare(d, p, seed=seed, name="w").to_dense().double()
    mean = acc / n
    ref = d.double()
    assert torch.allclose(mean.sum(), ref.sum(), rtol=1e-2)
    # Per element: binomial standard error of the scaled keep count, 6 sigma.
    se = ref.abs() * math.sqrt(p / ((1 - p) * n))
    assert bool(((mean - ref).abs() <= 6 * se + 1e-3 * ref.abs()).all())


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    p=st.sampled_from([0.1, 0.5, 0.9, 0.99]),
    name=st.text(min_size=1, max_size=20),
)
def test_dare_keep_fraction_within_binomial_bounds(seed: int, p: float, name: str) -> None:
    n = 50_000
    sd = dare(torch.ones(n), p, seed=seed, name=name)
    expect = n * (1 - p)
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(sd.nnz - expect) <= 6 * sigma


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**40), p=st.floats(0.0, 0.999))
def test_same_seed_same_mask_and_it_is_the_store_mask(seed: int, p: float) -> None:
    d = _delta((17, 23))
    a = dare(d, p, seed=seed, name="layer.0.q.weight")
    b = dare(d, p, seed=seed, name="layer.0.q.weight")
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert a.mask_seed == seed
    mask = keep_mask(seed, "layer.0.q.weight", p, d.numel())
    assert torch.equal(a.indices, torch.nonzero(mask).flatten())
    assert bool((a.indices[1:] > a.indices[:-1]).all())


def test_different_seed_or_name_gives_a_different_mask() -> None:
    d = _delta((64, 64))
    a = dare(d, 0.5, seed=1, name="w").indices
    assert not torch.equal(a, dare(d, 0.5, seed=2, name="w").indices)
    assert not torch.equal(a, dare(d, 0.5, seed=1, name="v").indices)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 0.99])
def test_darex_q_with_q_equal_one_minus_p_is_dare(dtype: torch.dtype, p: float) -> None:
    d = _delta((40, 50), dtype=dtype)
    a = dare(d, p, seed=7, name="x")
    b = darex_q(d, p, 1 - p, seed=7, name="x")
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.values, b.values)
    assert a.values.dtype == dtype
    assert a.scale == b.scale == 1.0 / (1.0 - p)


def test_dare_values_are_rescaled_in_fp32() -> None:
    d = _delta((300,), dtype=torch.float16)
    sd = dare(d, 0.99, seed=3, name="w")
    expect = (d.float()[sd.indices] * (1 / 0.01)).to(torch.float16)
    assert torch.equal(sd.values, expect)


@pytest.mark.parametrize("q_factor", [1.0, 2.0, 4.0])
def test_darex_q_bias_and_variance_match_the_formulas(q_factor: float) -> None:
    p, rows, cols, n = 0.9, 6, 200, 1500
    q = q_factor * (1 - p)
    g = torch.Generator().manual_seed(5)
    d = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 1e-2 + 3e-3
    x = torch.randn(cols, generator=g, dtype=torch.float64) + 0.5
    c = d * x  # (rows, cols)
    s, qq = c.sum(1), (c**2).sum(1)
    h = torch.stack(
        [((d - darex_q(d, p, q, seed=k, name="L").to_dense()) @ x) for k in range(n)]
    )  # (n, rows): H_q = sum_j c_j (1 - m_j/q)
    bias = (1 - (1 - p) / q) * s
    var = p * (1 - p) / q**2 * qq
    assert torch.all((h.mean(0) - bias).abs() <= 5 * torch.sqrt(var / n))
    ratio = h.var(0) / var
    assert torch.all((ratio - 1).abs() < 0.2), ratio


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 40),
    p=st.floats(0.0, 0.99),
    seed=st.integers(0, 1000),
)
def test_magnitude_keeps_exactly_the_top_k(rows: int, cols: int, p: float, seed: int) -> None:
    d = _delta((rows, cols), seed=seed)
    sd = magnitude(d, p, name="w")
    n = rows * cols
    assert sd.nnz == min(n, round((1 - p) * n))
    flat = d.reshape(-1)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[sd.indices] = True
    if sd.nnz and sd.nnz < n:
        assert flat[kept].abs().min() >= flat[~kept].abs().max()
    assert torch.equal(sd.values, flat[sd.indices])
    assert sd.scale == 1.0
    assert torch.equal(sd.indices, torch.unique(sd.indices))


@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_top_k_on_a_large_tensor(dtype: torch.dtype) -> None:
    d = _delta((1 << 21,), seed=4, dtype=dtype)  # n >= 2**20: the sampled-threshold path
    sd = magnitude(d, 0.99, name="big")
    k = round(0.01 * d.numel())
    assert sd.nnz == k
    kept = torch.zeros(d.numel(), dtype=torch.bool)
    kept[sd.indices] = True
    assert d[kept].abs().min() >= d[~kept].abs().max()


def test_magnitude_with_q_rescales() -> None:
    d = _delta((10, 10))
    sd = magnitude(d, 0.9, 0.5, name="w")
    assert torch.allclose(sd.values, d.reshape(-1)[sd.indices] * 2.0)


@pytest.mark.parametrize("per", ["row", "tensor"])
def test_wanda_orders_by_delta_times_input_norm(per: str) -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(16, 32, generator=g)
    col_norm = torch.rand(32, generator=g) * 10
    p = 0.75
    sd = wanda(d, p, col_norm, per=per, name="w")
    score = d.abs() * col_norm[None, :]
    kept = torch.zeros(d.numel(), dtype=torch.bool)
    kept[sd.indices] = True
    kept = kept.view(16, 32)
    if per == "row":
        assert bool((kept.sum(1) == 8).all())
        for i in range(16):
            assert score[i][kept[i]].min() >= score[i][~kept[i]].max()
    else:
        assert int(kept.sum()) == 128
        assert score[kept].min() >= score[~kept].max()
    # The input norm changes the choice: it is not plain magnitude.
    assert not torch.equal(sd.indices, magnitude(d, p, name="w").indices)


def test_wanda_per_row_keeps_the_tensors_budget_when_a_row_rounds_to_nothing() -> None:
    """p = 0.999 on 384 columns: round(0.384) is 0 per row, yet the tensor's budget is
    round(0.001 * numel) entries; those go to the rows whose best entry scores highest
    (before, the whole delta was dropped)."""
    g = torch.Generator().manual_seed(1)
    d = torch.randn(1536, 384, generator=g) * 1e-3
    col_norm = torch.rand(384, generator=g)
    sd = wanda(d, 0.999, col_norm, per="row", name="w")
    assert sd.nnz == keep_count(d.numel(), 0.999) == 590
    rows, cols = sd.indices // 384, sd.indices % 384
    best = (d.abs() * col_norm[None, :]).max(dim=1)
    assert rows.unique().numel() == 590 and torch.equal(cols, best.indices[rows])
    assert best.values[rows].min() >= best.values[~torch.isin(torch.arange(1536), rows)].max()
    assert wanda(d, 0.99, col_norm, per="row", name="w").nnz == 1536 * 4  # round(3.84)


def test_structural_drops_whole_rows_or_columns_unbiased() -> None:
    d = _delta((64, 48))
    for axis, dim in (("row", 1), ("col", 0)):
        sd = structural(d, 0.5, axis=axis, seed=1, name="w")
        dense = sd.to_dense()
        kept = (dense != 0).any(dim=dim)
        # every line is either fully kept (rescaled) or fully zero
        lines = dense if axis == "row" else dense.T
        full = d if axis == "row" else d.T
        assert torch.allclose(lines[kept], full[kept] * 2.0)
        assert bool((lines[~kept] == 0).all())
        assert 0 < int(kept.sum()) < kept.numel()
        assert sd.mask_seed is None
    acc = sum(structural(d, 0.5, axis="row", seed=s, name="w").to_dense() for s in range(400))
    assert torch.allclose((acc / 400).sum(1), d.sum(1), atol=4 * d.abs().sum(1).max() / 20)


@pytest.mark.parametrize("method", list(Method))
def test_p_zero_keeps_everything(method: Method) -> None:
    d = _delta((8, 12))
    sd = prune_tensor(
        method,
        d,
        0.0,
        name="w",
        q=1.0 if method is Method.darex_q else None,
        col_norm=torch.ones(12),
    )
    assert sd.nnz == d.numel()
    assert torch.equal(sd.to_dense(), d)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("method", list(Method))
def test_bad_rate_names_the_tensor(method: Method, p: float) -> None:
    with pytest.raises(PruningError, match=re.escape("encoder.layer.3.query.weight")):
        prune_tensor(
            method,
            _delta((4, 4)),
            p,
            name="encoder.layer.3.query.weight",
            q=0.5,
            col_norm=torch.ones(4),
        )


def test_bad_inputs_give_clear_errors() -> None:
    d = _delta((4, 4))
    d[1, 2] = float("nan")
    with pytest.raises(NonFiniteDelta, match=re.escape("mlp.up.weight")):
        dare(d, 0.5, seed=0, name="mlp.up.weight")
    for q in (0.0, 1e-9):
        with pytest.raises(PruningError, match=r"q must be a finite number >= 1e-06"):
            darex_q(_delta((4, 4)), 0.5, q, seed=0, name="w")
    # a q the check takes, on a delta whose kept values 1/q scales past float32: named
    with pytest.raises(PruningError, match=r"'w': rescaling by 1/q = 1e\+06 overflows float32"):
        darex_q(torch.full((4, 4), 1e33), 0.5, 1e-6, seed=0, name="w")
    with pytest.raises(PruningError, match="darex_q needs q"):
        prune_tensor("darex_q", _delta((4, 4)), 0.5, name="w")
    with pytest.raises(PruningError, match="unknown method"):
        prune_tensor("nope", _delta((4, 4)), 0.5, name="w")
    with pytest.raises(PruningError, match=r"col_norm of shape \(4,\)"):
        wanda(_delta((4, 4)), 0.5, torch.ones(3), name="w")
    with pytest.raises(ShapeMismatch, match=r"'a.weight'.*\(4, 4\).*\(4, 5\)"):
        compute_delta(torch.zeros(4, 4), torch.zeros(4, 5), "a.weight")
    w = torch.zeros(3)
    w[0] = float("inf")
    with pytest.raises(NonFiniteDelta, match="fine-tuned weight"):
        compute_delta(torch.zeros(3), w, "b.bias")
    with pytest.raises(ShapeMismatch, match=re.escape("layer.9")):
        check_names({"layer.9.w", "x"}, {"x"})


def test_method_for_gives_wanda_only_where_input_norms_were_measured() -> None:
    from pruning.methods import Method, method_for

    w, b, cn = torch.zeros(4, 3), torch.zeros(4), torch.ones(3)
    assert method_for(Method.wanda, w, cn) == "wanda"
    assert method_for("wanda", w, None) == "magnitude"  # no measured inputs
    assert method_for("wanda", b, cn) == "magnitude"  # not a linear weight
    assert method_for(Method.darex_q, w, None) == "darex_q"


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0,)])
def test_every_method_takes_an_empty_tensor(shape) -> None:
    """A float parameter with no entries (ingest prunes every selected float tensor) keeps
    nothing and raises nothing, whatever the method; its analytical q is DARE's."""
    from pruning.q import analytical_q

    d = torch.zeros(shape)
    cn = torch.ones(shape[1]) if len(shape) == 2 else None
    for method in ("dare", "magnitude", "structural", *(("wanda",) if cn is not None else ())):
        sd = prune_tensor(method, d, 0.9, name="w", seed=0, col_norm=cn)
        assert sd.nnz == 0 and tuple(sd.shape) == shape, method
    if len(shape) == 2:
        assert analytical_q(d, torch.ones(shape[1]), 0.9) == pytest.approx(0.1)


def test_rates_past_the_masks_resolution_are_refused() -> None:
    """Above p = 0.999999 the 32-bit threshold cannot keep 1-p of the entries (at
    1 - 1e-10 it keeps none while the scale says 1e10): refused, naming the limit."""
    import server.settings
    from pruning.errors import PruningError
    from pruning.sparse import MAX_RATE, keep_threshold

    assert server.settings.MAX_RATE == MAX_RATE
    d = torch.randn(64)
    assert dare(d, MAX_RATE, seed=0, name="w").scale == pytest.approx(1e6)
    for p in (0.9999991, 1 - 1e-10):
        with pytest.raises(PruningError, match=r"tensor 'w': pruning rate p = .* above 0.999999"):
            dare(d, p, seed=0, name="w")
        keep_threshold(p)  # the mask of a blob stored before the cap still decodes
    assert "at most 0.999999" in (server.settings.rate_problem(0.5, 0.9999999) or "")
    assert server.settings.rate_problem(0.5, MAX_RATE) is None


def test_prune_tensor_refuses_an_option_it_does_not_know() -> None:
    """A typo (``axs``) pruned rows instead of the columns asked for, unannounced."""
    from pruning.errors import PruningError

    d = torch.randn(8, 8)
    with pytest.raises(PruningError, match=r"tensor 'w': unknown option.*axs"):
        prune_tensor("structural", d, 0.5, name="w", axs="col")
    cols = prune_tensor("structural", d, 0.5, name="w", seed=1, axis="col")
    assert cols.indices.numel() and len({int(i) % 8 for i in cols.indices}) < 8


@pytest.mark.parametrize("seed", [1.7, None, "abc"])
def test_a_seed_that_is_not_an_integer_is_refused(seed: object) -> None:
    """1.7 drew seed 1's mask; None and "abc" failed inside the hash."""
    from pruning.errors import PruningError

    for method in ("dare", "structural"):
        with pytest.raises(PruningError, match="tensor 'w': seed must be an integer"):
            prune_tensor(method, torch.randn(4, 4), 0.5, name="w", seed=seed)  # type: ignore[arg-type]
