"""Probe a candidate setting for the CI quick check: one MiniLM-L6 fine-tune, then DARE
and DAREx-q (labeled q) at the given rates, and the headline's gain and gap:

    python bench/quick_probe.py --work /tmp/qx/work/lr35-s3 --lr 3.5e-4 --seed 3 \\
        --mask-seeds 5 --test 500 --rates 0.99 --freeze-embeddings --q-per-mask

The schedule and budget options default to the check's own (``QUICK_SPEC``,
``QUICK_BUDGET``: lr 3.5e-4, 450 steps of 16 at 32 tokens, 30 % warm-up, 300 validation
examples); ``--freeze-embeddings --q-per-mask`` make it the check. The fine-tune is
cached in ``WORK`` under the name "probe" and trained again when its
options change (``stale_reason``), so use one ``WORK`` per setting to keep each; a rerun
with the same options keeps the cells it has for the same budget and evaluates the rest
(``run_part``). The result is printed as
one JSON line and appended to ``--log``. ``--seed`` (the fine-tune's head initialisation
and data order) stands in for the bit-level differences between CPU models, so a
setting can be checked on several fine-tunes before it becomes the check.
docs/results/reproduce.md ("How the quick setting was found") tabulates the runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server import reproduce as rp
from server.settings import get_settings
from storage.bases import resolve_base
from storage.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for this probe")
    ap.add_argument("--task", default="rt-sentiment")
    ap.add_argument("--lr", type=float, default=3.5e-4)
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--batch-size", type=int, default=16, help="training examples a step")
    ap.add_argument("--warmup", type=float, default=rp.QUICK_SPEC["warmup"], help="fraction")
    ap.add_argument("--seed", type=int, default=0, help="the fine-tune's seed")
    ap.add_argument("--freeze-embeddings", action="store_true")
    ap.add_argument("--mask-seeds", type=int, default=3)
    ap.add_argument("--test", type=int, default=500, help="test examples")
    ap.add_argument("--val", type=int, default=rp.QUICK_BUDGET.val, help="validation examples")
    ap.add_argument("--max-length", type=int, default=rp.QUICK_BUDGET.max_length, help="tokens")
    ap.add_argument("--rates", default="0.9,0.99")
    ap.add_argument("--q-per-mask", action="store_true", help="search q for each mask")
    ap.add_argument("--log", type=Path, default=None, help="append the JSON line here")
    a = ap.parse_args()
    rates = tuple(float(x) for x in a.rates.split(","))
    if min(a.steps, a.batch_size, a.mask_seeds, a.max_length) < 1 or not all(
        0.0 <= r < 1.0 for r in rates
    ):
        ap.error("--steps, --batch-size, --mask-seeds, --max-length must be >= 1; rates in [0, 1)")
    opts = {**rp.QUICK_SPEC, "lr": a.lr, "max_steps": a.steps, "seed": a.seed}
    opts |= {"batch_size": a.batch_size, "warmup": a.warmup}
    opts["train_embeddings"] = not a.freeze_embeddings
    budget = rp.Budget(
        test=a.test,
        val=a.val,
        max_length=a.max_length,
        seeds=tuple(range(a.mask_seeds)),
        q_per_mask=a.q_per_mask,
    )
    base = resolve_base("minilm-l6", get_settings().data_dir)
    t0 = time.perf_counter()
    rows = rp.run_part(
        a.work, base, load_task(a.task), "probe", opts, budget, rates, ("dare", "darex_q/labeled")
    )
    cell = {(r.method, r.p): r for r in rows}
    out: dict = {"task": a.task, **{k: opts[k] for k in ("lr", "max_steps", "seed")}}
    out |= {"batch_size": a.batch_size, "max_length": a.max_length, "warmup": a.warmup}
    out |= {
        "train_embeddings": opts["train_embeddings"],
        "q_per_mask": a.q_per_mask,
        "test": a.test,
        "seconds": round(time.perf_counter() - t0),
        "unpruned": round(100 * cell[("unpruned", 0.0)].mean, 1),
    }
    for p in rates:
        dare, dx = cell[("dare", p)], cell[("darex_q/labeled", p)]
        gain, gap = rp.headline(rows, p)
        out[f"p={p}"] = {
            "dare": [round(100 * v, 1) for v in dare.values],
            "darex_q": [round(100 * v, 1) for v in dx.values],
            "qs": dx.extra.get("qs"),
            "gain": round(100 * gain, 1),
            "gap": round(100 * gap, 1),
        }
    line = json.dumps(out)
    print(line)
    if a.log:
        with a.log.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
