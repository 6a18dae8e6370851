"""The method-selection pipeline: delta statistics in, (method, params, reason) out.

The paper's rule: if you control the fine-tuning, fine-tune with AdamR-L2 and then
DARE (DAREx-L2); post hoc, small or moderate deltas take DAREx-q (q from labels,
the output-change proxy or per-layer q); deltas of large magnitude or spread take
an importance method (magnitude, or WANDA with calibration inputs); LoRA and
structural pruning take DAREx-q.

"Large" is measured by the noise DARE injects. With the 1/(1-p) rescale each entry
of the pruned delta has standard deviation ``sqrt(p/(1-p)) * |d|`` around ``d``, so
the noise-to-weight ratio

    nr = sqrt(p/(1-p)) * rms(d) / rms(W_base)

says how loud the injected noise is next to the weights it perturbs (rms(W_base)
falls back to ``TYPICAL_WEIGHT_RMS`` = 0.05 when the base is not given; MiniLM-L6's
linear weights have rms 0.061). Thresholds:

- ``nr <= SMALL_NR`` (0.2): plain DARE. In the reproduction grid (docs/results/)
  DARE was within a point of the best method in most cells below 0.2, and the q search
  lost up to 4 points there to the noise of its validation split; from 0.24 to 0.47
  DARE lost 1.4 to 21 points to DAREx-q (SmolLM2/rt-sentiment-gen at p = 0.99: 64.3 vs
  85.3). The threshold was 0.5 until that grid; 0.2 was read off its first 51 cells.
- ``SMALL_NR < nr <= LARGE_NR`` (2.0): DAREx-q; q from labels (grid search from
  q = 1-p, so never worse than DARE on the validation split) or from calibration
  inputs (one global q by the output change, ``darex prune --q outchange``; in the grid
  it was within 3.3 points of the labeled search at nr > 0.2, where the per-layer least
  squares lost up to 11 points to DARE); with neither, DARE.
- the fine-tune changed at most a fraction 1-p of the entries: magnitude, which
  then keeps every changed entry exactly (statistics count changed entries only).
- ``nr > LARGE_NR`` or relative spread ``std(|d|)/mean(|d|) > HEAVY_SPREAD`` (3.0):
  WANDA with calibration inputs, else magnitude. At nr > 2 the DARE noise is twice
  the weights themselves (the lr 2e-4 x 3 epochs fine-tune, where DARE collapsed);
  a Gaussian delta has spread 0.76, so a spread above 3 means a few large entries
  carry the delta, which top-k keeps exactly and random dropping loses.

With labels the statistics are not consulted (past the magnitude-exact case): DAREx-q
with q searched on the labeled examples, from q = 1-p, so never below plain DARE on
them. In the reproduction grid that policy came within a point of the best method in
82 of the 124 cells the thresholds were not read off (mean shortfall 2.2 points),
where the statistics rule with labels came within a point in 75 (2.6 points). The
thresholds above now decide only without labels. Ingest then also scores magnitude and
WANDA on the same examples and keeps the best (``storage.labeled.labeled_choice``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pruning.methods import Method, check_rate

TYPICAL_WEIGHT_RMS = 0.05
SMALL_NR = 0.2
LARGE_NR = 2.0
HEAVY_SPREAD = 3.0
ADAMR_REG = 0.1
ADAMR_SWEEP = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass(frozen=True)
class DeltaStats:
    """Statistics of one delta (or of several, merged): size, mean and spread of |d|."""

    numel: int
    mean_abs: float  # mean |d|
    std_abs: float  # std of |d|
    rms: float  # sqrt(mean d^2)
    mean: float  # signed mean of d
    max_abs: float
    base_rms: float | None = None  # rms of the base weights, when known
    size: int = 0  # entries of the tensor(s), changed or not (numel counts the changed ones)
    # the densest single tensor's density (merged statistics; None: this one's own)
    max_density: float | None = None

    @property
    def density(self) -> float:
        """Fraction of entries the fine-tune changed."""
        return self.numel / self.size if self.size else 1.0

    @property
    def densest(self) -> float:
        """The largest density of one tensor: importance methods keep 1-p of each tensor,
        so all of a delta's changes survive only when every tensor is that sparse."""
        return self.density if self.max_density is None else self.max_density

    @property
    def spread(self) -> float:
        """Relative spread std(|d|) / mean(|d|) (0.76 for a Gaussian delta)."""
        return self.std_abs / self.mean_abs if self.mean_abs > 0 else 0.0

    def noise_ratio(self, p: float) -> float:
        """``sqrt(p/(1-p)) * rms(d) / rms(W_base)``: DARE noise next to the weights."""
        ref = self.base_rms if self.base_rms else TYPICAL_WEIGHT_RMS
        return math.sqrt(p / (1.0 - p)) * self.rms / ref


@torch.no_grad()
def delta_stats(d: torch.Tensor, base: torch.Tensor | None = None) -> DeltaStats:
    """Statistics of the entries the fine-tune changed (``d != 0``), in fp64.

    Exact zeros are left out: Adam leaves the embedding rows of tokens the
    fine-tune never saw exactly at the base, and counting those ~11M zeros of
    MiniLM's word embedding would halve the rms and hide a delta that DARE
    cannot keep. ``base_rms`` is taken over the same entries when ``base`` is given.
    """
    x = d.detach().double().reshape(-1)
    changed = x != 0
    x = x[changed]
    a = x.abs()
    n = x.numel()
    if n == 0:
        return DeltaStats(0, 0.0, 0.0, 0.0, 0.0, 0.0, size=int(changed.numel()))
    if base is None:
        base_rms = None
    else:
        w = base.detach().double().reshape(-1)
        w = w[changed] if w.numel() == changed.numel() else w
        base_rms = float(w.pow(2).mean().sqrt())
    return DeltaStats(
        numel=n,
        mean_abs=float(a.mean()),
        std_abs=float(a.std(correction=0)),
        rms=float(x.pow(2).mean().sqrt()),
        mean=float(x.mean()),
        max_abs=float(a.max()),
        base_rms=base_rms,
        size=int(changed.numel()),
    )


