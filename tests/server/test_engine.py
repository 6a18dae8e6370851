"""Engine: flat buffer, swap exactness, merged-checkpoint equivalence, heads by reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertForSequenceClassification,
)

import server.engine
from server.deltas import MemorySource
from server.engine import Engine
from server.errors import WeightsCorrupt, WrongTask
from storage.errors import UnknownModel
from tests.server.engine_util import (
    base_state,
    expected_buffers,
    faulting_swap,
    merged_state,
    random_finetune,
    random_source,
    save_merged,
)

TEXTS = ["the cat sat on the mat", "a much longer sentence about serving many fine-tunes at once"]
LM_MODELS = {"ft-a": (1, 0.9), "ft-b": (2, 0.9), "ft-c": (3, 0.5), "ft-a2": (1, 0.99)}


def _engine(model_dir: Path, kind: str, source: MemorySource, **kw) -> Engine:
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    model = auto.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return Engine(model, tok, kind=kind, source=source, device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def lm(tiny_llama_dir: Path):
    base = base_state(tiny_llama_dir)
    src, fts = random_source(base, LM_MODELS)
    eng = _engine(tiny_llama_dir, "causal-lm", src)
    yield eng, base, fts
    eng.close()


@pytest.fixture(scope="module")
def bert(tiny_bert_dir: Path):
    base = base_state(tiny_bert_dir)
    src = MemorySource()
    g = torch.Generator().manual_seed(7)
    heads = {}
    for i, (mid, labels) in enumerate({"sst": ["neg", "pos"], "nli": ["e", "n", "c"]}.items()):
        ft = random_finetune(base, seed=10 + i, p=0.9)
        heads[mid] = {
            "classifier.weight": torch.randn(len(labels), 64, generator=g),
            "classifier.bias": torch.randn(len(labels), generator=g),
        }
        src.add_sparse(mid, ft, extras=heads[mid], task="sequence-classification", labels=labels)
        heads[mid]["_ft"] = ft  # type: ignore[assignment]
    src.add_sparse("emb", random_finetune(base, seed=20, p=0.9), task="feature-extraction")
    eng = _engine(tiny_bert_dir, "encoder", src)
    yield eng, base, heads
    eng.close()


def test_parameters_are_views_of_one_buffer_tied_once(lm) -> None:
    eng, base, _ = lm
    m = eng.model
    unique = {id(p): p for p in m.parameters()}
    assert eng.buf.numel() == sum(p.numel() for p in unique.values())
    lo, hi = eng.buf.data_ptr(), eng.buf.data_ptr() + eng.buf.numel() * 4
    assert all(lo <= p.data_ptr() < hi for p in unique.values())
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert eng.slots["lm_head.weight"] == eng.slots["model.embed_tokens.weight"]
    sd = m.state_dict()
    for k, v in base.items():
        assert torch.equal(sd[k], v), k


def test_activate_reports_change_and_base_aliases(lm) -> None:
    eng, _, _ = lm
    eng.restore()
    assert eng.activate(None) is False
    assert eng.activate(eng.base_name) is False
    assert eng.activate("ft-a") is True and eng.active == "ft-a"
    assert eng.activate("ft-a") is False
    assert eng.activate(eng.base_name) is True and eng.active is None
    assert eng.base_fingerprint() == eng.loaded_fingerprint


def test_an_info_read_that_spans_a_forget_is_not_cached(llama_engine, monkeypatch) -> None:
    """``describe`` (off the worker) reads a model's task while a replacing upload's
    forget runs: what it read may be the old version's, so it is answered but not kept."""
    import threading

    from server.deltas import ModelInfo

    eng = llama_engine
    entered, go = threading.Event(), threading.Event()
    real = eng.source.info

    def slow_info(model_id: str) -> ModelInfo:
        info = real(model_id)
        entered.set()
        assert go.wait(10)
        return info

    monkeypatch.setattr(eng.source, "info", slow_info)
    out: list = []
    reader = threading.Thread(target=lambda: out.append(eng.describe("ft-a")))
    reader.start()
    assert entered.wait(10)
    eng.forget("ft-a")  # the upload's forget, between the read and its caching
    go.set()
    reader.join(10)
    assert out and out[0][0] == "causal-lm"
    assert "ft-a" not in eng._info  # the next describe reads the registry again
    monkeypatch.setattr(eng.source, "info", real)
    eng.describe("ft-a")
    assert "ft-a" in eng._info  # read with no forget in between: kept


def test_unknown_model_changes_nothing(lm) -> None:
    eng, _, _ = lm
    eng.activate("ft-b")
    fp = eng.base_fingerprint()
    with pytest.raises(UnknownModel):
        eng.activate("nope")
    assert eng.active == "ft-b" and eng.base_fingerprint() == fp
    eng.restore()


