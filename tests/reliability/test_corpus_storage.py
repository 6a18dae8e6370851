"""The bad-input corpus at the storage level: ``ingest`` refuses each case with a domain error
whose message says what and why, and the store and registry are exactly as before.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.errors import InvalidModelId
from storage.ingest import ingest
from tests.reliability.conftest import snapshot
from tests.reliability.corpus import BAD_MODEL_IDS, CHECKPOINT_CASES, Case


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[c.name for c in CHECKPOINT_CASES])
def test_bad_checkpoint_is_refused_and_store_unchanged(
    case: Case,
    llama_store,
    tiny_llama_dir: Path,
    tiny_bert_dir: Path,
    tmp_path: Path,
    pickle_marker: Path,
    category,
) -> None:
    category(f"checkpoint/{case.category}")
    store, base = llama_store
    folder = case.build(tmp_path / "ft", tiny_llama_dir, tiny_bert_dir)
    before = snapshot(store)
    with pytest.raises(case.error, match=case.match):
        ingest(store, "victim", folder, base, method=case.method, p=0.9, show_progress=False)
    assert snapshot(store) == before
    assert store.verify().ok


@pytest.mark.parametrize("model_id", BAD_MODEL_IDS, ids=[ascii(m)[:24] for m in BAD_MODEL_IDS])
def test_bad_model_id_is_refused_and_store_unchanged(
    model_id: str, llama_store, good_ft_dir: Path, category
) -> None:
    category("model_id/storage")
    store, base = llama_store
    before = snapshot(store)
    with pytest.raises(InvalidModelId, match="model_id"):
        ingest(store, model_id, good_ft_dir, base, show_progress=False)
    with pytest.raises(InvalidModelId):
        store.register(model_id, store.manifest("good"))
    assert snapshot(store) == before
    # the registry never saw it, and nothing outside the data dir was created
    assert model_id not in store.models()
    assert not (store.root.parent / "evil").exists()
