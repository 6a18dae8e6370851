"""Swap benchmark: one fine-tune swap vs the memory-traffic floor and vs a full checkpoint load.

For each base and pruning rate p, two random DARE-shaped fine-tunes A and B are
registered in an in-memory source and decoded into the engine's device cache;
then, all in the same run:

- swap A -> B through ``Engine.activate`` (restore A + save-and-apply B), with
  the engine's kernel and with the torch reference ops;
- the physical floor: every touched 64-byte cache line (32-byte sector on GPU) read and
  written back
  (union over A and B), plus A's indices and saved values read, B's indices and
  values read and B's saved values written, divided by the bandwidth of a large
  ``copy_`` (bytes read + written per second) measured in this run;
- the full-checkpoint baseline: ``from_pretrained`` of the fine-tuned
  safetensors + one forward pass, warm (file in the page cache) and cold (file
  dropped from the page cache by ``posix_fadvise(DONTNEED)``), and loading the
  same file into an already-resident model by ``load_state_dict``;
- resident bytes with 50 fine-tunes decoded vs 50 full models.

    python bench/swap.py            # both bases, p = 0.99 and 0.9; writes docs/results/swap.md
    python bench/swap.py --quick    # minilm-l6, p = 0.99, few repetitions; writes nothing
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoModel, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.deltas import MemorySource, ModelDelta  # noqa: E402
from server.engine import Engine  # noqa: E402
from storage.bases import resolve_base  # noqa: E402

# the granularity memory moves at: 64-byte cache lines on CPU, 32-byte sectors on GPU
LINE = {"cpu": 64, "cuda": 32}
N_FINETUNES = 50


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, reps: int, dev: torch.device) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds of ``fn()`` for each of ``reps`` runs (after one warm-up)."""
    fn()
    out = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def med_best(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs), min(xs)


class Copier:
    """A large ``copy_``: flushes the caches and gives the bandwidth (read + write bytes/s)."""

    def __init__(self, numel: int, dtype: torch.dtype, dev: torch.device) -> None:
        self.src = torch.randn(numel, device=dev).to(dtype)
        self.dst = torch.empty_like(self.src)
        self.dev = dev

    def bandwidth(self) -> float:
        sync(self.dev)
        t0 = time.perf_counter()
        self.dst.copy_(self.src)
        sync(self.dev)
        return 2 * self.src.numel() * self.src.element_size() / (time.perf_counter() - t0)


def time_swaps(
    eng: Engine, cycle: list[str | None], n: int, copier: Copier, floor: int, only_to: str | None
) -> dict[str, float]:
    """Swap seconds and swap/floor along ``cycle``: median (pair by pair) and best-of-n.

    Each swap is paired with a large copy just before it: the copy evicts the
    touched lines from the caches (so the swap pays DRAM traffic, as in serving
    where a forward pass runs between swaps) and measures the bandwidth under
    the same load, so the ratio is taken pair by pair.
    """
    for mid in cycle:
        eng.activate(mid)
    times, ratios, bws = [], [], []
    for i in range(n):
        mid = cycle[i % len(cycle)]
        bw = copier.bandwidth()
        sync(copier.dev)
        t0 = time.perf_counter()
        eng.activate(mid)
        sync(copier.dev)
        t = time.perf_counter() - t0
        if only_to is None or mid == only_to:
            times.append(t)
            ratios.append(t * bw / floor)
            bws.append(bw)
    return {
        "t_med": statistics.median(times),
        "t_best": min(times),
        "ratio_med": statistics.median(ratios),
        "ratio_best": min(times) * max(bws) / floor,  # best swap against the best bandwidth
        "floor_s": floor / max(bws),
        "bw": max(bws),
    }


