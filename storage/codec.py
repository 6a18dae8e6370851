"""Bytes <-> one tensor's sparse delta.

Blob layout (little endian)::

    b"DRXD" | u8 version | u32 header length | header (JSON, utf-8) | sections

The header names the encoding and the byte length of every section, so a
decoder never trusts a compressed stream to say how large it is:

- ``seed``: no indices. The kept set is ``kept_indices(seed, name, p, numel)``,
  the counter-based DARE mask of ``pruning.sparse``; ``nnz`` in the header is
  checked against what the mask regenerates.
- ``explicit``: sorted flat indices as gaps ``g_0 = i_0, g_k = i_k - i_{k-1}``
  in the narrowest unsigned width, byte-planes split (all low bytes, then the
  next, ...) and zstd-compressed.
- ``dense``: every element, exact, in ``value_dtype``.

Values are fp16 / bf16 / fp32 (byte-planes split, zstd if it helps) or int8
with one scale per row: ``v = int8 * scale[row]``, ``scale = max|v_row| / 127``.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import zstandard

from pruning.sparse import SparseDelta
from storage.errors import CorruptBlob, UnsupportedFormat
from storage.seedmask import seed_indices

log = logging.getLogger(__name__)

MAGIC = b"DRXD"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
MAX_HEADER = 1 << 20
ZSTD_LEVEL = 3  # values: higher levels gain <1% on fp16 noise and cost 30x the time
ZSTD_LEVEL_INDICES = 19  # gaps: 2% smaller than level 3, and index sections are small

Encoding = Literal["seed", "explicit", "dense"]
ENCODINGS: tuple[str, ...] = ("seed", "explicit", "dense")
VALUE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int8": torch.int8,
}
_GAP_DTYPES = ("uint8", "uint16", "uint32", "uint64")


@dataclass(frozen=True)
class DecodedDelta:
    """One tensor's delta ready for a scatter-add: ``flat[indices] += values``."""

    indices: torch.Tensor  # (nnz,) int64, sorted ascending, unique
    values: torch.Tensor  # (nnz,) floating
    shape: tuple[int, ...]

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def nbytes(self) -> int:
        return self.indices.numel() * 8 + self.values.numel() * self.values.element_size()

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = torch.zeros(
            math.prod(self.shape), dtype=dtype or self.values.dtype, device=self.values.device
        )
        out[self.indices] = self.values.to(out.dtype)
        return out.view(self.shape)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- byte helpers


def _zstd(raw: bytes, level: int = ZSTD_LEVEL) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(raw)


def _unzstd(data: bytes, size: int) -> bytes:
    # Read at most size + 1 bytes: a frame that declares (or streams) more is a zip bomb, and
    # ``decompress(max_output_size=...)`` would still inflate a frame that declares its size.
    try:
        out = bytearray()
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while len(out) <= size and (part := reader.read(size + 1 - len(out))):
                out += part
    except zstandard.ZstdError as e:
        raise CorruptBlob(f"zstd section does not decompress: {e}") from e
    if len(out) != size:
        raise CorruptBlob(
            f"zstd section holds {'more than ' if len(out) > size else ''}"
            f"{len(out)} bytes, header says {size}"
        )
    return bytes(out)


def _split_planes(arr: np.ndarray) -> bytes:
    """(n,) items of width w -> w byte-planes: all byte 0s, then all byte 1s, ..."""
    w = arr.dtype.itemsize
    return np.ascontiguousarray(arr.view(np.uint8).reshape(-1, w).T).tobytes()


def _join_planes(raw: bytes, dtype: np.dtype, n: int) -> np.ndarray:
    w = dtype.itemsize
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(w, n)
    out = np.ascontiguousarray(planes.T)  # a copy unless w == 1
    return (out if out.flags.writeable else out.copy()).view(dtype).reshape(n)


def _pack(
    arr: np.ndarray, allow_raw: bool = True, level: int = ZSTD_LEVEL
) -> tuple[bytes, dict[str, Any]]:
    """Byte-plane split then zstd; keep the raw bytes when compression does not help."""
    planes = _split_planes(arr)
    packed = _zstd(planes, level)
    if allow_raw and len(packed) >= arr.nbytes:
        return arr.tobytes(), {"codec": "raw", "size": arr.nbytes}
    return packed, {"codec": "zstd-planes", "size": len(planes)}


