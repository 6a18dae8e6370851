"""The swap kernels alone on one device: GPU time, time per call, and the memory-traffic floor.

For buffers the size of each base (float32) and DARE-shaped index sets A and B at rate p,
times one swap A -> B (restore A, save and apply B) with each implementation:

- ``torch``: the reference ops (``index_copy_``, ``index_select``, ``index_add_``);
- ``triton``: the engine's kernel, one launch; every element binary-searches the other
  (sorted) index set for a shared key.

A first row per implementation gives the fixed cost of one call (a one-element swap).

GPU time is measured by ``triton.testing.do_bench`` (L2 flushed before each run), the
time per call by the wall clock around call + synchronize (launch overhead included).
The floor counts every touched 32-byte sector read and written, plus indices, values
and saved values, at the bandwidth of a large ``copy_`` measured in the same run. Each
implementation's result is checked bit for bit against the reference.

    python bench/swap_kernels.py        # CUDA: both base sizes, p = 0.99 and 0.9
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swap import LINE, floor_bytes, timed  # noqa: E402  (bench/swap.py, beside this file)

from server.kernels import gpu, swap_reference  # noqa: E402

SIZES = {"minilm-l6": 22_713_216, "smollm2-135m": 134_515_008}


def main() -> None:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--p", nargs="+", type=float, default=[0.99, 0.9])
    args = ap.parse_args()
    if not torch.cuda.is_available() or not gpu.HAVE_TRITON:
        sys.exit("bench/swap_kernels.py needs a CUDA device and triton")
    dev = torch.device("cuda")
    big = torch.empty(1 << 28, device=dev)  # 1 GiB
    big_dst = torch.empty_like(big)
    bw = 2 * big.numel() * 4 / (1e-3 * do_bench(lambda: big_dst.copy_(big), return_mode="median"))
    print(f"device: {torch.cuda.get_device_name(dev)}; copy_ bandwidth {bw / 1e12:.2f} TB/s\n")
    impls = {"torch": swap_reference, "triton": gpu.swap_cuda}
    # fixed cost per call: a swap of one element each
    one, i1 = torch.zeros(8, device=dev), torch.tensor([3], device=dev)
    s1, v1, o1 = (torch.zeros(1, device=dev) for _ in range(3))
    for impl, fn in impls.items():
        us = 1e6 * statistics.median(timed(lambda fn=fn: fn(one, i1, s1, i1, v1, o1), 200, dev))
        print(f"{impl}: one-element swap + synchronize, {us:.1f} us per call")
    print()
    print("| base | p | nnz | floor us | impl | GPU us | GPU/floor | per call us | call/floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, numel in SIZES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        buf0 = torch.randn(numel, device=dev, generator=g)
        for p in args.p:
            idx_a = torch.nonzero(torch.rand(numel, device=dev, generator=g) < 1 - p).flatten()
            idx_b = torch.nonzero(torch.rand(numel, device=dev, generator=g) < 1 - p).flatten()
            saved_a = buf0[idx_a].clone()
            val_b = 0.01 * torch.randn(idx_b.numel(), device=dev, generator=g)
            floor = floor_bytes(idx_a, idx_b, 4, LINE["cuda"]) / bw * 1e6
            want_buf = buf0.clone()
            want_saved = torch.empty_like(val_b)
            swap_reference(want_buf, idx_a, saved_a, idx_b, val_b, want_saved)
            for impl, fn in impls.items():
                buf, saved_b = buf0.clone(), torch.empty_like(val_b)
                fn(buf, idx_a, saved_a, idx_b, val_b, saved_b)
                exact = torch.equal(buf.view(torch.int32), want_buf.view(torch.int32)) and (
                    torch.equal(saved_b.view(torch.int32), want_saved.view(torch.int32))
                )
                args_ = (buf, idx_a, saved_a, idx_b, val_b, saved_b)
                gpu_us = 1e3 * do_bench(lambda fn=fn, a=args_: fn(*a), return_mode="median")
                call_us = 1e6 * statistics.median(timed(lambda fn=fn, a=args_: fn(*a), 30, dev))
                flag = "" if exact else " NOT EXACT"
                print(
                    f"| {name} | {p} | {idx_b.numel():,} | {floor:.1f} | {impl}{flag} | "
                    f"{gpu_us:.1f} | {gpu_us / floor:.2f}x | {call_us:.1f} | "
                    f"{call_us / floor:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
