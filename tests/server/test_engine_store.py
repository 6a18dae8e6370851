"""The engine fed by the real content-addressed store: ingest a checkpoint, serve it, compare."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.engine import Engine
from tests.server.engine_util import base_state, save_merged

store_mod = pytest.importorskip("storage.store")
ingest_mod = pytest.importorskip("storage.ingest")
bases_mod = pytest.importorskip("storage.bases")


def test_engine_serves_an_ingested_finetune(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base = base_state(tiny_llama_dir)
    g = torch.Generator().manual_seed(5)
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ft_dir = save_merged(tiny_llama_dir, tmp_path / "ft", ft)

    info = bases_mod.resolve_base(str(tiny_llama_dir), tmp_path / "data")
    store = store_mod.DeltaStore(tmp_path / "store")
    ingest_mod.ingest(
        store,
        "ft",
        ft_dir,
        info,
        method="dare",
        p=0.9,
        seed=3,
        task="causal-lm",
        show_progress=False,
    )
    m = store.manifest("ft")
    pruned = [e for e in m.deltas.values() if e.pruned]
    assert pruned and sum(e.nnz for e in pruned) < 0.15 * sum(
        torch.Size(e.shape).numel() for e in pruned
    )
    # the merged pruned checkpoint, built from the stored deltas with plain tensor ops
    merged = {}
    for name, w in base.items():
        entry = m.deltas.get(name)
        if entry is None:
            merged[name] = w
            continue
        d = store.load_delta(entry, "cpu")
        dense = torch.zeros(w.numel(), dtype=torch.float32)
        dense[d.indices] = d.values.float()
        merged[name] = w + dense.view(w.shape)
    ref = AutoModelForCausalLM.from_pretrained(
        str(save_merged(tiny_llama_dir, tmp_path / "merged", merged))
    ).eval()

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    eng = Engine(model, tok, kind="causal-lm", source=store, device="cpu", dtype="float32")
    try:
        assert eng.task_of("ft") == "causal-lm"
        eng.activate("ft")
        sd = eng.model.state_dict()
        for k, v in ref.state_dict().items():
            assert torch.equal(sd[k], v), k
        enc = tok(["serving from the store"], return_tensors="pt")
        with torch.inference_mode():
            torch.testing.assert_close(eng.model(**enc).logits, ref(**enc).logits)
        eng.restore()
        assert eng.base_fingerprint() == eng.loaded_fingerprint
    finally:
        eng.close()
        store.close()
