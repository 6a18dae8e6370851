"""The four q choices: global search, output change, analytical, least squares; calibration."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from pruning.calib import capture, iter_layer_inputs
from pruning.errors import PruningError
from pruning.methods import dare
from pruning.q import (
    analytical_q,
    decoder_output_change,
    encoder_output_change,
    lsq_q,
    output_change_score,
    q_grid,
    search_q_global,
)


def test_grid_starts_at_one_minus_p_and_matches_the_paper() -> None:
    g = q_grid(0.99)
    assert g[0] == pytest.approx(0.01) and g[-1] == pytest.approx(0.1)
    assert g[1] - g[0] == pytest.approx(0.005)
    assert q_grid(0.5)[-1] == 1.0  # capped at q = 1


def test_search_finds_the_optimum_on_a_fine_grid_and_stops_early() -> None:
    calls: list[float] = []

    def score(q: float) -> float:
        calls.append(q)
        return -((q - 0.0237) ** 2)

    res = search_q_global(score, 0.99)
    assert res.q == pytest.approx(0.0235, abs=1e-9)  # fine grid step 0.0005
    assert 0.01 in [round(q, 12) for q, _ in res.tried]
    # coarse scan stops 3 steps after the best coarse point (0.025): 0.03, 0.035, 0.04
    assert max(calls) <= 0.04 + 1e-12


def test_search_returns_dare_when_dare_is_best() -> None:
    res = search_q_global(lambda q: -q, 0.9)
    assert res.q == pytest.approx(0.1)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.sampled_from([0.5, 0.9, 0.99]))
def test_lsq_q_equals_fine_grid_argmin(seed: int, p: float) -> None:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(12, 40, generator=g, dtype=torch.float64) * 1e-2 + 2e-3
    x = torch.randn(64, 40, generator=g, dtype=torch.float64) + 0.3
    sd = dare(d, p, seed=seed, name="w")
    y, ym = x @ d.T, x @ sd.to_dense().T * (1 - p)  # ym: (m*d) X, unscaled
    assume(float((ym * y).sum()) > 0)  # else no q > 0 fits (a raise, tested below)
    q = lsq_q(d, sd, x, name="w")
    inv = torch.linspace(0.1 / q, 3.0 / q, 20001, dtype=torch.float64)
    crit = ((inv[:, None, None] * ym[None] - y[None]) ** 2).sum((1, 2))
    q_grid_best = 1.0 / float(inv[crit.argmin()])
    assert q == pytest.approx(q_grid_best, rel=2e-4)
    # the same with a bool mask
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    mask[sd.indices] = True
    assert lsq_q(d, mask, x) == pytest.approx(q, rel=1e-12)


def test_lsq_q_edge_cases() -> None:
    d = torch.ones(2, 3)
    assert lsq_q(d, torch.zeros(6, dtype=torch.bool), torch.ones(4, 3)) == 1.0
    with pytest.raises(PruningError, match=r"'L\.w'"):
        lsq_q(d, torch.ones(6, dtype=torch.bool), torch.ones(4, 5), name="L.w")
    anti = torch.tensor([[1.0, -2.0]])
    with pytest.raises(PruningError, match="does not correlate"):
        lsq_q(anti, torch.tensor([True, False]), torch.ones(3, 2), name="L.w")


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    p=st.sampled_from([0.3, 0.5, 0.9, 0.99]),
    scale=st.sampled_from([1e-3, 1e-1, 10.0, 1e3]),
    shift=st.floats(-2.0, 2.0),
    eta=st.floats(0.1, 2.0),
    bias=st.booleans(),
)
def test_analytical_q_lies_in_range(
    seed: int, p: float, scale: float, shift: float, eta: float, bias: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    d = (torch.randn(16, 32, generator=g) + shift) * scale
    xbar = torch.randn(32, generator=g)
    b = torch.randn(16, generator=g) * scale if bias else None
    q = analytical_q(d, xbar, p, eta, b)
    assert 1 - p - 1e-12 <= q < 1.0


def test_analytical_q_moves_above_dare_for_large_negative_sums() -> None:
    d = -torch.ones(8, 64) * 5.0
    q = analytical_q(d, torch.ones(64), 0.9, eta=0.45)
    assert 0.1 < q < 1.0
    assert analytical_q(d, torch.ones(64), 0.0) == 1.0


def test_analytical_q_stops_rows_whose_gain_is_below_float16_resolution() -> None:
    """Deltas of a real fine-tune's size (|S_i| ~ 0.05, half of them negative): in exact
    arithmetic each row with S_i < 0 improves by ever smaller amounts at every step and
    runs to q_max, so the layer q ends past 0.5 at any p; with the default tolerance (a
    float16 step at f ~ 3.69, the resolution the reference code scans at) rows stop
    where the gain vanishes, and q stays a small multiple of 1-p, growing with eta."""
    g = torch.Generator().manual_seed(0)
    d = torch.randn(384, 384, generator=g) * 5e-3
    xbar = torch.rand(384, generator=g)
    for p, most in ((0.9, 0.11), (0.99, 0.05)):
        exact = analytical_q(d, xbar, p, 0.45, rtol=0.0)
        q = analytical_q(d, xbar, p, 0.45)
        assert exact > 0.5, exact
        assert 1 - p <= q < most, q
    assert analytical_q(d, xbar, 0.99, 0.45) < analytical_q(d, xbar, 0.99, 10.0) < 0.3
    with pytest.raises(PruningError, match="rtol"):
        analytical_q(d, xbar, 0.99, rtol=1.0)


def test_output_change_helpers() -> None:
    ref = torch.zeros(2, 3, 4)
    out = torch.ones(2, 3, 4)
    out[1, 2] = 100.0  # a padding position
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert encoder_output_change(ref, out, mask) == pytest.approx(1.0)
    logits = torch.arange(10.0).expand(2, 3, 10).clone()
    moved = logits.clone()
    moved[..., 9] += 2.0  # a top-5 token
    moved[..., 0] += 50.0  # not a top-5 token of the reference
    assert decoder_output_change(logits, moved) == pytest.approx(4.0 / 5)


def _synthetic_finetune(model: nn.Module, names: list[str], rms: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    deltas = {}
    with torch.no_grad():
        for n in names:
            d = torch.randn(params[n].shape, generator=g) * rms
            params[n].add_(d)
            deltas[n] = d
    return deltas


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_output_change_score_on_tiny_models(arch: str, tiny_bert_dir, tiny_llama_dir) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    if arch == "encoder":
        model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    names = [n for n, _ in model.named_parameters() if "layers.0" in n or "layer.0." in n]
    names = [n for n in names if n.endswith("weight") and "norm" not in n.lower()]
    deltas = _synthetic_finetune(model, names, 2e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    score = output_change_score(model, deltas, 0.9, batches, arch=arch, seeds=(0, 1))
    s_dare, s_big = score(0.1), score(0.5)
    assert math.isfinite(s_dare) and s_dare < 0
    assert s_dare != s_big
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # restored bit-exactly
    res = search_q_global(score, 0.9, factor=3.0)
    assert 0.1 <= res.q <= 0.3 and res.score >= s_dare


def test_capture_statistics_match_the_inputs() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 7)
            self.b = nn.Linear(7, 3)

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    net = Net()
    x1, x2 = torch.randn(2, 4, 5), torch.randn(1, 4, 5)
    m1, m2 = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.ones(1, 4, dtype=torch.long)
    batches = [{"x": x1, "attention_mask": m1}, {"x": x2, "attention_mask": m2}]
    stats = capture(net, batches, max_rows=6)
    rows = torch.cat([x1[m1.bool()], x2[m2.bool()]])  # (9, 5) real tokens only
    st_a = stats["a.weight"]
    assert st_a.count == 9
    assert torch.allclose(st_a.xbar, rows.mean(0), atol=1e-6)
    assert torch.allclose(st_a.col_norm, rows.norm(dim=0), atol=1e-5)
    assert torch.equal(st_a.x, rows[:6])
    hidden = torch.relu(net.a(rows)).detach()
    assert torch.allclose(stats["b.weight"].xbar, hidden.mean(0), atol=1e-6)
    one = dict(iter_layer_inputs(net, batches, ["b.weight"], max_rows=100))
    assert list(one) == ["b.weight"] and torch.allclose(one["b.weight"].x, hidden, atol=1e-6)
    assert not net.a._forward_hooks and not net.b._forward_hooks


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"eta": 0.0}, "eta > 0"),
        ({"eta": float("nan")}, "eta > 0"),
        ({"step": 0.0}, "step > 0"),
        ({"bias_delta": torch.zeros(1)}, "the bias delta has shape (1,), the weight has 4 rows"),
    ],
)
def test_analytical_q_refuses_knobs_it_cannot_use(kw: dict, says: str) -> None:
    """Before: eta 0 returned 1-p, step 0 a ZeroDivisionError, a (1,) bias broadcast."""
    d, xbar = torch.randn(4, 3), torch.rand(3)
    with pytest.raises(PruningError, match=re.escape(says)):
        analytical_q(d, xbar, 0.9, name="w", **kw)


@pytest.mark.parametrize(
    "kw", [{"step": 0.0}, {"step": -0.01}, {"refine": 0}, {"patience": 0}, {"factor": 0.5}]
)
def test_the_q_search_refuses_a_grid_it_cannot_walk(kw: dict) -> None:
    """step 0 or refine 0 divided by zero; a negative step tried one q, unannounced."""
    with pytest.raises(PruningError, match="q search"):
        search_q_global(lambda q: -abs(q - 0.02), 0.99, **kw)
