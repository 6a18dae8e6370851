"""Runs one ingest in its own process (for the crash and concurrency tests).

usage: python ingest_worker.py DATA_DIR MODEL_ID CHECKPOINT BASE_DIR [DELAY_S]
Prints ``progress <fraction>`` lines; sleeps DELAY_S after each tensor.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from storage.bases import resolve_base
from storage.ingest import ingest
from storage.store import DeltaStore


def main() -> None:
    data_dir, model_id, ckpt, base_dir = sys.argv[1:5]
    delay = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    base = resolve_base(base_dir, Path(data_dir))

    def progress(frac: float, msg: str) -> None:
        print(f"progress {frac:.3f} {msg}", flush=True)
        time.sleep(delay)

    store = DeltaStore(data_dir)
    ingest(
        store, model_id, ckpt, base, method="dare", p=0.9, progress=progress, show_progress=False
    )
    print("done", flush=True)


if __name__ == "__main__":
    main()