def random_finetune(eng: Engine, base: dict[str, torch.Tensor], p: float, seed: int) -> ModelDelta:
    """Bernoulli(1-p) mask per tensor (DARE's distribution), values ~ N(0, 0.01) / (1-p)."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, w in base.items():
        if name not in eng.slots or not w.is_floating_point():
            continue
        idx = torch.nonzero(torch.rand(w.numel(), generator=g) < 1 - p).flatten()
        params[name] = (idx, 0.01 / (1 - p) * torch.randn(idx.numel(), generator=g))
    return ModelDelta(params, task="causal-lm" if eng.kind == "causal-lm" else "feature-extraction")


def touched_lines(idx: torch.Tensor, elsize: int, line: int) -> torch.Tensor:
    return torch.unique_consecutive(idx // (line // elsize))


def floor_bytes(idx_a: torch.Tensor, idx_b: torch.Tensor, elsize: int, line: int) -> int:
    """Traffic no swap A -> B can avoid (see module docstring)."""
    touched = [touched_lines(i, elsize, line) for i in (idx_a, idx_b)]
    lines = torch.unique(torch.cat(touched))
    return (
        2 * line * lines.numel() + idx_a.numel() * (8 + elsize) + idx_b.numel() * (8 + 2 * elsize)
    )


def write_finetune(base: dict[str, torch.Tensor], delta: ModelDelta, src: Path, dst: Path) -> Path:
    """The fine-tuned full checkpoint (base + dense delta), saved like the base."""
    out = {}
    for name, w in base.items():
        if name in delta.params and w.is_floating_point():
            idx, val = delta.params[name]
            flat = w.flatten().clone()
            flat.index_add_(0, idx, val.to(w.dtype))
            out[name] = flat.view(w.shape)
        else:
            out[name] = w
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    path = dst / "model.safetensors"
    save_file(out, str(path), metadata={"format": "pt"})
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    return path


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_base(base_arg: str, ps: list[float], args: argparse.Namespace, rows: list[dict]) -> None:
    info = resolve_base(base_arg, args.data_dir)
    name = Path(base_arg).name  # a catalog name, or the folder's name
    dev = torch.device(args.device)
    src = MemorySource()
    eng = Engine.load(
        info,
        src,
        device=args.device,
        dtype=args.dtype,
        device_cache_bytes=8 << 30,
        host_cache_bytes=8 << 30,
    )
    auto = AutoModelForCausalLM if eng.kind == "causal-lm" else AutoModel
    base = load_file(str(Path(info.path) / "model.safetensors"))
    elsize = eng.buf.element_size()
    copier = Copier(max(eng.buf.numel(), 64 << 20), eng.dtype, dev)
    enc = eng.tokenizer(["a short request"], return_tensors="pt")

    for p in ps:
        a, b = f"{name}-a-{p}", f"{name}-b-{p}"
        src.add(a, random_finetune(eng, base, p, 1))
        src.add(b, random_finetune(eng, base, p, 2))
        ra, rb = eng.cache.get(a), eng.cache.get(b)
        line = LINE[dev.type]
        floor_ab = floor_bytes(ra.idx.cpu(), rb.idx.cpu(), elsize, line)
        floor_b = floor_bytes(ra.idx[:0].cpu(), rb.idx.cpu(), elsize, line)
        kernel = eng.kernel
        for impl in dict.fromkeys([kernel, "torch"]):
            eng.kernel = impl
            sw = time_swaps(eng, [a, b], 2 * args.reps, copier, floor_ab, None)
            ap = time_swaps(eng, [None, b], 2 * args.reps, copier, floor_b, b)
            rows.append(
                dict(
                    base=name,
                    p=p,
                    kernel=impl,
                    nnz=ra.idx.numel(),
                    switch=sw,
                    apply=ap,
                    delta_bytes=ra.nbytes,
                )
            )
        eng.kernel = kernel
        eng.restore()
        assert eng.base_fingerprint() == eng.loaded_fingerprint, "base not restored bit-exactly"

    # the baseline: load the full fine-tuned checkpoint
    delta = src.load(f"{name}-a-{ps[0]}")
    ckpt = write_finetune(base, delta, info.path, args.out_dir / f"{name}-ft")
    ft_dir = ckpt.parent

    def from_pretrained() -> None:
        m = auto.from_pretrained(str(ft_dir), dtype=eng.dtype).to(dev).eval()
        with torch.inference_mode():
            m(**{k: v.to(dev) for k, v in enc.items()})
        sync(dev)

    resident = auto.from_pretrained(str(info.path), dtype=eng.dtype).to(dev).eval()

    def load_state() -> None:
        resident.load_state_dict(load_file(str(ckpt), device=str(dev)), strict=False)
        sync(dev)

    reps = max(3, args.reps // 4)
    warm = {
        "from_pretrained": med_best(timed(from_pretrained, reps, dev)),
        "load_state_dict": med_best(timed(load_state, reps, dev)),
    }
    cold = {}
    for label, fn in (("from_pretrained", from_pretrained), ("load_state_dict", load_state)):
        ts = []
        for _ in range(reps):
            drop_page_cache(ckpt)
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        cold[label] = med_best(ts)
    for r in rows:
        if r["base"] == name:
            r.update(
                ckpt_bytes=ckpt.stat().st_size,
                base_bytes=eng.buf.numel() * elsize,
                warm=warm,
                cold=cold,
            )
    eng.close()


def render(rows: list[dict], dev_name: str, command: str, line: int) -> str:
    """Markdown tables: each cell "median (best of n)"."""
    load = os.getloadavg()[0]
    out = [
        f"Device: {dev_name}; load average at the end: {load:.1f}",
        f"Command: `{command}`",
        "",
        "On a shared machine the median carries other processes' load (a parallel kernel waits "
        "for its slowest thread); best of n approximates an idle machine. Compare ratios only "
        "within one run.",
        "",
    ]
    out += [
        "Swap = `Engine.activate` (restore A + save-and-apply B), caches flushed by a large "
        f"copy_ before each swap; floor = touched {line}-byte lines read + written, indices, "
        "values and saved values, at the copy_ bandwidth. Cells: median (best of n).",
        "",
        "| base | p | kernel | nnz | swap A->B ms | floor ms | swap/floor | base->B ms | "
        "apply/floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sw, ap = r["switch"], r["apply"]
        out.append(
            f"| {r['base']} | {r['p']} | {r['kernel']} | {r['nnz']:,} | "
            f"{1e3 * sw['t_med']:.2f} ({1e3 * sw['t_best']:.2f}) | {1e3 * sw['floor_s']:.2f} | "
            f"{sw['ratio_med']:.2f}x ({sw['ratio_best']:.2f}x) | "
            f"{1e3 * ap['t_med']:.2f} ({1e3 * ap['t_best']:.2f}) | "
            f"{ap['ratio_med']:.2f}x ({ap['ratio_best']:.2f}x) |"
        )
    out += [
        "",
        "Full checkpoint load (fine-tuned safetensors): `from_pretrained` + one forward pass, or "
        "`load_state_dict` into a resident model; warm = file in the page cache, cold = dropped "
        "by posix_fadvise(DONTNEED). Ratio = the faster of the two / the swap A->B (engine "
        "kernel). Cells: median (best of n).",
        "",
        "| base | p | file MiB | warm ms from_pretrained | warm ms load_state_dict | "
        "cold ms from_pretrained | cold ms load_state_dict | load/swap warm | load/swap cold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kernel"] == "torch" and len({x["kernel"] for x in rows}) > 1:
            continue
        w, c, sw = r["warm"], r["cold"], r["switch"]

        def cell(x: tuple[float, float]) -> str:
            return f"{1e3 * x[0]:.0f} ({1e3 * x[1]:.0f})"

        def ratio(d: dict, sw: dict = sw) -> str:
            med = min(v[0] for v in d.values()) / sw["t_med"]
            best = min(v[1] for v in d.values()) / sw["t_best"]
            return f"{med:.0f}x ({best:.0f}x)"

        out.append(
            f"| {r['base']} | {r['p']} | {r['ckpt_bytes'] / 2**20:,.0f} | "
            f"{cell(w['from_pretrained'])} | {cell(w['load_state_dict'])} | "
            f"{cell(c['from_pretrained'])} | {cell(c['load_state_dict'])} | "
            f"{ratio(w)} | {ratio(c)} |"
        )
    out += [
        "",
        f"| base | p | resident: base + {N_FINETUNES} decoded deltas | "
        f"{N_FINETUNES} full models | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kernel"] == "torch" and len({x["kernel"] for x in rows}) > 1:
            continue
        ours = r["base_bytes"] + N_FINETUNES * r["delta_bytes"]
        full = N_FINETUNES * r["base_bytes"]
        out.append(
            f"| {r['base']} | {r['p']} | {ours / 2**20:,.0f} MiB | "
            f"{full / 2**20:,.0f} MiB | {full / ours:.1f}x |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bases", nargs="+", default=["minilm-l6", "smollm2-135m"])
    ap.add_argument("--p", nargs="+", type=float, default=[0.99, 0.9])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="minilm-l6, p=0.99, 4 reps, no file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="resident dtype (float32, float16, ...)")
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("DAREX_DATA_DIR", Path.home() / ".darex")),
    )
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "swap.md")
    args = ap.parse_args()
    if args.quick:
        args.bases, args.p, args.reps = ["minilm-l6"], [0.99], 4
    rows: list[dict] = []
    for name in tqdm(args.bases, desc="bases"):
        bench_base(name, args.p, args, rows)
    command = "python bench/swap.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    dev = torch.device(args.device)
    text = render(rows, device_name(dev), command.strip(), LINE[dev.type])
    print(text)
    if not args.quick:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text("# Swap benchmark\n\n" + text)


if __name__ == "__main__":
    main()
