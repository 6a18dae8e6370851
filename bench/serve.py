"""Serving throughput: many fine-tunes interleaved round-robin vs the base alone, same request mix.

Both runs go through the real Engine and Scheduler. The request mix is R
completions (fixed prompts, greedy, ``max_tokens`` tokens) submitted at once;
in the interleaved run request ``i`` names fine-tune ``i % N``; in the baseline
every request names the base. Throughput = generated tokens / wall time.
A third row serves the interleaved mix one request at a time in arrival order
(what a server without the model-aware scheduler does: one swap per request).

Resident memory: RSS of this process (and, on CUDA, the GPU memory allocated) with
N fine-tunes cached vs the bytes N full copies of the model at the resident dtype
would take.

    python bench/serve.py --quick            # tiny Llama, 10 fine-tunes (CI smoke)
    python bench/serve.py                    # smollm2-135m, 50 fine-tunes at p = 0.99
    python bench/serve.py --device cuda --dtype float16   # the same on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.deltas import MemorySource, ModelDelta
from server.engine import Engine
from server.generation import SamplingParams
from server.scheduler import Scheduler

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "The three laws of robotics are",
    "Once upon a time, in a small village,",
    "The best way to learn a language is",
    "Photosynthesis is the process by which",
    "A good cup of coffee needs",
]


def gpu_bytes(dev: torch.device) -> int:
    """Bytes the CUDA caching allocator holds for tensors (0 on CPU)."""
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def dare_delta(model: torch.nn.Module, seed: int, p: float) -> ModelDelta:
    """A DARE-shaped delta: one random entry kept per block of 1/(1-p) entries (density 1-p,
    sorted, unique), values ~ N(0, 0.002) / (1 - p). Built in O(kept), so 50 fine-tunes
    of a 135M model take seconds (the DARE hash mask itself costs one pass over every entry).
    """
    g = torch.Generator().manual_seed(seed)
    step = max(1, round(1 / (1 - p)))
    params, seen = {}, set()
    for name, w in model.named_parameters():
        if id(w) in seen:
            continue
        seen.add(id(w))
        starts = torch.arange(0, w.numel(), step)
        idx = (starts + torch.randint(0, step, starts.shape, generator=g)).clamp_(max=w.numel() - 1)
        idx = torch.unique(idx)
        params[name] = (idx, 0.002 * torch.randn(idx.numel(), generator=g) / (1 - p))
    return ModelDelta(params, task="causal-lm")


async def run_mix(sched: Scheduler, models: list[str | None], max_tokens: int) -> tuple[int, float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    done = await asyncio.gather(
        *(sched.complete(m, PROMPTS[i % len(PROMPTS)], params) for i, m in enumerate(models))
    )
    return sum(c.completion_tokens for c in done), time.perf_counter() - t0


def run_sequential(
    sched: Scheduler, models: list[str | None], max_tokens: int
) -> tuple[int, float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    n = sum(
        sched.complete_sync(m, PROMPTS[i % len(PROMPTS)], params).completion_tokens
        for i, m in enumerate(models)
    )
    return n, time.perf_counter() - t0


def load_base(quick: bool, base: str, data_dir: Path) -> tuple[torch.nn.Module, object, str]:
    from transformers import AutoModelForCausalLM

    from storage.predict import load_tokenizer

    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_tiny_llama

        path = build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-llama")
        name = "tiny-llama (2 layers, hidden 64)"
    else:
        from storage.bases import resolve_base

        path = resolve_base(base, data_dir).path
        name = Path(base).name
    return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path), name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 10 fine-tunes")
    ap.add_argument("--models", type=int, default=None, help="fine-tunes interleaved")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.99)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--turn", type=int, default=4, help="max_batches_per_turn (server default 4)")
    ap.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("DAREX_DATA_DIR", "~/.darex"))
    )
    ap.add_argument("--base", default="smollm2-135m", help="catalog name or local HF folder")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="resident dtype (float32, float16, ...)")
    args = ap.parse_args()
    n_models = args.models or (10 if args.quick else 50)
    n_req = args.requests or 8 * n_models
    torch.manual_seed(0)

    model, tok, base_name = load_base(args.quick, args.base, args.data_dir.expanduser())
    source = MemorySource()
    t0 = time.perf_counter()
    for i in range(n_models):
        source.add(f"ft-{i}", dare_delta(model, seed=i + 1, p=args.p))
    build_s = time.perf_counter() - t0
    eng = Engine(
        model,
        tok,
        kind="causal-lm",
        source=source,
        device=args.device,
        dtype=args.dtype,
        host_cache_bytes=64 << 30,
    )
    full_bytes = eng.buf.numel() * eng.buf.element_size()  # one full model at this dtype
    dtype_name = str(eng.dtype).removeprefix("torch.")
    sched = Scheduler(eng, max_batch_size=args.batch, max_batches_per_turn=args.turn)
    rss_base, gpu_base = rss_bytes(), gpu_bytes(eng.device)

    interleaved = [f"ft-{i % n_models}" for i in range(n_req)]
    asyncio.run(run_mix(sched, interleaved[: 2 * args.batch], 2))  # warm up, fill the caches
    asyncio.run(run_mix(sched, [f"ft-{i}" for i in range(n_models)], 1))
    rss_cached, gpu_cached = rss_bytes(), gpu_bytes(eng.device)
    base_tok, base_s = asyncio.run(run_mix(sched, [None] * n_req, args.max_tokens))
    mix_tok, mix_s = asyncio.run(run_mix(sched, interleaved, args.max_tokens))
    swaps0, swap_s0 = sched.stats.swaps, sched.stats.swap_seconds
    seq_n = min(n_req, 2 * n_models, 40)
    seq_tok, seq_s = run_sequential(sched, interleaved[:seq_n], args.max_tokens)
    sched.close()

    base_tps, mix_tps, seq_tps = base_tok / base_s, mix_tok / mix_s, seq_tok / seq_s
    dev = "CPU" if eng.device.type == "cpu" else torch.cuda.get_device_name(eng.device)
    print(
        f"# serving throughput — {base_name}, {dev} ({os.cpu_count()} cores), kernel {eng.kernel}"
    )
    print(
        f"{n_models} fine-tunes at p={args.p} (built in {build_s:.1f}s), resident {dtype_name}; "
        f"{n_req} requests x "
        f"{args.max_tokens} tokens, batch {args.batch}, {args.turn} batches per turn, greedy\n"
    )
    print("| run | tokens | seconds | tokens/s | vs base |")
    print("|---|---:|---:|---:|---:|")
    print(f"| base alone | {base_tok} | {base_s:.2f} | {base_tps:.1f} | 1.00 |")
    print(
        f"| {n_models} fine-tunes round-robin, scheduler | {mix_tok} | {mix_s:.2f} | "
        f"{mix_tps:.1f} | **{mix_tps / base_tps:.2f}** |"
    )
    print(
        f"| same mix, one request at a time (no scheduler), first {seq_n} | {seq_tok} | "
        f"{seq_s:.2f} | {seq_tps:.1f} | {seq_tps / base_tps:.2f} |"
    )
    print(f"\nswaps in the interleaved run: {swaps0}, {1e3 * swap_s0 / max(swaps0, 1):.2f} ms each")
    cache = eng.cache_stats()
    held = cache["device"]["bytes"] + cache["host"]["bytes"]
    print("\n| resident memory | bytes |")
    print("|---|---:|")
    print(f"| process RSS, base loaded | {rss_base / 2**20:.0f} MiB |")
    print(f"| process RSS, {n_models} fine-tunes cached | {rss_cached / 2**20:.0f} MiB |")
    if eng.device.type == "cuda":
        print(f"| GPU memory allocated, base loaded | {gpu_base / 2**20:.0f} MiB |")
        cached = f"{gpu_cached / 2**20:.0f} MiB"
        print(f"| GPU memory allocated, {n_models} fine-tunes cached | {cached} |")
    print(f"| decoded deltas held by the cache | {held / 2**20:.0f} MiB |")
    full_mib = n_models * full_bytes / 2**20
    print(f"| {n_models} full {dtype_name} models (computed) | {full_mib:.0f} MiB |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"| peak RSS of this run | {peak / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