def _unpack(data: bytes, meta: dict[str, Any], dtype: np.dtype, n: int) -> np.ndarray:
    want = n * dtype.itemsize
    if meta.get("size") != want:
        raise CorruptBlob(f"section size {meta.get('size')} != {n} x {dtype.itemsize} bytes")
    if meta["codec"] == "raw":
        if len(data) != want:
            raise CorruptBlob(f"raw section holds {len(data)} bytes, expected {want}")
        return np.frombuffer(data, dtype=dtype).copy()
    if meta["codec"] == "zstd-planes":
        return _join_planes(_unzstd(data, want), dtype, n)
    raise UnsupportedFormat(f"unknown section codec {meta['codec']!r}")


def _gap_dtype(max_gap: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_gap <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


# ---------------------------------------------------------------- values


def _row_len(shape: tuple[int, ...]) -> int:
    numel = math.prod(shape)
    return numel // shape[0] if len(shape) >= 2 and shape[0] > 0 else max(numel, 1)


def _fits(values: torch.Tensor, value_dtype: str, name: str) -> str:
    """``value_dtype``, or float32 where float16 cannot hold the values (a rescaled delta
    past 65504, e.g. |d| > 6.55 at p = 0.9999): stored exactly instead of as inf."""
    if value_dtype == "float16" and values.numel():
        top = float(values.detach().abs().max())
        if top > torch.finfo(torch.float16).max:
            log.warning("%s: values up to %.4g overflow float16: stored as float32", name, top)
            return "float32"
    return value_dtype


def _encode_values(
    values: torch.Tensor, indices: torch.Tensor | None, shape: tuple[int, ...], value_dtype: str
) -> tuple[list[bytes], dict[str, Any]]:
    v = values.detach().to("cpu").flatten()
    if value_dtype == "int8":
        rows = shape[0] if len(shape) >= 2 else 1
        pos = indices.cpu() if indices is not None else torch.arange(v.numel())
        row = pos // _row_len(shape) if rows > 1 else torch.zeros(v.numel(), dtype=torch.int64)
        amax = torch.zeros(rows, dtype=torch.float32)
        amax.scatter_reduce_(0, row, v.float().abs(), reduce="amax")
        scale = amax / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(v.float() / safe[row]).clamp_(-127, 127).to(torch.int8)
        qb, qm = _pack(q.numpy())
        sb, sm = _pack(scale.numpy())
        return [qb, sb], {"values": qm, "scales": sm, "rows": rows}
    dt = VALUE_DTYPES[value_dtype]
    arr = v.to(dt).view(torch.int16 if dt != torch.float32 else torch.int32).numpy()
    vb, vm = _pack(arr)
    return [vb], {"values": vm}


def _decode_values(
    sections: list[bytes], meta: dict[str, Any], indices: torch.Tensor, n: int, h: dict[str, Any]
) -> torch.Tensor:
    vd = h["value_dtype"]
    if vd == "int8":
        rows = int(meta["rows"])
        shape = tuple(h["shape"])
        if rows != (shape[0] if len(shape) >= 2 else 1):
            raise CorruptBlob(f"int8 scale rows {rows} do not match shape {shape}")
        q = torch.from_numpy(_unpack(sections[0], meta["values"], np.dtype(np.int8), n))
        scale = torch.from_numpy(_unpack(sections[1], meta["scales"], np.dtype(np.float32), rows))
        row = indices.cpu() // _row_len(shape) if rows > 1 else torch.zeros(n, dtype=torch.int64)
        return q.float() * scale[row]
    dt = VALUE_DTYPES[vd]
    raw_dt = np.dtype(np.int32 if dt == torch.float32 else np.int16)
    arr = _unpack(sections[0], meta["values"], raw_dt, n)
    return torch.from_numpy(arr).view(dt)


# ---------------------------------------------------------------- encode


def _assemble(header: dict[str, Any], sections: list[bytes]) -> bytes:
    header["sections"] = [len(s) for s in sections]
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(hb)), hb, *sections])