def merge_stats(stats: Iterable[DeltaStats]) -> DeltaStats:
    """Element-weighted merge of per-layer statistics into one."""
    stats = list(stats)
    size = sum(s.size for s in stats)
    densest = max((s.densest for s in stats if s.size), default=None)
    stats = [s for s in stats if s.numel > 0]
    n = sum(s.numel for s in stats)
    if n == 0:
        return DeltaStats(0, 0.0, 0.0, 0.0, 0.0, 0.0, size=size, max_density=densest)
    mean_abs = sum(s.numel * s.mean_abs for s in stats) / n
    ms = sum(s.numel * s.rms**2 for s in stats) / n  # mean d^2 = mean |d|^2
    has_base = all(s.base_rms is not None for s in stats)
    base_ms = sum(s.numel * (s.base_rms or 0.0) ** 2 for s in stats) / n
    return DeltaStats(
        numel=n,
        mean_abs=mean_abs,
        std_abs=math.sqrt(max(ms - mean_abs**2, 0.0)),
        rms=math.sqrt(ms),
        mean=sum(s.numel * s.mean for s in stats) / n,
        max_abs=max(s.max_abs for s in stats),
        base_rms=math.sqrt(base_ms) if has_base else None,
        size=size,
        max_density=densest,
    )


@dataclass(frozen=True)
class Recommendation:
    """``method`` with its ``params`` (always ``p``; ``q`` a number or None) and a reason."""

    method: Method
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def recommend(
    stats: DeltaStats | Mapping[str, DeltaStats],
    *,
    has_labels: bool,
    is_lora: bool,
    controls_finetune: bool = False,
    has_calib: bool = False,
    p: float = 0.99,
) -> Recommendation:
    """The selection pipeline (module docstring) for target rate ``p``.

    ``params["q"]`` is None whenever q is to be searched (``params["q_method"]`` says
    how: "labeled" grid search, or "outchange" on calibration inputs).
    """
    p = check_rate(p, "<recommend>")
    s = stats if isinstance(stats, DeltaStats) else merge_stats(stats.values())
    nr, spread = s.noise_ratio(p), s.spread
    where = f"rms(d)={s.rms:.2e}, noise ratio {nr:.2f} at p={p}, spread {spread:.2f}"
    q_method = "labeled" if has_labels else "outchange" if has_calib else None
    if controls_finetune:
        params = {"p": p, "q": None, "optimizer": "adamr", "norm": "l2", "reg": ADAMR_REG}
        params["reg_sweep"] = list(ADAMR_SWEEP)
        return Recommendation(
            Method.dare,
            params,
            "fine-tune with AdamR-L2 (pulls the delta toward zero), then DARE (DAREx-L2)",
        )
    if is_lora:
        if q_method:
            return Recommendation(
                Method.darex_q,
                {"p": p, "q": None, "q_method": q_method},
                f"LoRA delta B@A: DAREx-q with q by {q_method} ({where})",
            )
        return Recommendation(
            Method.dare, {"p": p, "q": None}, f"LoRA delta B@A, no data to pick q: DARE ({where})"
        )
    if s.size and s.densest <= 1.0 - p:
        why = (
            "p = 0 keeps every entry"
            if p == 0.0
            else f"the fine-tune changed only {s.density:.2%} of the entries, at most "
            f"{s.densest:.2%} of any tensor"
        )
        return Recommendation(
            Method.magnitude,
            {"p": p, "q": None},
            f"{why}: magnitude keeps every one of them, exactly ({where})",
        )
    if has_labels:
        return Recommendation(
            Method.darex_q,
            {"p": p, "q": None, "q_method": "labeled"},
            "labels at hand: DAREx-q with q searched on them from q = 1-p (plain DARE), "
            f"never below DARE on them ({where})",
        )
    if nr > LARGE_NR or spread > HEAVY_SPREAD:
        why = "large delta" if nr > LARGE_NR else "heavy-tailed delta"
        if has_calib:
            return Recommendation(
                Method.wanda,
                {"p": p, "q": None, "per": "row"},
                f"{why}: random dropping collapses, WANDA keeps what matters ({where})",
            )
        return Recommendation(
            Method.magnitude,
            {"p": p, "q": None},
            f"{why}: random dropping collapses, magnitude keeps the largest entries ({where})",
        )
    if nr <= SMALL_NR:
        return Recommendation(
            Method.dare, {"p": p, "q": None}, f"small delta: DARE's noise stays low ({where})"
        )
    if q_method:
        return Recommendation(
            Method.darex_q,
            {"p": p, "q": None, "q_method": q_method},
            f"moderate delta: DAREx-q with q by {q_method} trades bias for variance ({where})",
        )
    return Recommendation(
        Method.dare,
        {"p": p, "q": None},
        f"moderate delta but no labels or calibration inputs to pick q: DARE ({where})",
    )
