"""Reliability fixtures: a store holding one real fine-tune of the tiny Llama, store snapshots,
and a per-category tally of the cases (printed at the end of the run, for docs/RELIABILITY.md).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.bases import resolve_base
from storage.store import DeltaStore
from tests.reliability.corpus import finetune_tensors, write_folder

_TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def snapshot(store: DeltaStore) -> dict:
    """What a refused input must leave as it was: names, registry version, blobs, temp files."""
    return {
        "models": store.models(),
        "version": store.registry.version(),
        "blobs": sorted(store.blobs.iter_keys()),
        "temps": sorted(p.name for p in store.blobs.tmp.iterdir()),
    }


@pytest.fixture(scope="session")
def good_ft_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A plausible full fine-tune of the tiny Llama (config.json + model.safetensors)."""
    return write_folder(
        tmp_path_factory.mktemp("good-ft"), tiny_llama_dir, finetune_tensors(tiny_llama_dir)
    )


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, good_ft_dir: Path):
    """``(store, base)``: a SQLite store with one model, ``good``, already ingested."""
    from storage.ingest import ingest

    data = tmp_path_factory.mktemp("rel-store")
    base = resolve_base(tiny_llama_dir, data)
    store = DeltaStore(data)
    ingest(store, "good", good_ft_dir, base, method="dare", p=0.9, show_progress=False)
    yield store, base
    store.close()


@pytest.fixture
def pickle_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A path that exists only if some pickle in the corpus was unpickled."""
    marker = tmp_path / "PICKLE-WAS-LOADED"
    monkeypatch.setenv("DAREX_PICKLE_MARKER", str(marker))
    yield marker
    assert not marker.exists(), "a pickle from the corpus was loaded"


@pytest.fixture
def category(request: pytest.FixtureRequest):
    """``category("header")`` files this test under a category in the end-of-run tally."""

    def mark(name: str) -> None:
        request.node.user_properties.append(("reliability_category", name))

    return mark


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if type(report).__name__ != "TestReport":  # schemathesis' per-example subtest reports
        return
    cats = [v for k, v in report.user_properties if k == "reliability_category"]
    if not cats or (report.when != "call" and not (report.when == "setup" and report.failed)):
        return
    for c in cats:
        _TALLY[c]["passed" if report.passed else "skipped" if report.skipped else "failed"] += 1


def pytest_terminal_summary(terminalreporter) -> None:
    if not _TALLY:
        return
    tr = terminalreporter
    tr.section("reliability cases per category")
    tr.write_line(f"{'category':<28}{'tried':>7}{'passed':>8}{'failed':>8}{'skipped':>9}")
    for cat in sorted(_TALLY):
        c = _TALLY[cat]
        tried = sum(c.values())
        tr.write_line(f"{cat:<28}{tried:>7}{c['passed']:>8}{c['failed']:>8}{c['skipped']:>9}")
    out = os.environ.get("DAREX_RELIABILITY_TALLY")
    if out:
        Path(out).write_text(json.dumps({k: dict(v) for k, v in _TALLY.items()}, indent=1))