def encode_sparse(
    sd: SparseDelta, name: str, *, encoding: Encoding = "explicit", value_dtype: str = "float16"
) -> bytes:
    """Encode a pruned delta; ``encoding="seed"`` needs ``sd.mask_seed`` (indices = the mask)."""
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}")
    value_dtype = _fits(sd.values, value_dtype, name)
    shape = tuple(int(s) for s in sd.shape)
    header: dict[str, Any] = {
        "encoding": encoding,
        "shape": list(shape),
        "numel": math.prod(shape),
        "nnz": sd.nnz,
        "value_dtype": value_dtype,
        "name": name,
    }
    idx = sd.indices.detach().to("cpu", torch.int64)
    sections: list[bytes] = []
    if encoding == "seed":
        if sd.mask_seed is None:
            raise ValueError(f"{name}: seed encoding needs a delta drawn by the seed mask")
        if sd.mask_name is not None and sd.mask_name != name:
            raise ValueError(
                f"{name}: this delta's mask was drawn for tensor {sd.mask_name!r}, and its seed "
                "redraws it only under that name (store it under it, or encode it explicit)"
            )
        header.update(seed=int(sd.mask_seed), p=float(sd.p))
    elif encoding == "explicit":
        gaps = torch.diff(idx, prepend=torch.zeros(1, dtype=torch.int64)).numpy()
        gdt = _gap_dtype(int(gaps.max()) if gaps.size else 0)
        ib, im = _pack(gaps.astype(gdt), allow_raw=False, level=ZSTD_LEVEL_INDICES)
        sections.append(ib)
        header["indices"] = {**im, "dtype": gdt.name}
    elif encoding == "dense":
        return encode_dense(sd.to_dense(torch.float32), name, value_dtype=value_dtype)
    else:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    vsec, vmeta = _encode_values(sd.values, idx, shape, value_dtype)
    header["value_sections"] = vmeta
    return _assemble(header, sections + vsec)


def encode_dense(t: torch.Tensor, name: str, *, value_dtype: str | None = None) -> bytes:
    """Every element of ``t`` (default: its own dtype, exact)."""
    vd = value_dtype or dtype_name(t.dtype)
    if vd not in VALUE_DTYPES or not t.is_floating_point():
        raise ValueError(f"{name}: cannot store {t.dtype} as {vd} (floating tensors only)")
    vd = _fits(t, vd, name)
    shape = tuple(int(s) for s in t.shape)
    header: dict[str, Any] = {
        "encoding": "dense",
        "shape": list(shape),
        "numel": t.numel(),
        "nnz": t.numel(),
        "value_dtype": vd,
        "name": name,
    }
    vsec, vmeta = _encode_values(t.flatten(), None, shape, vd)
    header["value_sections"] = vmeta
    return _assemble(header, vsec)


def encode_exact(d: torch.Tensor, name: str, *, value_dtype: str) -> bytes | None:
    """An unpruned delta: nonzero entries (explicit) or dense, whichever is smaller; None if 0."""
    flat = d.detach().flatten()
    nz = torch.nonzero(flat, as_tuple=False).flatten()
    if nz.numel() == 0:
        return None
    dense = encode_dense(flat.view(d.shape), name, value_dtype=value_dtype)
    if nz.numel() * 2 > flat.numel():
        return dense
    sd = SparseDelta(tuple(d.shape), nz, flat[nz], p=0.0)
    sparse = encode_sparse(sd, name, encoding="explicit", value_dtype=value_dtype)
    return sparse if len(sparse) < len(dense) else dense


# ---------------------------------------------------------------- decode


