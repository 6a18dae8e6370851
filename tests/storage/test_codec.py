"""Codec: round-trip for every encoding and value dtype, seed masks, malformed blobs refused."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pruning.sparse import SparseDelta, kept_indices
from storage import codec
from storage.codec import decode, decode_dense, encode_dense, encode_exact, encode_sparse
from storage.errors import CorruptBlob, UnsupportedFormat

FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

shapes = st.one_of(
    st.tuples(st.integers(1, 300)),
    st.tuples(st.integers(1, 40), st.integers(1, 70)),
    st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 7)),
)


def seeded_delta(shape: tuple[int, ...], p: float, seed: int, name: str) -> SparseDelta:
    numel = math.prod(shape)
    idx = kept_indices(seed, name, p, numel)
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(idx.numel(), generator=g) * 1e-2 / (1 - p)
    return SparseDelta(shape, idx, vals, p=p, scale=1 / (1 - p), mask_seed=seed)


def random_delta(shape: tuple[int, ...], frac: float, seed: int) -> SparseDelta:
    numel = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(numel, generator=g) < frac
    idx = torch.nonzero(keep).flatten()
    vals = torch.randn(idx.numel(), generator=g) * 3.0
    return SparseDelta(shape, idx, vals, p=1 - frac)


def check_values(got: torch.Tensor, want: torch.Tensor, idx: torch.Tensor, shape, vd: str) -> None:
    if vd in FLOATS:
        # Stored values are exactly the input rounded to the value dtype.
        assert got.dtype == FLOATS[vd]
        assert torch.equal(got, want.to(FLOATS[vd]))
        return
    # int8: error at most half a quantisation step of the entry's row.
    rows = shape[0] if len(shape) >= 2 else 1
    row = idx // (math.prod(shape) // rows) if rows > 1 else torch.zeros_like(idx)
    amax = torch.zeros(rows).scatter_reduce(0, row, want.float().abs(), reduce="amax")
    step = (amax / 127.0)[row]
    assert bool(((got.float() - want.float()).abs() <= step / 2 + 1e-6 * step + 1e-12).all())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    frac=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**31),
    vd=st.sampled_from(sorted(codec.VALUE_DTYPES)),
    enc=st.sampled_from(["explicit", "dense"]),
)
def test_roundtrip_explicit_and_dense(shape, frac, seed, vd, enc) -> None:
    sd = random_delta(shape, frac, seed)
    dd = decode(encode_sparse(sd, "w", encoding=enc, value_dtype=vd))
    assert dd.shape == shape
    if enc == "explicit":
        assert torch.equal(dd.indices, sd.indices)
        check_values(dd.values, sd.values, sd.indices, shape, vd)
    else:  # dense: every index, zeros where nothing was kept
        assert torch.equal(dd.indices, torch.arange(math.prod(shape)))
        dense = sd.to_dense(torch.float32).flatten()
        check_values(dd.values, dense, dd.indices, shape, vd)


@settings(max_examples=30, deadline=None)
@given(
    shape=shapes,
    p=st.sampled_from([0.0, 0.3, 0.9, 0.99]),
    seed=st.integers(0, 2**40),
    vd=st.sampled_from(sorted(codec.VALUE_DTYPES)),
    name=st.text("abcdefghij._0123456789", min_size=1, max_size=40),
)
def test_roundtrip_seed_mask_stores_no_indices(shape, p, seed, vd, name) -> None:
    sd = seeded_delta(shape, p, seed % 2**31, name)
    blob = encode_sparse(sd, name, encoding="seed", value_dtype=vd)
    header, _ = codec.read_header(blob)
    assert "indices" not in header and len(header["sections"]) == (2 if vd == "int8" else 1)
    dd = decode(blob)
    # The regenerated indices are exactly the mask pruning/ drew.
    assert torch.equal(dd.indices, kept_indices(seed % 2**31, name, p, math.prod(shape)))
    check_values(dd.values, sd.values, sd.indices, shape, vd)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**40),
    name=st.text(min_size=0, max_size=30),
    p=st.floats(0.0, 0.999),
    numel=st.integers(0, 300_000),
)
def test_numba_seed_mask_is_bit_identical_to_the_torch_reference(seed, name, p, numel) -> None:
    from storage.seedmask import kept_indices_cpu

    assert torch.equal(kept_indices_cpu(seed, name, p, numel), kept_indices(seed, name, p, numel))


def test_seed_mask_matches_what_pruning_drew() -> None:
    methods = pytest.importorskip("pruning.methods")
    g = torch.Generator().manual_seed(0)
    d = torch.randn(96, 64, generator=g) * 1e-3
    for method, kw in (("dare", {}), ("darex_q", {"q": 0.05})):
        sd = methods.prune_tensor(method, d, 0.95, name="layer.0.w", seed=7, **kw)
        assert sd.mask_seed == 7
        dd = decode(encode_sparse(sd, "layer.0.w", encoding="seed", value_dtype="float32"))
        assert torch.equal(dd.indices, sd.indices)
        assert torch.equal(dd.values, sd.values.float())
    # stored under another name, the seed would redraw another mask, silently
    with pytest.raises(ValueError, match=r"drawn for tensor 'layer\.0\.w'"):
        encode_sparse(sd, "layer.1.w", encoding="seed")
    assert decode(encode_sparse(sd, "layer.1.w", encoding="explicit")).nnz == sd.nnz


def test_values_past_float16_are_stored_as_float32_not_inf() -> None:
    """DARE at p = 0.9999 scales by 1e4: |d| = 7 becomes 70,000, past fp16's 65,504."""
    from pruning.methods import dare, magnitude

    d = torch.full((64, 64), 7.0)
    d[0, 0] = 1e-3
    sd = dare(d, 0.9999, seed=3, name="w")
    assert sd.nnz > 0 and float(sd.values.abs().max()) > 65504
    for enc in ("seed", "explicit"):
        out = decode(encode_sparse(sd, "w", encoding=enc, value_dtype="float16"))
        assert torch.isfinite(out.values).all() and torch.equal(out.values, sd.values.float())
    h16 = dare(d.half(), 0.9999, seed=3, name="w")  # an fp16 delta: rescaled in fp32, kept so
    assert torch.isfinite(h16.values).all() and torch.equal(h16.values.float(), sd.values)
    small = magnitude(d * 1e-3, 0.9)  # values that fit stay float16
    blob = encode_sparse(small, "w", value_dtype="float16")
    assert decode(blob).values.dtype == torch.float16
    big = torch.full((3, 3), 1e5)
    assert torch.equal(decode_dense(encode_dense(big, "b", value_dtype="float16")), big)


