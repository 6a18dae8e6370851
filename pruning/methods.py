"""Delta-parameter pruning methods: one tensor in, one ``SparseDelta`` out.

Each method maps a delta ``d = W_ft - W_base`` to flat sorted kept indices and
already-rescaled values. Rescale factors are computed in fp32 and applied to the
kept entries in fp32; values come back in ``d``'s dtype.

| method      | keep rule                                  | scale          |
|-------------|--------------------------------------------|----------------|
| dare        | counter-hash Bernoulli(1-p) mask            | 1/(1-p)        |
| darex_q     | same mask as dare                           | 1/q            |
| magnitude   | top round((1-p)*n) of abs(d)                | 1, or 1/q      |
| wanda       | top (1-p) of abs(d_ij)*||X_j|| per row/tensor | 1, or 1/q    |
| structural  | whole rows/cols kept with prob 1-p          | 1/q (q=1-p)    |
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import torch

from pruning.errors import NonFiniteDelta, PruningError
from pruning.sparse import SparseDelta, hash32, keep_threshold, mask_key, rate_limit_problem

CHUNK = 1 << 18  # elements hashed per step: int64 temporaries of 2 MiB each


class Method(StrEnum):
    dare = "dare"
    darex_q = "darex_q"
    magnitude = "magnitude"
    wanda = "wanda"
    structural = "structural"


def check_rate(p: float, name: str) -> float:
    """Return ``p`` as float, or raise ``PruningError`` unless 0 <= p < 1."""
    try:
        p = float(p)
    except (TypeError, ValueError) as e:
        raise PruningError(f"tensor {name!r}: pruning rate must be a number, got {p!r}") from e
    if not (0.0 <= p < 1.0) or math.isnan(p):
        raise PruningError(f"tensor {name!r}: pruning rate p must be in [0, 1), got {p}")
    if why := rate_limit_problem(p):
        raise PruningError(f"tensor {name!r}: {why}")
    return p


def check_seed(seed: int, name: str) -> int:
    """Return ``seed`` as int, or raise ``PruningError`` unless it is an integer (1.7 would
    otherwise draw seed 1's mask, and None or "abc" fail deep in the hash)."""
    try:
        return operator.index(seed)
    except TypeError:
        raise PruningError(f"tensor {name!r}: seed must be an integer, got {seed!r}") from None


# The smallest rescale q: DARE's own at the highest rate (1 - MAX_RATE). A smaller one
# scales the kept entries by over a million, and 1/q itself overflows float32 below 3e-39.
MIN_Q = 1e-6


def q_problem(q: float) -> str | None:
    """What is wrong with a rescale q, or None when it is a finite number >= ``MIN_Q``: the
    one wording of this check for the library, ``darex add --q`` and the HTTP upload."""
    if MIN_Q <= q < math.inf:
        return None
    return f"the rescale q must be a finite number >= {MIN_Q:g} (1 - the highest rate), got {q}"


def check_q(q: float, name: str) -> float:
    """Return ``q`` as float, or raise ``PruningError`` unless ``MIN_Q <= q`` and finite."""
    try:
        q = float(q)
    except (TypeError, ValueError) as e:
        raise PruningError(f"tensor {name!r}: q must be a number, got {q!r}") from e
    if why := q_problem(q):
        raise PruningError(f"tensor {name!r}: {why}")
    return q


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``, checked in chunks (no full-size temporary)."""
    flat = t.reshape(-1)
    return all(
        bool(torch.isfinite(flat[a : a + CHUNK]).all()) for a in range(0, flat.numel(), CHUNK)
    )


def check_delta(d: torch.Tensor, name: str) -> None:
    """Raise unless ``d`` is a finite floating tensor."""
    if not isinstance(d, torch.Tensor):
        raise PruningError(f"tensor {name!r}: expected a torch.Tensor, got {type(d).__name__}")
    if not d.is_floating_point():
        raise PruningError(f"tensor {name!r}: expected a floating delta, got dtype {d.dtype}")
    if not all_finite(d):
        bad = int((~torch.isfinite(d)).sum())
        raise NonFiniteDelta(f"tensor {name!r}: delta holds {bad} NaN/Inf value(s)")


def keep_count(numel: int, p: float) -> int:
    """Number of entries importance methods keep: round((1-p) * numel)."""
    return min(numel, max(0, round((1.0 - p) * numel)))


def _gather(d: torch.Tensor, idx: torch.Tensor, scale: float, name: str) -> torch.Tensor:
    # Rescale in fp32 (fp16 * 100 would lose bits), cast back to d's dtype.
    vals = d.reshape(-1)[idx]
    if scale == 1.0:
        return vals.clone()
    out = vals.float() * scale
    if not all_finite(out):  # a q so small that 1/q overflows float32 on some value
        raise PruningError(
            f"tensor {name!r}: rescaling by 1/q = {scale:.3g} overflows float32 "
            f"(largest kept |delta| {float(vals.abs().max()):.3g}); the q is too small"
        )
    low = out.to(d.dtype)  # past d's range (fp16 beyond 65504): kept in fp32, never inf
    return low if d.dtype == torch.float32 or bool(torch.isfinite(low).all()) else out


def _scale_of(q: float | None, name: str) -> float:
    return 1.0 if q is None else 1.0 / check_q(q, name)


def dare(d: torch.Tensor, p: float, *, seed: int, name: str) -> SparseDelta:
    """DARE: keep each entry with prob 1-p (mask ``keep_mask(seed, name, p)``), scale 1/(1-p).

    ``E[out] = d``. p == 0 keeps every entry with scale 1.
    """
    return darex_q(d, p, 1.0 - check_rate(p, name), seed=seed, name=name)


def darex_q(d: torch.Tensor, p: float, q: float, *, seed: int, name: str) -> SparseDelta:
    """DAREx-q: the DARE mask, survivors scaled by 1/q (q = 1-p is DARE).

    Bias of a row output ``(1-(1-p)/q) * S``, variance ``p(1-p)/q^2 * Q``.
    """
    p = check_rate(p, name)
    q = check_q(q, name)
    seed = check_seed(seed, name)
    check_delta(d, name)
    idx = dare_indices(seed, name, p, d.numel(), d.device)
    scale = 1.0 / q
    return SparseDelta(tuple(d.shape), idx, _gather(d, idx, scale, name), p, scale, seed, name)


def dare_indices(
    seed: int, name: str, p: float, numel: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``kept_indices(seed, name, p, numel)`` computed in chunks of ``CHUNK``.

    The same hash and threshold as ``pruning.sparse.keep_mask`` (so the same bits), but
    neither the full bool mask nor 4M-element int64 temporaries are ever held.
    """
    key, thr = mask_key(seed, name), keep_threshold(p)
    parts = []
    for start in range(0, numel, CHUNK):
        idx = torch.arange(start, min(start + CHUNK, numel), dtype=torch.int64, device=device)
        parts.append(idx[hash32(idx, key) < thr])
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)


