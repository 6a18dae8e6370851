"""Record the validation metric of the candidates a labeled ingest compares
(``server.reproduce.VAL_SCORED``) in grid rows that ran before rows recorded it:

    python bench/backfill_val.py --work /tmp/full-work [--base BASE] [--only TASK] [--part SPEC]

Settings are taken from ``<work>/full/results.jsonl``; each updated row is appended there
(a later row replaces an earlier one), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server import reproduce as rp
from server.settings import get_settings
from storage.bases import resolve_base
from storage.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--base", action="append", default=[])
    ap.add_argument("--only", action="append", default=[], help="task (repeatable)")
    ap.add_argument("--part", action="append", default=[], help="fine-tune spec (repeatable)")
    a = ap.parse_args()
    full = a.work / "full"
    settings = sorted({(r.base, r.task, r.spec) for r in rp.read_rows(full)})
    data_dir = get_settings().data_dir
    for base, task, spec in settings:
        if (a.base and base not in a.base) or (a.only and task not in a.only):
            continue
        if a.part and spec not in a.part:
            continue
        info = resolve_base(base, data_dir)
        done = rp.backfill_val(full, info, load_task(task), spec, rp.grid_budget(base, task))
        print(f"{base}/{task}/{spec}: {len(done)} rows given a validation metric", flush=True)


if __name__ == "__main__":
    main()