def test_seed_encoding_refuses_a_delta_not_drawn_by_the_mask() -> None:
    with pytest.raises(ValueError, match="seed mask"):
        encode_sparse(random_delta((10, 10), 0.3, 0), "w", encoding="seed")


def test_dense_extras_are_exact_in_their_own_dtype() -> None:
    for dt in FLOATS.values():
        t = (torch.randn(7, 33) * 5).to(dt)
        out = decode_dense(encode_dense(t, "classifier.weight"))
        assert out.dtype == dt and torch.equal(out, t)


def test_exact_delta_picks_the_smaller_encoding_and_skips_zeros() -> None:
    assert encode_exact(torch.zeros(50, 50), "n", value_dtype="float32") is None
    sparse = torch.zeros(100, 100)
    sparse[3, 4], sparse[90, 1] = 0.5, -2.0
    blob = encode_exact(sparse, "n", value_dtype="float32")
    as_sparse = encode_sparse(
        SparseDelta((100, 100), torch.tensor([304, 9001]), torch.tensor([0.5, -2.0]), p=0.0),
        "n",
        value_dtype="float32",
    )
    assert len(blob) == min(len(as_sparse), len(encode_dense(sparse, "n")))
    assert torch.equal(decode(blob).to_dense(), sparse)
    full = torch.randn(64)
    blob = encode_exact(full, "n", value_dtype="float32")
    assert codec.read_header(blob)[0]["encoding"] == "dense"
    assert torch.equal(decode_dense(blob), full)


