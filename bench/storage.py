"""Storage benchmark: bytes stored per fine-tune / bytes of its fp16 checkpoint, ingest time,
and load time of one stored delta vs reading the full fine-tuned safetensors file.

Fine-tune: ``--finetune PATH`` (e.g. one made by ``darex finetune``), else a synthetic
one: every tensor of the base plus Gaussian noise of 1% of that tensor's std
(a dense delta on every entry, the hard case for a sparse store).

    python bench/storage.py            # p = 0.9 and 0.99, every encoding
    python bench/storage.py --quick    # p = 0.99, seed and explicit only
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.bases import resolve_base
from storage.ingest import ingest
from storage.store import DeltaStore

# (label, method, encoding, value dtype)
VARIANTS = [
    ("seed mask, fp16", "dare", "seed", "float16"),
    ("seed mask, int8/row", "dare", "seed", "int8"),
    ("explicit, fp16", "dare", "explicit", "float16"),
    ("explicit, int8/row", "dare", "explicit", "int8"),
    ("explicit (magnitude), fp16", "magnitude", "explicit", "float16"),
    ("dense, fp16", "dare", "dense", "float16"),
]
QUICK = {"seed mask, fp16", "explicit, fp16"}


def synth_finetune(base_dir: Path, out: Path, rel: float = 0.01, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        for name, t in load_file(f).items():
            if t.is_floating_point():
                t = t + torch.randn(t.shape, generator=g) * rel * float(t.float().std())
            sd[name] = t.contiguous()
    save_file(sd, out / "model.safetensors")
    shutil.copy(base_dir / "config.json", out / "config.json")
    return out


def best_of(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="minilm-l6")
    ap.add_argument("--finetune", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="darex-bench-storage-"))
    try:
        base = resolve_base(args.base, work / "data")
        ft = args.finetune or synth_finetune(base.path, work / "ft")
        ft_files = sorted(Path(ft).glob("*.safetensors")) if Path(ft).is_dir() else [Path(ft)]
        rates = [0.99] if args.quick else [0.9, 0.99]
        variants = [v for v in VARIANTS if not args.quick or v[0] in QUICK]

        def read_full() -> None:
            for f in ft_files:
                for t in load_file(f, device=args.device).values():
                    t.sum()  # touch the bytes

        full_s = best_of(read_full, args.repeats)
        print(f"base {base.name} ({base.path}); fine-tune {ft}; device {args.device}")
        print(f"read full fine-tuned safetensors: {full_s * 1e3:.1f} ms (best of {args.repeats})")
        hdr = (
            f"| {'p':>4} | {'encoding':<27} | {'stored':>9} | {'fp16 ckpt':>9} | "
            f"{'stored/fp16':>11} | {'ingest s':>8} | {'load ms':>7} | {'load/full':>9} |"
        )
        print(hdr)
        print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
        for p in rates:
            for label, method, enc, vd in variants:
                store = DeltaStore(work / f"store-{p}-{label.replace(' ', '_').replace('/', '_')}")
                res = ingest(
                    store,
                    "ft",
                    ft,
                    base,
                    method=method,
                    p=p,
                    encoding=enc,
                    value_dtype=vd,
                    show_progress=False,
                )
                m = res.manifest

                def load(m=m, store=store) -> None:
                    for e in m.deltas.values():
                        store.load_delta(e, args.device)
                    for e in m.extras.values():
                        store.load_dense(e, args.device)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()

                load_s = best_of(load, args.repeats)
                stored = m.stored_bytes()
                print(
                    f"| {p:>4} | {label:<27} | {stored / 1e6:>7.3f}MB | "
                    f"{m.fp16_bytes / 1e6:>7.2f}MB | 1/{1 / m.ratio:>9.1f} | "
                    f"{res.seconds:>8.2f} | {load_s * 1e3:>7.1f} | {load_s / full_s:>9.2f} |",
                    flush=True,
                )
                store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