def _topk_sorted(
    n: int,
    k: int,
    score_range: Callable[[int, int], torch.Tensor],
    score_at: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Flat sorted indices of the k largest scores of n entries.

    ``score_range(a, b)`` scores entries a..b-1, ``score_at(idx)`` the given ones (fp32).
    For a small k of a large tensor, a threshold from a strided sample selects the
    candidates chunk by chunk, so neither the full score nor full-size index copies
    are held; otherwise plain ``topk`` on the full score.
    """
    if k >= n:
        return torch.arange(n)
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if n >= 1 << 20 and 8 * k <= n:
        sample = score_at(torch.arange(0, n, max(1, n // 65536)))
        frac = 2.0 * k / n  # twice the needed fraction: the sample is an estimate
        t = torch.kthvalue(sample, max(1, int(sample.numel() * (1.0 - frac)))).values
        parts = [
            torch.nonzero(score_range(a, min(a + CHUNK, n)) >= t).flatten() + a
            for a in range(0, n, CHUNK)
        ]
        cand = torch.cat(parts)
        if k <= cand.numel() <= 16 * k:
            top = torch.topk(score_at(cand), k, sorted=False).indices
            return torch.sort(cand[top]).values
    idx = torch.topk(score_range(0, n), k, sorted=False).indices
    return torch.sort(idx).values


def magnitude(d: torch.Tensor, p: float, q: float | None = None, *, name: str = "?") -> SparseDelta:
    """Keep the top round((1-p)*n) entries of |d|; scale 1 (or 1/q when q is given)."""
    p = check_rate(p, name)
    check_delta(d, name)
    scale = _scale_of(q, name)
    flat = d.reshape(-1)
    idx = _topk_sorted(
        flat.numel(),
        keep_count(d.numel(), p),
        lambda a, b: flat[a:b].abs().float(),
        lambda i: flat[i].abs().float(),
    ).to(d.device)
    return SparseDelta(tuple(d.shape), idx, _gather(d, idx, scale, name), p, scale, None)


def wanda(
    d: torch.Tensor,
    p: float,
    col_norm: torch.Tensor,
    *,
    per: str = "row",
    q: float | None = None,
    name: str = "?",
) -> SparseDelta:
    """WANDA on deltas: score ``|d_ij| * ||X_j||_2``, keep the top (1-p) per row or per tensor.

    ``d`` is an (out, in) weight; ``col_norm`` the (in,) L2 norm of each input feature
    over the calibration tokens. Scale 1 (or 1/q when q is given).
    """
    p = check_rate(p, name)
    check_delta(d, name)
    scale = _scale_of(q, name)
    if d.dim() != 2:
        raise PruningError(f"tensor {name!r}: wanda needs a 2-D weight, got shape {tuple(d.shape)}")
    if col_norm is None or tuple(col_norm.shape) != (d.shape[1],):
        got = None if col_norm is None else tuple(col_norm.shape)
        raise PruningError(
            f"tensor {name!r}: wanda needs col_norm of shape ({d.shape[1]},), got {got}"
        )
    if d.numel() == 0:
        return _empty(d, p, scale)
    norm = col_norm.to(device=d.device, dtype=torch.float32)
    if per == "tensor":
        flat, cols = d.reshape(-1), d.shape[1]

        def score_at(i: torch.Tensor) -> torch.Tensor:
            return flat[i].abs().float() * norm[i % cols]

        def score_range(a: int, b: int) -> torch.Tensor:
            return score_at(torch.arange(a, b, device=d.device))

        idx = _topk_sorted(d.numel(), keep_count(d.numel(), p), score_range, score_at)
        idx = idx.to(d.device)
    elif per == "row":
        rows, cols = d.shape
        k = keep_count(cols, p)
        if k == cols:
            idx = torch.arange(d.numel(), device=d.device)
        else:
            # round((1-p) * cols) can be 0 (p = 0.999 on 384 columns) while the tensor's
            # budget is not: then the round((1-p) * numel) rows whose best entry scores
            # highest keep that entry, rather than the whole delta being dropped
            total = keep_count(d.numel(), p) if k == 0 else 0
            parts, bests, block = [], [], max(1, CHUNK // cols)  # rows scored per step
            for r0 in range(0, rows, block):
                score = d[r0 : r0 + block].abs().float() * norm[None, :]  # (block, in)
                base = torch.arange(r0, r0 + score.shape[0], device=d.device)[:, None] * cols
                if total:
                    best = score.max(dim=1)
                    bests.append(best.values)
                    parts.append(best.indices + base[:, 0])
                else:
                    col_idx = torch.topk(score, k, dim=1, sorted=False).indices  # (block, k)
                    parts.append((col_idx + base).reshape(-1))
            idx = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
            if total:
                idx = idx[torch.topk(torch.cat(bests), total, sorted=False).indices]
            idx = torch.sort(idx).values
    else:
        raise PruningError(f"tensor {name!r}: wanda per must be 'row' or 'tensor', got {per!r}")
    return SparseDelta(tuple(d.shape), idx, _gather(d, idx, scale, name), p, scale, None)


def structural(
    d: torch.Tensor,
    p: float,
    *,
    axis: str = "row",
    q: float | None = None,
    seed: int,
    name: str,
) -> SparseDelta:
    """Drop whole rows (or columns) of d, each kept with prob 1-p; survivors scaled by 1/q.

    q defaults to 1-p (unbiased). The row/column mask is the counter-hash mask of
    ``(seed, f"{name}#{axis}", p)`` over rows/columns. A 1-D tensor is read as (n, 1).
    """
    p = check_rate(p, name)
    seed = check_seed(seed, name)
    check_delta(d, name)
    if axis not in ("row", "col"):
        raise PruningError(f"tensor {name!r}: structural axis must be 'row' or 'col', got {axis!r}")
    scale = 1.0 / check_q(1.0 - p if q is None else q, name)
    if d.numel() == 0:
        return _empty(d, p, scale)
    m2 = d.reshape(d.shape[0], -1) if d.dim() >= 1 else d.reshape(1, 1)  # (rows, cols)
    rows, cols = m2.shape
    if axis == "row":
        r = dare_indices(seed, f"{name}#row", p, rows, d.device)  # kept rows
        c = torch.arange(cols, device=d.device)
    else:
        r = torch.arange(rows, device=d.device)
        c = dare_indices(seed, f"{name}#col", p, cols, d.device)  # kept columns
    idx = (r[:, None] * cols + c[None, :]).reshape(-1)  # sorted: row-major over kept lines
    return SparseDelta(tuple(d.shape), idx, _gather(d, idx, scale, name), p, scale, None)


def _empty(d: torch.Tensor, p: float, scale: float) -> SparseDelta:
    """A tensor with no entries keeps none (its shape, nothing else)."""
    idx = torch.empty(0, dtype=torch.int64, device=d.device)
    return SparseDelta(tuple(d.shape), idx, d.reshape(-1)[:0].clone(), p, scale, None)


def method_for(method: Method | str, d: torch.Tensor, col_norm: torch.Tensor | None) -> str:
    """The method one tensor is pruned with: WANDA weighs a linear weight's input columns,
    so a tensor without measured ones (an embedding, a norm, a bias) takes magnitude."""
    m = str(getattr(method, "value", method))
    return "magnitude" if m == "wanda" and (col_norm is None or d.dim() != 2) else m


def prune_tensor(
    method: Method | str,
    d: torch.Tensor,
    p: float,
    *,
    name: str,
    seed: int = 0,
    q: float | None = None,
    col_norm: torch.Tensor | None = None,
    **kw: Any,
) -> SparseDelta:
    """Dispatch to one method. ``kw`` passes ``per`` (wanda) or ``axis`` (structural);
    the method that does not read one ignores it, any other keyword is refused."""
    if unknown := sorted(set(kw) - {"per", "axis"}):
        raise PruningError(
            f"tensor {name!r}: unknown option(s) {', '.join(unknown)} (prune_tensor takes "
            "per for wanda and axis for structural)"
        )
    try:
        m = Method(method)
    except ValueError as e:
        known = ", ".join(x.value for x in Method)
        raise PruningError(f"tensor {name!r}: unknown method {method!r} (known: {known})") from e
    if m is Method.dare:
        if q is not None:
            raise PruningError(f"tensor {name!r}: dare takes no q (use darex_q)")
        return dare(d, p, seed=seed, name=name)
    if m is Method.darex_q:
        if q is None:
            raise PruningError(f"tensor {name!r}: darex_q needs q")
        return darex_q(d, p, q, seed=seed, name=name)
    if m is Method.magnitude:
        return magnitude(d, p, q, name=name)
    if m is Method.wanda:
        if col_norm is None:
            raise PruningError(f"tensor {name!r}: wanda needs col_norm (calibration inputs)")
        return wanda(d, p, col_norm, per=kw.get("per", "row"), q=q, name=name)
    return structural(d, p, axis=kw.get("axis", "row"), q=q, seed=seed, name=name)