def read_header(blob: bytes) -> tuple[dict[str, Any], int]:
    """The parsed header and the offset where sections start; refuses unknown versions."""
    if len(blob) < _PREFIX.size:
        raise CorruptBlob(
            f"blob of {len(blob)} bytes is shorter than the {_PREFIX.size}-byte prefix"
        )
    magic, version, hlen = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise UnsupportedFormat(f"not a delta blob: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise UnsupportedFormat(
            f"delta blob format version {version} is not supported (this build reads {VERSION})"
        )
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(blob):
        raise CorruptBlob(f"header length {hlen} exceeds the blob ({len(blob)} bytes)")
    try:
        header = json.loads(blob[_PREFIX.size : _PREFIX.size + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptBlob(f"blob header is not JSON: {e}") from e
    return header, _PREFIX.size + hlen


def _sections(blob: bytes, header: dict[str, Any], start: int) -> list[bytes]:
    sizes = header.get("sections", [])
    if sum(sizes) != len(blob) - start or any(s < 0 for s in sizes):
        raise CorruptBlob(f"sections {sizes} do not add up to {len(blob) - start} bytes")
    out, pos = [], start
    for s in sizes:
        out.append(blob[pos : pos + s])
        pos += s
    return out


def decode(
    blob: bytes, device: torch.device | str = "cpu", *, shape: tuple[int, ...] | None = None
) -> DecodedDelta:
    """Blob -> flat sorted int64 indices and values on ``device`` (dense: every index).

    ``shape`` (what the manifest expects) is checked before anything is allocated, so a
    header that claims a huge tensor costs nothing; a malformed header is ``CorruptBlob``.
    """
    h, start = read_header(blob)
    try:
        return _decode(blob, h, start, device, shape)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        if isinstance(e, (CorruptBlob, UnsupportedFormat)):
            raise
        raise CorruptBlob(f"malformed delta blob header ({type(e).__name__}: {e})") from e


def _decode(
    blob: bytes,
    h: dict[str, Any],
    start: int,
    device: torch.device | str,
    expect: tuple[int, ...] | None,
) -> DecodedDelta:
    if not isinstance(h, dict):
        raise CorruptBlob(f"blob header is a JSON {type(h).__name__}, not an object")
    if expect is not None and tuple(h["shape"]) != tuple(expect):
        raise CorruptBlob(f"{h.get('name')}: blob holds shape {h['shape']}, expected {expect}")
    secs = _sections(blob, h, start)
    enc, shape, numel, nnz = h.get("encoding"), tuple(h["shape"]), int(h["numel"]), int(h["nnz"])
    if numel != math.prod(shape) or not 0 <= nnz <= numel:
        raise CorruptBlob(f"{h.get('name')}: header numel {numel} / nnz {nnz} vs shape {shape}")
    if h.get("value_dtype") not in VALUE_DTYPES:
        raise UnsupportedFormat(f"unknown value dtype {h.get('value_dtype')!r}")
    if enc == "seed":
        indices = seed_indices(int(h["seed"]), h["name"], float(h["p"]), numel, device)
        if indices.numel() != nnz:
            raise CorruptBlob(
                f"{h['name']}: seed mask regenerates {indices.numel()} indices, header says {nnz}"
            )
        vsecs = secs
    elif enc == "explicit":
        im = h["indices"]
        if im.get("dtype") not in _GAP_DTYPES:
            raise UnsupportedFormat(f"unknown index dtype {im.get('dtype')!r}")
        gaps = _unpack(secs[0], im, np.dtype(im["dtype"]), nnz)
        # every gap of a valid blob is below numel; a larger uint64 one would wrap the sum
        if nnz and int(gaps.max()) >= numel:
            raise CorruptBlob(f"{h['name']}: an index gap of {int(gaps.max())} is past {numel}")
        indices = torch.from_numpy(np.cumsum(gaps, dtype=np.int64))
        if nnz and (
            int(indices[-1]) >= numel
            or bool((torch.from_numpy(gaps[1:]) == 0).any())
            or bool((indices[1:] <= indices[:-1]).any())  # a sum past 2^63 wrapped
        ):
            raise CorruptBlob(f"{h['name']}: indices not strictly increasing within {numel}")
        vsecs = secs[1:]
    elif enc == "dense":
        if nnz != numel:
            raise CorruptBlob(f"{h['name']}: dense blob with nnz {nnz} != numel {numel}")
        indices = torch.arange(numel, dtype=torch.int64)
        vsecs = secs
    else:
        raise UnsupportedFormat(f"unknown encoding {enc!r}")
    values = _decode_values(vsecs, h["value_sections"], indices, nnz, h)
    return DecodedDelta(indices.to(device), values.to(device), shape)


def decode_dense(
    blob: bytes, device: torch.device | str = "cpu", *, shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """A blob as a dense tensor of its shape (extras such as a new classification head)."""
    dd = decode(blob, "cpu", shape=shape)
    h, _ = read_header(blob)
    if h["encoding"] == "dense":
        return dd.values.reshape(dd.shape).to(device)
    return dd.to_dense().to(device)
