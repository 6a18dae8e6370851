"""Choosing the DAREx-q rescale: global grid search (labeled or output change),
per-layer analytical q, and per-layer least-squares q.

Notation (PAPER.md): for one output row, ``c_j = d_j * x_j``, ``S = sum c_j``,
``Q = sum c_j^2``; pruning with the DARE mask and scale 1/q gives an output error
with mean ``(1-(1-p)/q) S`` and variance ``p(1-p)/q^2 Q``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from pruning.calib import on_device
from pruning.errors import PruningError
from pruning.methods import check_rate, darex_q
from pruning.sparse import SparseDelta

# ---------------------------------------------------------------- global search


@dataclass(frozen=True)
class QSearch:
    """Result of a global q search: the best q, its score, and every (q, score) tried."""

    q: float
    score: float
    tried: tuple[tuple[float, float], ...]


def q_grid(p: float, *, factor: float = 10.0, step: float | None = None) -> list[float]:
    """Coarse grid ``1-p, 1-p+step, ...`` up to ``min(factor*(1-p), 1)``; step defaults to (1-p)/2.

    For p = 0.99 this is 0.01, 0.015, ..., 0.1 (the paper's grid). Always starts at 1-p.
    """
    p = check_rate(p, "<global q>")
    lo = 1.0 - p
    hi = min(factor * lo, 1.0)
    step = lo / 2 if step is None else step
    n = max(0, math.floor((hi - lo) / step + 1e-9))
    return [lo] + [min(lo + i * step, 1.0) for i in range(1, n + 1)]


def search_q_global(
    score_fn: Callable[[float], float],
    p: float,
    *,
    factor: float = 10.0,
    step: float | None = None,
    patience: int = 3,
    refine: int = 10,
) -> QSearch:
    """Maximise ``score_fn(q)`` (higher is better) over q in [1-p, factor*(1-p)].

    Coarse scan from q = 1-p upward; stop after ``patience`` consecutive steps that do
    not improve the best score; then scan a ``refine``-times finer grid on
    [best - step, best + step] (clipped to the coarse range). q = 1-p (plain DARE) is always tried,
    so the result is never worse than DARE on the score.
    """
    if step is not None and not 0 < step < math.inf:
        raise PruningError(f"q search: step must be > 0, got {step}")
    if not (refine >= 1 and patience >= 1 and factor >= 1):
        raise PruningError(
            f"q search: refine and patience must be >= 1 and factor >= 1, got refine "
            f"{refine}, patience {patience}, factor {factor}"
        )
    grid = q_grid(p, factor=factor, step=step)
    step = (grid[1] - grid[0]) if len(grid) > 1 else (1.0 - p) / 2
    tried: dict[float, float] = {}

    def score(q: float) -> float:
        q = round(q, 12)
        if q not in tried:
            s = float(score_fn(q))
            tried[q] = s if math.isfinite(s) else -math.inf
        return tried[q]

    best_q, best, bad = grid[0], score(grid[0]), 0
    for q in grid[1:]:
        s = score(q)
        if s > best:
            best_q, best, bad = q, s, 0
        else:
            bad += 1
            if bad >= patience:
                break
    lo, hi = max(grid[0], best_q - step), min(grid[-1], best_q + step)
    fine = step / refine
    for i in range(round((hi - lo) / fine) + 1):
        q = lo + i * fine
        s = score(q)
        if s > best:
            best_q, best = round(q, 12), s
    return QSearch(best_q, best, tuple(sorted(tried.items())))


# ---------------------------------------------------------------- output change


def encoder_output_change(
    ref: torch.Tensor, out: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> float:
    """Mean abs difference of the last hidden states (B, T, H) over real tokens."""
    diff = (ref.float() - out.float()).abs()  # (B, T, H)
    if attention_mask is None:
        return float(diff.mean())
    m = attention_mask.to(diff.device, diff.dtype)[..., None]  # (B, T, 1)
    return float((diff * m).sum() / (m.sum() * diff.shape[-1]).clamp_min(1))


def decoder_output_change(
    ref_logits: torch.Tensor,
    logits: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    k: int = 5,
) -> float:
    """MSE of the logits at the fine-tuned model's top-k tokens per position (B, T, V)."""
    top = ref_logits.topk(k, dim=-1).indices  # (B, T, k)
    a = ref_logits.gather(-1, top).float()
    b = logits.gather(-1, top).float()
    se = (a - b) ** 2  # (B, T, k)
    if attention_mask is None:
        return float(se.mean())
    m = attention_mask.to(se.device, se.dtype)[..., None]
    return float((se * m).sum() / (m.sum() * k).clamp_min(1))


def _model_output(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], arch: str):
    out = model(**on_device(batch, model))
    if arch == "decoder":
        return out.logits if hasattr(out, "logits") else out[0]
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def output_change_score(
    model: torch.nn.Module,
    deltas: Mapping[str, torch.Tensor],
    p: float,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    arch: str,
    seeds: Iterable[int] = (0, 1, 2),
    mask_names: Mapping[str, str] | None = None,
) -> Callable[[float], float]:
    """Score callback for ``search_q_global``: minus the output change, averaged over seeds.

    ``model`` is the fine-tuned model; ``deltas[name]`` is ``W_ft - W_base`` for the
    parameters to prune (named as in ``model.named_parameters()``). For a q, each such
    parameter is set to ``W_ft - d + darex_q(d, p, q)``, the batches are run, and the
    parameters are put back bit-exactly. Encoders compare the last hidden state
    (mean abs diff), decoders the logits at the fine-tuned top-5 tokens (MSE).
    A mask is drawn from (seed, name); ``mask_names`` gives the name to draw it by where
    that is not the parameter's (the checkpoint's name, so the scored mask is the stored one).
    """
    if arch not in ("encoder", "decoder"):
        raise PruningError(f"unknown architecture kind {arch!r}")
    params = dict(model.named_parameters())
    missing = [n for n in deltas if n not in params]
    if missing:
        raise PruningError(f"deltas name parameters the model lacks: {missing[:5]}")
    seeds = tuple(seeds)
    saved = {n: params[n].detach().clone() for n in deltas}
    refs = [_model_output(model, b, arch) for b in batches]
    change = encoder_output_change if arch == "encoder" else decoder_output_change

    @torch.no_grad()
    def score(q: float) -> float:
        total = 0.0
        for seed in seeds:
            try:
                for n, d in deltas.items():
                    # the mask is drawn where d lives (the CPU's generator: the stored
                    # mask); the model may be on another device
                    sd = darex_q(d, p, q, seed=seed, name=(mask_names or {}).get(n, n))
                    dev = saved[n].device
                    w = saved[n].float() - d.float().to(dev)
                    w.view(-1).index_add_(0, sd.indices.to(dev), sd.values.float().to(dev))
                    params[n].data.copy_(w.to(params[n].dtype))
                for b, ref in zip(batches, refs, strict=True):
                    out = _model_output(model, b, arch)
                    total += change(ref, out, b.get("attention_mask"))
            finally:
                for n in deltas:
                    params[n].data.copy_(saved[n])
        return -total / (len(seeds) * len(batches))

    return score


