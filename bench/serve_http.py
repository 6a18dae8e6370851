"""HTTP serving: requests/s and p50/p99 for one model and for 20 models interleaved, and the
HTTP overhead vs a direct engine call, all in one run on the same engine.

A live uvicorn server (in a thread of this process) serves a real Engine whose
fine-tunes are DARE-shaped deltas at p = 0.99; clients are httpx threads.
Direct = ``engine.activate`` + the batched decode loop for one request, no
scheduler, no HTTP. Client and server share this process (and its GIL), so the
overhead figure is an upper bound.

    python bench/serve_http.py --quick      # tiny Llama (CI smoke)
    python bench/serve_http.py              # smollm2-135m
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve import PROMPTS, dare_delta, load_base
from server.api import create_app
from server.deltas import MemorySource
from server.engine import Engine
from server.generation import Row, SamplingParams, encode_prompt, generate_batch
from server.settings import Settings
from tests.server.live import live_server


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def direct_call(eng: Engine, model: str | None, prompt: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    eng.activate(model)
    row = Row(
        encode_prompt(eng.tokenizer, prompt),
        SamplingParams(max_tokens),
        lambda c: None,
        lambda: False,
    )
    generate_batch(eng.model, eng.tokenizer, [row], eng.device)
    return time.perf_counter() - t0


def http_run(url: str, models: list[str], max_tokens: int, concurrency: int) -> dict:
    lat: list[float] = []

    def one(i: int) -> None:
        body = {
            "model": models[i],
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        t0 = time.perf_counter()
        r = client.post("/v1/completions", json=body)
        lat.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text

    with httpx.Client(
        base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)
    ) as client:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(len(models))))
        wall = time.perf_counter() - t0
    return {"rps": len(models) / wall, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("DAREX_DATA_DIR", "~/.darex"))
    )
    args = ap.parse_args()
    n_req = args.requests or (120 if args.quick else 80)
    model, tok, base_name = load_base(args.quick, args.data_dir.expanduser())
    source = MemorySource()
    for i in range(20):
        source.add(f"ft-{i}", dare_delta(model, seed=i + 1, p=0.99))
    eng = Engine(
        model, tok, kind="causal-lm", source=source, device="cpu", dtype="float32", base_name="base"
    )
    for i in range(20):  # decode every delta once so both paths hit the cache
        eng.activate(f"ft-{i}")

    def direct_runs() -> tuple[list[float], list[float]]:
        one = [
            direct_call(eng, "ft-0", PROMPTS[i % len(PROMPTS)], args.max_tokens)
            for i in range(n_req // 2)
        ]
        many = [
            direct_call(eng, f"ft-{i % 20}", PROMPTS[i % len(PROMPTS)], args.max_tokens)
            for i in range(n_req // 2)
        ]
        return one, many

    # On a worker thread, as the scheduler runs it (torch on the main thread of a busy
    # 2-core machine was measured 15x slower: OpenMP spin-waits under oversubscription).
    with ThreadPoolExecutor(1) as pool:
        seq, seq20 = pool.submit(direct_runs).result()
    eng.activate(None)

    settings = Settings(
        env="development", data_dir=Path(tempfile.mkdtemp()), base=base_name, log_level="WARNING"
    )
    base = SimpleNamespace(name=base_name, path=None, arch="decoder")
    app = create_app(settings, eng, base=base, store=_NullStore())
    with live_server(app) as url:
        one_seq = http_run(url, ["ft-0"] * (n_req // 2), args.max_tokens, 1)
        twenty_seq = http_run(url, [f"ft-{i % 20}" for i in range(n_req // 2)], args.max_tokens, 1)
        one_c = http_run(url, ["ft-0"] * n_req, args.max_tokens, args.concurrency)
        twenty_c = http_run(
            url, [f"ft-{i % 20}" for i in range(n_req)], args.max_tokens, args.concurrency
        )

    dev = "CPU" if eng.device.type == "cpu" else torch.cuda.get_device_name(eng.device)
    print(
        f"# HTTP serving — {base_name}, {dev} ({os.cpu_count()} cores), /v1/completions, "
        f"{args.max_tokens} tokens greedy, fine-tunes at p=0.99\n"
    )
    print("| run | clients | req/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for name, d, c in (
        ("direct engine call, 1 model", seq, 1),
        ("direct engine call, 20 models round-robin", seq20, 1),
    ):
        print(
            f"| {name} | {c} | {len(d) / sum(d):.1f} | {1e3 * pct(d, 0.5):.1f} | "
            f"{1e3 * pct(d, 0.99):.1f} |"
        )
    for name, r, c in (
        ("HTTP, 1 model", one_seq, 1),
        ("HTTP, 20 models interleaved", twenty_seq, 1),
        ("HTTP, 1 model", one_c, args.concurrency),
        ("HTTP, 20 models interleaved", twenty_c, args.concurrency),
    ):
        print(f"| {name} | {c} | {r['rps']:.1f} | {1e3 * r['p50']:.1f} | {1e3 * r['p99']:.1f} |")
    over = one_seq["p50"] - statistics.median(seq)
    over20 = twenty_seq["p50"] - statistics.median(seq20)
    print(
        f"\nHTTP overhead at p50, one client: {1e3 * over:.1f} ms on 1 model "
        f"({one_seq['p50'] / statistics.median(seq):.2f}x the direct call), "
        f"{1e3 * over20:.1f} ms on 20 models"
    )


class _NullStore:
    """No admin store in this bench: the models come from memory; /readyz pings nothing."""

    class registry:
        @staticmethod
        def ping() -> bool:
            return True

    def models(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


if __name__ == "__main__":
    main()
