"""CPU fast path of the seed mask: the same bits as ``pruning.sparse.kept_indices``.

The torch reference hashes with int64 tensor ops (one temporary per step), about
5 s for the 22.7M entries of MiniLM on one core; this numba kernel runs the same
murmur3 finaliser in registers, in parallel, and writes only the kept indices.
``tests/storage/test_codec.py`` checks it bit for bit against the reference.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from pruning.sparse import keep_threshold, kept_indices, mask_key

_M32 = np.uint64(0xFFFFFFFF)
_C1 = np.uint64(0x85EBCA6B)
_C2 = np.uint64(0xC2B2AE35)
_BLOCK = 1 << 16


@numba.njit(inline="always")
def _fmix32(h):  # h: uint64 holding a 32-bit value
    h ^= h >> np.uint64(16)
    h = (h * _C1) & _M32
    h ^= h >> np.uint64(13)
    h = (h * _C2) & _M32
    h ^= h >> np.uint64(16)
    return h


@numba.njit(inline="always")
def _keep(i, k0, k1, thr):
    u = np.uint64(i)
    h = _fmix32((u & _M32) ^ k0)
    h = _fmix32(h ^ (u >> np.uint64(32)) ^ k1)
    return h < thr


@numba.njit(parallel=True, cache=True)
def _count_blocks(numel, k0, k1, thr, nblocks):
    counts = np.zeros(nblocks, dtype=np.int64)
    for b in numba.prange(nblocks):
        c = 0
        for i in range(b * _BLOCK, min((b + 1) * _BLOCK, numel)):
            if _keep(i, k0, k1, thr):
                c += 1
        counts[b] = c
    return counts


@numba.njit(parallel=True, cache=True)
def _fill_blocks(numel, k0, k1, thr, starts, out):
    for b in numba.prange(starts.size - 1):
        pos = starts[b]
        for i in range(b * _BLOCK, min((b + 1) * _BLOCK, numel)):
            if _keep(i, k0, k1, thr):
                out[pos] = i
                pos += 1


def kept_indices_cpu(seed: int, name: str, p: float, numel: int) -> torch.Tensor:
    """Sorted int64 indices the DARE mask keeps, computed on the CPU by a numba kernel."""
    k0, k1 = (np.uint64(k) for k in mask_key(seed, name))
    thr = np.uint64(keep_threshold(p))
    nblocks = (numel + _BLOCK - 1) // _BLOCK
    counts = _count_blocks(numel, k0, k1, thr, nblocks)
    starts = np.zeros(nblocks + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    out = np.empty(int(starts[-1]), dtype=np.int64)
    _fill_blocks(numel, k0, k1, thr, starts, out)
    return torch.from_numpy(out)


def seed_indices(
    seed: int, name: str, p: float, numel: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The mask's kept indices on ``device``: numba on CPU, the torch reference elsewhere."""
    if torch.device(device).type == "cpu":
        return kept_indices_cpu(seed, name, p, numel)
    return kept_indices(seed, name, p, numel, device)