# ---------------------------------------------------------------- analytical q


def phi(p: float) -> float:
    """``Phi(p) = (1-2p) / log((1-p)/p)`` with its limits: 1/2 at p = 1/2, 0 at p = 0."""
    if p <= 0.0:
        return 0.0
    if abs(p - 0.5) < 1e-9:
        return 0.5
    return (1.0 - 2.0 * p) / math.log((1.0 - p) / p)


# one float16 step at log(2/0.05) = 3.69, relative: 2^-9 / 3.69 (see analytical_q)
ANALYTICAL_RTOL = 2.0**-9 / math.log(2 / 0.05)


@torch.no_grad()
def analytical_q(
    d: torch.Tensor,
    xbar: torch.Tensor,
    p: float,
    eta: float = 0.45,
    bias_delta: torch.Tensor | None = None,
    *,
    q_max: float = 0.998,
    step: float = 0.001,
    stop_frac: float = 0.8,
    rtol: float = ANALYTICAL_RTOL,
    name: str = "?",
) -> float:
    """The paper's per-layer q: row-wise scan of the bound, layer q = mean of row q's.

    For row i, ``c_ij = d_ij * xbar_j`` (bias delta as an extra column with x = 1) and
    ``f_i(q) = |eta (1-(1-p)/q) S_i + eta^2 Phi(p) Q_i / (4 q^2) + log(2/0.05)|``.
    q runs from 1-p to ``q_max`` in steps of ``step``; a row stops at its first step
    that does not lower ``f_i`` by more than ``rtol`` of it, and the scan ends once
    ``stop_frac`` of the rows stopped. Returns a q in [1-p, 1); p = 0 returns 1.0
    (nothing is pruned).

    ``rtol``: the reference code scans in float16, where a change under about one step
    of float16 at f's typical size (log 40 = 3.69, steps of 2^-9) is a tie, and a tie
    stops the row. In exact arithmetic (``rtol = 0``) a row with ``S_i < 0`` improves by
    ever smaller amounts at every step, so it never stops: half the rows of a real
    delta run to ``q_max`` and the layer q lands near 0.5 whatever p is.
    """
    p = check_rate(p, name)
    for key, value in (("eta", eta), ("step", step), ("q_max", q_max), ("stop_frac", stop_frac)):
        if not 0 < value < math.inf:  # NaN fails too
            raise PruningError(f"tensor {name!r}: analytical q needs {key} > 0, got {value}")
    if not 0 <= rtol < 1:
        raise PruningError(f"tensor {name!r}: analytical q needs 0 <= rtol < 1, got {rtol}")
    if p == 0.0:
        return 1.0
    if bias_delta is not None and tuple(bias_delta.shape) != tuple(d.shape[:1]):
        raise PruningError(
            f"tensor {name!r}: the bias delta has shape {tuple(bias_delta.shape)}, the "
            f"weight has {d.shape[0]} rows"
        )
    if d.dim() != 2 or tuple(xbar.shape) != (d.shape[1],):
        raise PruningError(
            f"tensor {name!r}: analytical q needs a 2-D weight and xbar of shape "
            f"({d.shape[-1]},), got {tuple(d.shape)} and {tuple(xbar.shape)}"
        )
    if d.shape[0] == 0:  # no rows to bound: DARE's own scale
        return 1.0 - p
    c = d.double() * xbar.to(d.device).double()[None, :]  # (out, in)
    s, qq = c.sum(1), (c**2).sum(1)  # (out,)
    if bias_delta is not None:
        b = bias_delta.to(d.device).double()
        s, qq = s + b, qq + b**2
    lo = 1.0 - p
    ph, const = phi(p), math.log(2 / 0.05)

    def f(q: float) -> torch.Tensor:
        return (eta * (1 - lo / q) * s + eta**2 * ph * qq / (4 * q * q) + const).abs()

    best = f(lo)
    best_q = torch.full_like(s, lo)
    active = torch.ones_like(s, dtype=torch.bool)
    n_steps = max(0, math.floor((q_max - lo) / step + 1e-9))
    for i in range(1, n_steps + 1):
        q = lo + i * step
        v = f(q)
        improved = active & (v < best * (1.0 - rtol))
        best = torch.where(improved, v, best)
        best_q = torch.where(improved, torch.full_like(best_q, q), best_q)
        active &= improved
        if float((~active).float().mean()) >= stop_frac:
            break
    return float(best_q.mean())


