"""The selection pipeline: statistics are right, and each regime picks the documented method."""

from __future__ import annotations

import pytest
import torch

from pruning.methods import Method
from pruning.recommend import delta_stats, merge_stats, recommend


def _gauss(rms: float, n: int = 20_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * rms


def test_delta_stats_and_merge() -> None:
    a, b = _gauss(1e-3, 5000), _gauss(4e-3, 3000, seed=1) + 1e-3
    sa, sb, sab = delta_stats(a), delta_stats(b), delta_stats(torch.cat([a, b]))
    m = merge_stats([sa, sb])
    for field in ("numel", "mean_abs", "std_abs", "rms", "mean", "max_abs"):
        assert getattr(m, field) == pytest.approx(getattr(sab, field), rel=1e-9), field
    assert sa.spread == pytest.approx(0.756, abs=0.03)  # |N(0,1)|: sqrt(1-2/pi)/sqrt(2/pi)
    w = torch.full((10,), 0.1)
    assert delta_stats(a[:10], base=w).base_rms == pytest.approx(0.1)


def test_small_delta_takes_dare_unless_labels_can_check_it() -> None:
    s = delta_stats(_gauss(8e-4))  # noise ratio 0.16 at p = 0.99
    assert s.noise_ratio(0.99) < 0.2
    rec = recommend(s, has_labels=False, is_lora=False, has_calib=True)
    assert rec.method is Method.dare and rec.params["p"] == 0.99 and rec.params["q"] is None
    assert "small" in rec.reason
    # with labels the q search starts at 1-p (DARE itself) and keeps DARE if nothing beats it
    rec = recommend(s, has_labels=True, is_lora=False)
    assert rec.method is Method.darex_q and rec.params["q_method"] == "labeled"
    assert rec.params["q"] is None and "labels at hand" in rec.reason


def test_labels_take_the_labeled_search_whatever_the_delta() -> None:
    """The grid's held-out cells: always searching q on labels beat the statistics rule."""
    spiky = _gauss(2e-4)
    spiky[::500] = 0.2
    for d in (_gauss(8e-4), _gauss(6e-3), _gauss(3e-2), spiky):
        for p in (0.5, 0.9, 0.99, 0.999):
            rec = recommend(delta_stats(d), has_labels=True, is_lora=False, p=p)
            assert rec.method is Method.darex_q and rec.params["q_method"] == "labeled"
    sparse = torch.zeros(20_000)
    sparse[::500] = 0.02  # all the fine-tune changed fits in 1-p: magnitude keeps it exactly
    assert recommend(delta_stats(sparse), has_labels=True, is_lora=False).method is Method.magnitude


def test_magnitude_is_named_only_when_every_tensor_fits_in_1_minus_p() -> None:
    """A bias-only fine-tune: 0.1 % of all entries changed, but all of one small tensor.
    Magnitude keeps 1-p of each tensor, so it would drop 99 % of that bias: not named."""
    from pruning.methods import magnitude

    weight, bias = torch.zeros(768, 768), _gauss(1e-2)[:768]
    per = {"w": delta_stats(weight), "b": delta_stats(bias)}
    merged = merge_stats(per.values())
    assert merged.density < 0.01 and merged.densest == 1.0
    rec = recommend(per, has_labels=True, is_lora=False, p=0.99)
    assert rec.method is not Method.magnitude, rec.reason
    assert magnitude(bias, 0.99).nnz < 10  # what naming it would have stored of the bias
    spread = {f"w{i}": delta_stats(torch.where(torch.arange(2000) % 200 == 0, 0.01, 0.0))
              for i in range(3)}  # fmt: skip
    rec = recommend(spread, has_labels=True, is_lora=False, p=0.99)
    assert rec.method is Method.magnitude and "at most 0.50%" in rec.reason
    rec = recommend(per, has_labels=True, is_lora=False, p=0.0)  # everything is kept
    assert rec.method is Method.magnitude and rec.reason.startswith("p = 0 keeps every entry")


def test_delta_dare_lost_on_in_the_grid_takes_darex_q() -> None:
    """rms 2e-3 (noise ratio 0.4 at p = 0.99): where the grid had DARE 2-21 points behind."""
    s = delta_stats(_gauss(2e-3))
    assert 0.2 < s.noise_ratio(0.99) < 0.5
    rec = recommend(s, has_labels=False, is_lora=False, has_calib=True)
    assert rec.method is Method.darex_q and rec.params["q_method"] == "outchange"
    assert "moderate" in rec.reason
    assert recommend(s, has_labels=False, is_lora=False, p=0.9, has_calib=True).method is (
        Method.dare
    )


def test_moderate_delta_takes_darex_q_when_q_can_be_chosen() -> None:
    s = delta_stats(_gauss(6e-3))
    rec = recommend(s, has_labels=False, is_lora=False, has_calib=True)
    assert rec.method is Method.darex_q and rec.params["q_method"] == "outchange"
    rec = recommend(s, has_labels=False, is_lora=False)
    assert rec.method is Method.dare and "no labels" in rec.reason
    # a lower rate makes the same delta small
    assert recommend(s, has_labels=False, is_lora=False, p=0.5, has_calib=True).method is (
        Method.dare
    )


def test_large_or_heavy_tailed_delta_takes_an_importance_method() -> None:
    big = delta_stats(_gauss(3e-2))
    assert recommend(big, has_labels=False, is_lora=False).method is Method.magnitude
    rec = recommend(big, has_labels=False, is_lora=False, has_calib=True)
    assert rec.method is Method.wanda and "large" in rec.reason
    spiky = _gauss(2e-4)
    spiky[::500] = 0.2  # few big entries on a small dense delta
    s = delta_stats(spiky)
    assert s.spread > 3 and s.noise_ratio(0.99) <= 2
    assert recommend(s, has_labels=False, is_lora=False).method is Method.magnitude
    sparse = torch.zeros(20_000)
    sparse[::500] = 0.02  # the fine-tune touched 0.2% of the entries
    s = delta_stats(sparse)
    assert s.numel == 40 and s.density == pytest.approx(0.002)
    rec = recommend(s, has_labels=False, is_lora=False, has_calib=True)
    assert rec.method is Method.magnitude and "exactly" in rec.reason
    # the base's own scale decides: the same delta is small next to big weights
    s_base = delta_stats(_gauss(3e-2), base=torch.full((10,), 2.0))
    assert recommend(s_base, has_labels=False, is_lora=False).method is Method.dare


def test_lora_per_layer_mapping_and_adamr() -> None:
    per_layer = {"a": delta_stats(_gauss(1e-2)), "b": delta_stats(_gauss(1e-2, seed=2))}
    rec = recommend(per_layer, has_labels=True, is_lora=True)
    assert rec.method is Method.darex_q and "LoRA" in rec.reason
    rec = recommend(per_layer, has_labels=False, is_lora=False, controls_finetune=True)
    assert rec.method is Method.dare and rec.params["optimizer"] == "adamr"
    assert rec.params["norm"] == "l2" and rec.params["reg"] > 0


def test_untouched_entries_do_not_dilute_the_statistics() -> None:
    """Rows a fine-tune never touched (exact zeros) must not hide a delta DARE cannot keep."""
    d = _gauss(6e-3)
    padded = torch.cat([d, torch.zeros(3 * d.numel())])
    s, sp = delta_stats(d), delta_stats(padded)
    for field in ("numel", "mean_abs", "std_abs", "rms", "max_abs"):
        assert getattr(sp, field) == pytest.approx(getattr(s, field), rel=1e-12), field
    assert sp.density == pytest.approx(0.25)
    assert recommend(sp, has_labels=False, is_lora=False, has_calib=True).method is (Method.darex_q)
    base = torch.cat([torch.full_like(d, 0.05), torch.full((3 * d.numel(),), 9.0)])
    assert delta_stats(padded, base=base).base_rms == pytest.approx(0.05)
