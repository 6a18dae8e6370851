"""The paper reproduction driver: ``python bench/reproduce.py [--quick] [--out DIR] ...``.

Same options as ``darex reproduce`` (server/cli/lab.py); the experiments live in
``server/reproduce.py``. Parts run separately and append to ``<work>/full/results.jsonl``:

    python bench/reproduce.py --only rt-sentiment --part adam-small --part adam-large
    python bench/reproduce.py --report-only --out docs/results
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import server.cli.lab  # noqa: F401  (registers the commands)
from server.cli import app

if __name__ == "__main__":
    app(["reproduce", *sys.argv[1:]], prog_name="bench/reproduce.py")