# ---------------------------------------------------------------- least squares q


def _mask_of(mask: torch.Tensor | SparseDelta, d: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(mask, SparseDelta):
        m = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
        m[mask.indices.to(d.device)] = True
        return m.view(d.shape)
    if mask.numel() != d.numel():
        raise PruningError(f"tensor {name!r}: mask has {mask.numel()} entries, delta {d.numel()}")
    return mask.to(device=d.device).reshape(d.shape).bool()


@torch.no_grad()
def lsq_q(
    d: torch.Tensor,
    mask: torch.Tensor | SparseDelta,
    x: torch.Tensor,
    *,
    name: str = "?",
) -> float:
    """Least-squares q: ``argmin_q || (m*d) X / q - d X ||^2``, closed form in 1/q.

    ``1/q = <(m*d)X, dX> / ||(m*d)X||^2`` with X the (n, in) calibration inputs of the
    layer (rows are tokens). An empty mask returns 1.0; a non-positive inner product
    (the kept part anti-correlates with the full delta) raises ``PruningError``.
    """
    if d.dim() != 2 or x.dim() != 2 or x.shape[1] != d.shape[1]:
        raise PruningError(
            f"tensor {name!r}: lsq q needs d (out, in) and X (n, in), got "
            f"{tuple(d.shape)} and {tuple(x.shape)}"
        )
    m = _mask_of(mask, d, name)
    df = d.double()
    xf = x.to(d.device).double()
    y = xf @ df.T  # (n, out)
    ym = xf @ (df * m).T  # (n, out)
    den = float((ym * ym).sum())
    if den == 0.0:
        return 1.0
    num = float((ym * y).sum())
    if num <= 0.0:
        raise PruningError(f"tensor {name!r}: kept delta does not correlate with the full delta")
    return den / num
