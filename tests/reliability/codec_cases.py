"""Hostile delta blobs for ``storage.codec.decode``: zip bombs, lying headers, broken sections.

Decoded as the store decodes them (``shape=`` the manifest entry's). Run as a program
(``python -m tests.reliability.codec_cases``) it decodes every case under an address-space
limit of the current size + ``--headroom-mb`` and prints one JSON line per case (``error``
type, ``message``, ``seconds``, peak RSS growth in MiB): a decoder that trusts a header's
size claims runs out of that headroom instead of taking the machine with it.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
import time
from collections.abc import Callable

import torch
import zstandard

from pruning.sparse import SparseDelta
from storage import codec

EXPECT = (8, 8)  # the shape the manifest entry of every case's tensor says
BOMB_BYTES = 1 << 30  # what a bomb decompresses to: 1 GiB of zeros from a few KiB


def _blob(header: dict, sections: list[bytes], *, version: int = codec.VERSION) -> bytes:
    h = {**header, "sections": [len(s) for s in sections]}
    hb = json.dumps(h).encode()
    return b"".join([codec._PREFIX.pack(codec.MAGIC, version, len(hb)), hb, *sections])


def _good() -> tuple[dict, list[bytes]]:
    sd = SparseDelta((8, 8), torch.tensor([1, 5, 9, 40]), torch.ones(4), p=0.5)
    blob = codec.encode_sparse(sd, "w", encoding="explicit", value_dtype="float16")
    h, start = codec.read_header(blob)
    sizes = h.pop("sections")
    secs, pos = [], start
    for s in sizes:
        secs.append(blob[pos : pos + s])
        pos += s
    return h, secs


def _bomb(with_size: bool) -> bytes:
    """A zstd frame of ``BOMB_BYTES`` zeros, streamed so it never sits in memory here."""
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=with_size)
    chunk = bytes(1 << 24)
    obj = cctx.compressobj(size=BOMB_BYTES if with_size else -1)
    parts = [obj.compress(chunk) for _ in range(BOMB_BYTES // len(chunk))]
    return b"".join([*parts, obj.flush()])


def cases() -> dict[str, Callable[[], bytes]]:
    """name -> builder of the blob bytes (built lazily, one at a time)."""
    h, secs = _good()
    idx, val = secs
    zvals = {"codec": "zstd-planes", "size": 8}
    dense_huge = {
        "encoding": "dense",
        "shape": [1 << 20, 1 << 20],
        "numel": 1 << 40,
        "nnz": 1 << 40,
        "value_dtype": "float16",
        "name": "w",
        "value_sections": {"values": {"codec": "zstd-planes", "size": 2 << 40}},
    }
    return {
        "zstd-bomb-content-size": lambda: _blob(
            {**h, "value_sections": {"values": zvals}}, [idx, _bomb(True)]
        ),
        "zstd-bomb-streamed": lambda: _blob(
            {**h, "value_sections": {"values": zvals}}, [idx, _bomb(False)]
        ),
        "header-claims-2^40-dense": lambda: _blob(dense_huge, [_bomb(True)[:64]]),
        "header-claims-2^40-nnz": lambda: _blob(
            {**h, "numel": 1 << 40, "shape": [1 << 20, 1 << 20], "nnz": 1 << 39}, [idx, val]
        ),
        "seed-mask-2^40-numel": lambda: _blob(
            {
                **{k: v for k, v in h.items() if k != "indices"},
                "encoding": "seed",
                "seed": 1,
                "p": 0.5,
                "shape": [1 << 20, 1 << 20],
                "numel": 1 << 40,
                "nnz": 4,
            },
            [val],
        ),
        "wrong-magic": lambda: b"PK\x03\x04" + _blob(h, [idx, val])[4:],
        "future-version": lambda: _blob(h, [idx, val], version=99),
        "shorter-than-prefix": lambda: b"DRX",
        "header-len-past-end": lambda: codec._PREFIX.pack(codec.MAGIC, codec.VERSION, 1 << 30),
        "header-not-json": lambda: codec._PREFIX.pack(codec.MAGIC, codec.VERSION, 4) + b"\xff{[(",
        "header-is-a-list": lambda: codec._PREFIX.pack(codec.MAGIC, codec.VERSION, 2) + b"[]",
        "header-missing-keys": lambda: _blob({"encoding": "explicit"}, [idx, val]),
        "shape-is-a-string": lambda: _blob({**h, "shape": "8x8"}, [idx, val]),
        "nnz-negative": lambda: _blob({**h, "nnz": -1}, [idx, val]),
        "nnz-over-numel": lambda: _blob({**h, "nnz": 65}, [idx, val]),
        "sections-do-not-add-up": lambda: _blob(h, [idx, val])[:-3],
        "unknown-encoding": lambda: _blob({**h, "encoding": "lz77"}, [idx, val]),
        "unknown-value-dtype": lambda: _blob({**h, "value_dtype": "float8"}, [idx, val]),
        "unknown-section-codec": lambda: _blob(
            {**h, "indices": {**h["indices"], "codec": "brotli"}}, [idx, val]
        ),
        "indices-not-increasing": lambda: _blob(
            h,
            [codec._pack(struct.unpack("4B", bytes([1, 4, 0, 31])) and _zero_gap(), False)[0], val],
        ),
        "indices-past-numel": lambda: _blob(h, [codec._pack(_far_gap(), False)[0], val]),
        "zstd-garbage": lambda: _blob(h, [b"\x28\xb5\x2f\xfd" + b"\x00" * 20, val]),
    }


def _zero_gap():
    import numpy as np

    return np.array([1, 4, 0, 31], dtype=np.uint8)  # a repeated index


def _far_gap():
    import numpy as np

    return np.array([1, 4, 4, 200], dtype=np.uint8)  # last index 209 >= numel 64


def run(names: list[str], headroom_mb: int) -> list[dict]:
    out = []
    for name in names:
        blob = cases()[name]()
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (headroom_mb << 20), hard))
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        try:
            codec.decode(blob, shape=EXPECT)  # as DeltaStore.load_delta: the manifest's shape
            err, msg = None, "decoded"
        except BaseException as e:  # the caller judges the type
            err, msg = type(e).__name__, str(e)[:300]
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        dt = time.perf_counter() - t0
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        out.append(
            {"case": name, "error": err, "message": msg, "seconds": dt, "peak_growth_mib": grew}
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--headroom-mb", type=int, default=512)
    args = ap.parse_args()
    for row in run(args.names or list(cases()), args.headroom_mb):
        sys.stdout.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