def test_causal_lm_equals_merged_checkpoint(lm, tiny_llama_dir: Path, tmp_path: Path) -> None:
    eng, base, fts = lm
    enc = eng.tokenizer(TEXTS, padding=True, return_tensors="pt")
    for mid in ("ft-c", "ft-a", "ft-b"):  # each switch restores the previous one first
        merged = save_merged(tiny_llama_dir, tmp_path / mid, merged_state(base, fts[mid]))
        ref = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
        eng.activate(mid)
        sd = eng.model.state_dict()
        for k, v in ref.state_dict().items():
            assert torch.equal(sd[k], v), f"{mid}: {k} differs from the merged checkpoint"
        with torch.inference_mode():
            got = eng.model(**enc).logits
            want = ref(**enc).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    eng.restore()
    assert eng.base_fingerprint() == eng.loaded_fingerprint


def test_classifier_equals_merged_checkpoint(bert, tiny_bert_dir: Path, tmp_path: Path) -> None:
    eng, base, heads = bert
    tok = eng.tokenizer
    for mid, labels in (("sst", ["neg", "pos"]), ("nli", ["e", "n", "c"]), ("sst", None)):
        h = heads[mid]
        cfg = {
            "architectures": ["BertForSequenceClassification"],
            "id2label": dict(enumerate(eng.labels_of(mid))),
            "label2id": {lab: i for i, lab in enumerate(eng.labels_of(mid))},
        }
        extras = {
            "classifier.weight": h["classifier.weight"],
            "classifier.bias": h["classifier.bias"],
        }
        merged = save_merged(
            tiny_bert_dir,
            tmp_path / mid,
            merged_state(base, h["_ft"]),
            prefix="bert.",
            extras=extras,
            config_update=cfg,
        )
        ref = BertForSequenceClassification.from_pretrained(str(merged)).eval()
        eng.activate(mid)
        assert eng.task_of(mid) == "sequence-classification"
        if labels is not None:
            assert eng.labels_of(mid) == labels
            assert eng.describe(mid) == ("sequence-classification", labels)
        # the head is the cached tensor itself, not a copy
        cached = eng.cache.device_tier.items[mid].extras["classifier.weight"]
        assert eng.head is not None and eng.head.weight.data_ptr() == cached.data_ptr()
        got = torch.tensor(eng.classify(TEXTS))
        with torch.inference_mode():
            want = torch.softmax(ref(**tok(TEXTS, padding=True, return_tensors="pt")).logits, -1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    eng.restore()
    assert eng.head is None
    with pytest.raises(WrongTask):
        eng.classify(TEXTS)
    assert eng.base_fingerprint() == eng.loaded_fingerprint


def test_embed_is_masked_mean_of_last_hidden(bert) -> None:
    eng, _, _ = bert
    eng.activate("emb")
    assert eng.task_of("emb") == "feature-extraction" and eng.task_of(None) == "feature-extraction"
    assert eng.describe(None) == ("feature-extraction", None)
    got = torch.tensor(eng.embed(TEXTS))
    enc = eng.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        h = eng.model(**enc).last_hidden_state
    for i in range(len(TEXTS)):
        n = int(enc["attention_mask"][i].sum())
        torch.testing.assert_close(got[i], h[i, :n].mean(0), rtol=1e-5, atol=1e-6)
    eng.restore()


def test_a_text_longer_than_the_positions_loses_its_end(bert) -> None:
    """The tiny base's tokenizer says 512 tokens, its model has 128 positions: a longer text
    is cut to 128 (not a failed forward pass), so what follows changes nothing."""
    eng, _, _ = bert
    assert (eng.tokenizer.model_max_length, eng.model.config.max_position_embeddings) == (512, 128)
    assert eng.max_input_tokens == 128
    eng.activate("sst")
    long = "word " * 300
    assert eng.embed([long]) == eng.embed([long + "and more"])
    assert eng.classify([long]) == eng.classify([long + "and more"])
    eng.restore()


@pytest.mark.parametrize(("impl", "examples", "least"), [("numba", 25, 1000), ("torch", 6, 200)])
def test_random_swaps_restore_base_bit_exactly(lm, impl: str, examples: int, least: int) -> None:
    """Thousands of random activations: each step the buffer is exactly base + delta(active)."""
    eng, _, _ = lm
    eng.restore()
    eng.kernel = impl
    expected = expected_buffers(eng, LM_MODELS)
    ids = [None, eng.base_name, *LM_MODELS]
    total = [0]

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    # each example at least least/examples swaps long, so the total cannot fall short of
    # ``least`` however short the sequences hypothesis draws
    @given(st.lists(st.sampled_from(ids), min_size=-(-least // examples), max_size=80))
    def run(seq: list[str | None]) -> None:
        for mid in seq:
            eng.activate(mid)
            total[0] += 1
            key = None if mid == eng.base_name else mid
            assert eng.active == key
            assert torch.equal(eng.buf, expected[key])
        eng.restore()
        assert eng.base_fingerprint() == eng.loaded_fingerprint

    try:
        run()
    finally:
        eng.kernel = "numba"
        eng.restore()
    assert total[0] >= least


def test_forget_drops_cache_and_restores(lm) -> None:
    eng, _, _ = lm
    eng.activate("ft-a2")
    eng.forget("ft-a2")
    assert eng.active is None and eng.base_fingerprint() == eng.loaded_fingerprint
    st_ = eng.cache_stats()
    assert "ft-a2" not in st_["device"]["entries"] and "ft-a2" not in st_["host"]["entries"]
    eng.activate("ft-a2")  # reloads from the source
    eng.restore()


def test_a_failed_swap_changes_nothing_and_leaves_no_pin(
    lm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swap that fails before its kernel (out of memory, a bad head) leaves the active
    model as it was, and the target unpinned: a pin left behind kept the delta cached for
    good and made the model's delete fail after it had been unregistered."""
    eng, _, _ = lm
    eng.activate("ft-a")
    fp = eng.base_fingerprint()

    def boom(*_a, **_k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(server.engine.kernels, "swap", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(eng, "_make_head", boom)  # the last step before the kernel
    with pytest.raises(RuntimeError, match="simulated"):
        eng.activate("ft-b")
    assert eng.active == "ft-a" and eng.base_fingerprint() == fp
    assert eng.cache_stats()["pinned"] == ["ft-a"]
    eng.forget("ft-b")  # the delete path: must not fail
    st_ = eng.cache_stats()
    assert "ft-b" not in st_["device"]["entries"] and "ft-b" not in st_["host"]["entries"]
    monkeypatch.undo()
    assert eng.activate("ft-b") is True and eng.active == "ft-b"
    eng.restore()
    assert eng.base_fingerprint() == eng.loaded_fingerprint


@pytest.mark.parametrize("start", ["ft-a", None])
def test_a_kernel_that_fails_part_way_reloads_the_base_and_verifies_it(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, start: str | None
) -> None:
    """After a kernel fault the buffer is neither model: the engine drops the active
    fine-tune, reads the base's checkpoint again, checks its hash, and serves on; the
    next swap is exact again."""
    base = base_state(tiny_llama_dir)
    src, _ = random_source(base, LM_MODELS)
    reloads: list[bool] = []  # whether the buffer was off the base when it was reloaded

    def reload_base():
        reloads.append(eng.base_fingerprint() != eng.loaded_fingerprint)
        return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).state_dict()

    eng = _engine(tiny_llama_dir, "causal-lm", src, reload_base=reload_base)
    want = expected_buffers(eng, ["ft-b"])
    eng.forget("ft-b")
    if start is not None:
        eng.activate(start)
    monkeypatch.setattr(server.engine.kernels, "swap", faulting_swap(server.engine.kernels.swap))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        eng.activate("ft-b")
    assert reloads == [True] and eng.broken is None
    assert eng.active is None and eng.head is None
    assert eng.base_fingerprint() == eng.loaded_fingerprint
    assert eng.cache_stats()["pinned"] == []
    monkeypatch.undo()
    assert eng.activate("ft-b") is True and torch.equal(eng.buf, want["ft-b"])
    eng.restore()
    assert eng.base_fingerprint() == eng.loaded_fingerprint
    eng.close()


@pytest.mark.parametrize("how", ["no checkpoint", "other weights", "reload fails"])
def test_weights_that_cannot_be_restored_refuse_every_request(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """When the base cannot be read back and verified, the engine says why and refuses to
    activate anything (base included) with ``WeightsCorrupt``, rather than serve weights
    that are neither the base nor a fine-tune."""
    base = base_state(tiny_llama_dir)
    src, _ = random_source(base, LM_MODELS)

    def reload_base():
        if how == "reload fails":
            raise OSError("model.safetensors: No such file or directory")
        state = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).state_dict()
        state["model.norm.weight"] = state["model.norm.weight"] + 1.0
        return state

    kw = {} if how == "no checkpoint" else {"reload_base": reload_base}
    eng = _engine(tiny_llama_dir, "causal-lm", src, **kw)
    eng.activate("ft-a")
    monkeypatch.setattr(server.engine.kernels, "swap", faulting_swap(server.engine.kernels.swap))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        eng.activate("ft-b")
    monkeypatch.undo()
    why = {
        "no checkpoint": "no checkpoint to reload the base from",
        "other weights": "the reloaded base hashes to",
        "reload fails": "reloading the base failed (OSError",
    }[how]
    assert eng.broken is not None and why in eng.broken
    assert "illegal memory access" in eng.broken and eng.active is None
    for target in ("ft-a", "ft-c", None):
        with pytest.raises(WeightsCorrupt, match="unknown state"):
            eng.activate(target)
    assert eng.cache_stats()["pinned"] == []
    eng.close()


def test_batches_never_switch_the_shared_tokenizer_to_padding(bert) -> None:
    """classify/embed pad and truncate with their own tokenizer copy: the shared one, which
    the routes call from other threads, is never switched (a switch while another thread
    encodes raises "Already borrowed" in a fast tokenizer)."""
    eng, _, _ = bert
    eng.tokenizer(TEXTS[0])  # as the routes call it (other tests here pad with it)
    eng.embed(TEXTS)
    eng.activate("sst")
    eng.classify(TEXTS)
    eng.restore()
    backend = eng.tokenizer.backend_tokenizer
    assert backend.padding is None and backend.truncation is None
    assert eng._batch_tokenizer.backend_tokenizer is not backend
    assert eng._batch_tokenizer(TEXTS[:1])["input_ids"] == eng.tokenizer(TEXTS[:1])["input_ids"]
