"""Load and soak: N concurrent clients over M fine-tunes for a fixed time, loopback only.

The server is ``darex serve`` in its own process (its RSS is read from /proc), with M
synthetic fine-tunes of the base stored beforehand (5 % of every tensor moved, DARE p=0.9).
Each client loops ``POST /v1/completions`` (greedy, ``--max-tokens``) on a model drawn at
random, so the scheduler swaps between fine-tunes all the time. Reported: requests served,
errors (must be 0), p50/p99 latency, swaps/s (``darex_swaps_total``), and the server's RSS
growth from the end of the warm-up to the end of the run (must stay within ``--max-rss-growth``).

    python -m bench.load --quick                                  # CI: 8 clients, 4 models, 30 s
    python -m bench.load --clients 32 --models 16 --duration 1800 # soak (30 min)

Exit status 1 when a request failed or the RSS grew past the bound.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "load-bench-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tiny_base(folder: Path) -> Path:
    """The 2-layer hidden-64 Llama of the test fixtures (no download)."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import build_tiny_llama

    return build_tiny_llama(folder)


def store_finetunes(data: Path, base_dir: Path, models: int) -> list[str]:
    """M synthetic fine-tunes of the base, ingested with DARE p=0.9."""
    import torch
    from safetensors.torch import load_file, save_file

    from storage.bases import resolve_base
    from storage.ingest import ingest
    from storage.store import DeltaStore

    base = resolve_base(base_dir, data)
    store = DeltaStore(data)
    weights = sorted(base_dir.glob("*.safetensors"))
    ids = []
    for m in tqdm(range(models), desc="store fine-tunes", unit="model"):
        g = torch.Generator().manual_seed(m)
        ft = data / "finetunes" / f"ft-{m}"
        ft.mkdir(parents=True, exist_ok=True)
        (ft / "config.json").write_bytes((base_dir / "config.json").read_bytes())
        for w in weights:
            t = load_file(str(w))
            for v in t.values():
                if v.is_floating_point():
                    flat = v.view(-1)
                    idx = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 20)]
                    flat[idx] += 0.05 * torch.randn(idx.numel(), generator=g).to(v.dtype)
            save_file(t, str(ft / w.name), metadata={"format": "pt"})
        mid = f"ft-{m}"
        ingest(store, mid, ft, base, method="dare", p=0.9, replace=True, show_progress=False)
        ids.append(mid)
    store.close()
    return ids


class Server:
    def __init__(self, data: Path, base: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "DAREX_ADMIN_TOKEN": TOKEN,
            "DAREX_DATA_DIR": str(data),
            "DAREX_BASE": base,
            "DAREX_HOST": "127.0.0.1",
            "DAREX_PORT": str(self.port),
            "DAREX_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        code = "import sys; sys.argv[0] = 'darex'; from server.cli import main; main()"
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; see {self.log.name}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError("server not ready")

    def swaps(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("darex_swaps_total")
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="darex-load-"))
    data = work / "data"
    data.mkdir()
    base_dir = Path(args.base) if args.base else tiny_base(work / "tiny-llama")
    from storage.bases import resolve_base

    base_dir = resolve_base(str(base_dir), data).path
    models = store_finetunes(data, base_dir, args.models)
    srv = Server(data, str(base_dir), work / "server.log")
    try:
        srv.wait_ready()
        base_id = httpx.get(f"{srv.url}/v1/models", timeout=10).json()["data"][0]["id"]
        targets = [base_id, *models]

        def call(c: httpx.Client, model: str) -> tuple[float, int, str]:
            body = {"model": model, "prompt": "the quick brown fox", "max_tokens": args.max_tokens}
            t0 = time.perf_counter()
            try:
                r = c.post("/v1/completions", json={**body, "temperature": 0})
                return time.perf_counter() - t0, r.status_code, r.text[:200]
            except httpx.HTTPError as e:
                return time.perf_counter() - t0, 0, repr(e)

        with httpx.Client(base_url=srv.url, timeout=120) as c:  # warm-up: every model once
            for m in targets:
                _, status, text = call(c, m)
                assert status == 200, text
        rss0 = rss_mib(srv.proc.pid)
        swaps0 = srv.swaps()
        lat: list[float] = []
        errors: list[str] = []
        rss: list[float] = [rss0]
        lock = threading.Lock()
        stop_at = time.monotonic() + args.duration

        def client(i: int) -> None:
            rnd = random.Random(i)
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                while time.monotonic() < stop_at:
                    dt, status, text = call(c, rnd.choice(targets))
                    with lock:
                        lat.append(dt)
                        if status != 200:
                            errors.append(f"{status}: {text}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        with tqdm(total=int(args.duration), desc="load", unit="s") as bar:
            while time.monotonic() < stop_at:
                time.sleep(1)
                rss.append(rss_mib(srv.proc.pid))
                bar.update(1)
                bar.set_postfix(requests=len(lat), errors=len(errors), rss_mib=f"{rss[-1]:.0f}")
        for t in threads:
            t.join()
        swaps = srv.swaps() - swaps0
        rss1 = rss_mib(srv.proc.pid)
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)

    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
    growth = (rss1 - rss0) / rss0
    rows = [
        ("base", base_id if len(base_id) < 40 else "..." + base_id[-37:]),
        ("clients", args.clients),
        ("models (fine-tunes + base)", f"{args.models} + 1"),
        ("duration s", f"{args.duration:.0f}"),
        ("max_tokens", args.max_tokens),
        ("requests served", len(lat) - len(errors)),
        ("errors", len(errors)),
        ("throughput req/s", f"{len(lat) / args.duration:.1f}"),
        ("p50 latency ms", f"{1e3 * q[49]:.1f}"),
        ("p99 latency ms", f"{1e3 * q[98]:.1f}"),
        ("swaps/s", f"{swaps / args.duration:.1f}"),
        ("server RSS after warm-up MiB", f"{rss0:.1f}"),
        ("server RSS at end MiB", f"{rss1:.1f}"),
        ("server RSS peak MiB", f"{max(rss):.1f}"),
        ("RSS growth (end / warm-up - 1)", f"{100 * growth:+.2f} %"),
    ]
    print("\nbench/load.py: N clients over M models on loopback, every request greedy")
    print(f"{'':-<58}")
    for k, v in rows:
        print(f"{k:<36}{v!s:>22}")
    for e in errors[:5]:
        print("error:", e)
    ok = not errors and growth <= args.max_rss_growth
    print(
        "PASS" if ok else "FAIL",
        f"(errors must be 0, RSS growth <= {100 * args.max_rss_growth:.0f} %)",
    )
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI: 8 clients, 4 models, 30 s")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--base", default="", help="base folder or catalog name (default: tiny Llama)")
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    args = ap.parse_args()
    if args.quick:
        args.clients, args.models, args.duration = 8, 4, 30.0
    sys.exit(run(args))


if __name__ == "__main__":
    main()
