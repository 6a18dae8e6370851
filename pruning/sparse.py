"""The sparse delta every pruning method returns, and the counter-based DARE mask.

The mask is a pure function of ``(seed, tensor name, p, flat index)``: a 32-bit
murmur3 finaliser over the flat index keyed by a digest of ``(seed, name)``.
Only 32-bit integer arithmetic is used (emulated in int64 with masking, and with
multiplications split so no intermediate overflows), so CPU, CUDA and a Triton
kernel produce the same bits. That lets the store keep a random-drop delta with
no indices at all: ``(seed, name, p)`` regenerates them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35
MASK_CHUNK = 1 << 22  # elements hashed per step: bounds the int64 temporaries to ~32 MiB


@dataclass(frozen=True)
class SparseDelta:
    """A pruned delta of one tensor: flat sorted indices and already-rescaled values.

    ``scale`` is the rescale factor that was applied to the kept entries
    (1/(1-p) for DARE, 1/q for DAREx-q, 1.0 for plain magnitude). ``mask_seed``
    is set when ``indices`` are exactly ``kept_indices(mask_seed, name, p, numel)``
    so the codec may store the seed instead of the indices; ``mask_name`` is that
    ``name`` (the seed redraws the mask only under it).
    """

    shape: tuple[int, ...]
    indices: torch.Tensor  # (nnz,) int64, sorted ascending, unique, in [0, numel)
    values: torch.Tensor  # (nnz,) floating, rescaled
    p: float
    scale: float = 1.0
    mask_seed: int | None = None
    mask_name: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=dtype or self.values.dtype, device=self.values.device)
        out[self.indices] = self.values.to(out.dtype)
        return out.view(self.shape)


def mask_key(seed: int, name: str) -> tuple[int, int]:
    """Two 32-bit keys derived from ``(seed, tensor name)``."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[0:4], "little"), int.from_bytes(digest[4:8], "little")


# The highest pruning rate: above it, 1-p is under about 4,300 steps of the 32-bit hash
# threshold, so P(keep) = threshold / 2**32 drifts from 1-p (by 7 % at p = 1 - 1e-9, to 0
# below 1 - 1.2e-10) while the rescale stays 1/(1-p): DARE would no longer be unbiased.
MAX_RATE = 0.999999


def rate_limit_problem(p: float) -> str | None:
    """Why a rate in [0, 1) is still refused (above ``MAX_RATE``), or None."""
    if p > MAX_RATE:
        return (
            f"pruning rate p = {p} is above {MAX_RATE}: fewer than one entry in a million "
            "would be kept, which the 32-bit mask cannot draw without bias"
        )
    return None


def keep_threshold(p: float) -> int:
    """An element is kept iff its hash < threshold; P(keep) = threshold / 2**32 ~= 1 - p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"pruning rate p must be in [0, 1), got {p}")
    # no MAX_RATE check here: decoding a mask stored before the cap redraws it as it was
    return min(round((1.0 - p) * 2**32), 2**32)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 with every intermediate below 2**63: split c into 16-bit halves.
    lo = (h * (c & 0xFFFF)) & _M32
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)


def hash32(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Counter-based 32-bit hash of int64 ``counter`` (in [0, 2**63)), as int64 in [0, 2**32)."""
    lo = counter & _M32
    hi = counter >> 32
    h = _fmix32(lo ^ key[0])
    return _fmix32(h ^ hi ^ key[1])


def keep_mask(
    seed: int, name: str, p: float, numel: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool mask of length ``numel``: True where the DARE mask keeps the element."""
    key = mask_key(seed, name)
    thr = keep_threshold(p)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    for start in range(0, numel, MASK_CHUNK):
        stop = min(start + MASK_CHUNK, numel)
        idx = torch.arange(start, stop, dtype=torch.int64, device=device)
        out[start:stop] = hash32(idx, key) < thr
    return out


def kept_indices(
    seed: int, name: str, p: float, numel: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Sorted int64 flat indices the DARE mask keeps."""
    return torch.nonzero(keep_mask(seed, name, p, numel, device), as_tuple=False).flatten()