def _rewrite_header(blob: bytes, **changes) -> bytes:
    import json

    h, start = codec.read_header(blob)
    h.update(changes)
    hb = json.dumps(h).encode()
    return struct.pack("<4sBI", codec.MAGIC, codec.VERSION, len(hb)) + hb + blob[start:]


def test_unknown_version_and_magic_are_refused_clearly() -> None:
    blob = encode_sparse(random_delta((20, 20), 0.1, 1), "w")
    newer = blob[:4] + bytes([codec.VERSION + 1]) + blob[5:]
    with pytest.raises(UnsupportedFormat, match=f"version {codec.VERSION + 1} is not supported"):
        decode(newer)
    with pytest.raises(UnsupportedFormat, match="magic"):
        decode(b"PK\x03\x04" + blob[4:])
    with pytest.raises(UnsupportedFormat, match="encoding"):
        decode(_rewrite_header(blob, encoding="rle"))


def test_zip_bomb_is_bounded_by_the_header() -> None:
    import zstandard

    sd = random_delta((100, 100), 0.01, 2)
    blob = encode_sparse(sd, "w", encoding="explicit", value_dtype="float16")
    h, start = codec.read_header(blob)
    # A values section that inflates to 256 MiB while the header promises nnz * 2 bytes.
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(1 << 28))
    secs = codec._sections(blob, h, start)
    h["sections"] = [len(secs[0]), len(bomb)]
    hb = __import__("json").dumps(h).encode()
    evil = struct.pack("<4sBI", codec.MAGIC, codec.VERSION, len(hb)) + hb + secs[0] + bomb
    with pytest.raises(CorruptBlob):
        decode(evil)
    with pytest.raises(CorruptBlob):  # a header claiming more than numel
        decode(_rewrite_header(blob, nnz=10**12))


def test_index_gaps_that_wrap_the_sum_are_corrupt() -> None:
    """uint64 gaps whose int64 sum wraps (5, then 2^64 - 3: indices 5, 2) or that overshoot
    the tensor are refused, not decoded to indices out of order or negative."""
    import numpy as np

    h = {"encoding": "explicit", "shape": [10], "numel": 10, "nnz": 2, "name": "w"}
    idx = torch.tensor([5, 7])
    vsec, vmeta = codec._encode_values(torch.ones(2), idx, (10,), "float32")
    for gaps in ([5, 2], [5, 2**64 - 3], [2**63 + 1, 1], [3, 20]):
        ib, im = codec._pack(np.array(gaps, dtype=np.uint64), allow_raw=False)
        head = {**h, "value_dtype": "float32", "indices": {**im, "dtype": "uint64"}}
        blob = codec._assemble({**head, "value_sections": vmeta}, [ib, *vsec])
        if gaps == [5, 2]:  # the valid blob the others are made like
            assert decode(blob).indices.tolist() == [5, 7]
            continue
        with pytest.raises(CorruptBlob):
            decode(blob)


def test_truncated_and_garbled_blobs_raise_corrupt() -> None:
    blob = encode_sparse(random_delta((30, 30), 0.2, 3), "w")
    for bad in (blob[:3], blob[:-1], blob[:12]):
        with pytest.raises((CorruptBlob, UnsupportedFormat)):
            decode(bad)


def test_decode_onto_cuda_when_present() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    sd = seeded_delta((128, 64), 0.9, 3, "x")
    dd = decode(encode_sparse(sd, "x", encoding="seed"), "cuda")
    assert dd.indices.is_cuda and torch.equal(dd.indices.cpu(), sd.indices)
