"""Hostile delta blobs: each is refused with ``CorruptBlob`` / ``UnsupportedFormat``, fast, and
without inflating a zip bomb (decoded in a child process under an address-space limit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.codec_cases import cases

ROOT = Path(__file__).resolve().parents[2]
NAMES = list(cases())


@pytest.fixture(scope="module")
def decoded() -> dict[str, dict]:
    """Every case decoded once in a child with 512 MiB of address-space headroom."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests.reliability.codec_cases", "--headroom-mb", "512"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in rows}


@pytest.mark.parametrize("name", NAMES)
def test_hostile_blob_is_refused_cheaply(name: str, decoded: dict[str, dict], category) -> None:
    category("codec/blob")
    r = decoded[name]
    assert r["error"] in ("CorruptBlob", "UnsupportedFormat"), r
    assert r["message"], r
    assert r["seconds"] < 1.0, r
    assert r["peak_growth_mib"] < 64, r  # a 1 GiB bomb never inflated
