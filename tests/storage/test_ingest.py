"""Ingest of real (tiny) transformers fine-tunes: validation, pruning, storage, crash safety."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pruning.errors import PruningError
from pruning.sparse import kept_indices
from storage.bases import resolve_base
from storage.errors import BadCheckpoint, BaseMismatch, InvalidModelId, ModelExists
from storage.ingest import ingest
from storage.modelid import validate_model_id
from storage.store import DeltaStore

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ingest_worker.py")


def add_noise(model: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def bert_ft(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertForSequenceClassification fine-tune of the tiny base (names prefixed 'bert.')."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig.from_pretrained(tiny_bert_dir)
    cfg.num_labels, cfg.id2label = 3, {0: "neg", 1: "neutral", 2: "pos"}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    cfg.architectures = ["BertForSequenceClassification"]
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, config=cfg).eval()
    add_noise(model, 1e-3, seed=1)
    out = tmp_path_factory.mktemp("bert-ft")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_ft(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    add_noise(model, 1e-3, seed=2)
    with torch.no_grad():  # a fine-tune that leaves the final norm untouched
        model.model.norm.weight.copy_(
            LlamaForCausalLM.from_pretrained(tiny_llama_dir).model.norm.weight
        )
    out = tmp_path_factory.mktemp("llama-ft")
    model.save_pretrained(out)
    return out


@pytest.fixture
def store(tmp_path: Path) -> DeltaStore:
    return DeltaStore(tmp_path / "data")


def base_of(folder: Path, store: DeltaStore):
    return resolve_base(str(folder), store.root)


def test_full_finetune_roundtrip_reproduces_the_model(bert_ft, tiny_bert_dir, store) -> None:
    """p=0 keeps every entry: base + stored delta (fp32) + extras gives the fine-tune's logits."""
    from transformers import BertForSequenceClassification

    base = base_of(tiny_bert_dir, store)
    seen: list[float] = []
    res = ingest(
        store,
        "cls-exact",
        bert_ft,
        base,
        method="dare",
        p=0.0,
        value_dtype="float32",
        progress=lambda f, _m: seen.append(f),
        show_progress=False,
    )
    m = store.manifest("cls-exact")
    assert m == res.manifest
    assert (m.task, m.labels, m.source) == (
        "sequence-classification",
        ["neg", "neutral", "pos"],
        "full",
    )
    assert not any(k.startswith("bert.") for k in m.deltas)  # keyed by the base's own names
    assert set(m.extras) == {"classifier.weight", "classifier.bias"}
    assert seen[-1] == 1.0 and seen == sorted(seen)

    base_sd = load_file(next(tiny_bert_dir.glob("*.safetensors")))
    state = {}
    for name, entry in m.deltas.items():
        w = base_sd[name].clone().flatten()
        dd = store.load_delta(entry)
        w.index_add_(0, dd.indices, dd.values.float())
        state["bert." + name] = w.view(base_sd[name].shape)
    for name, entry in m.extras.items():
        state[name] = store.load_dense(entry)
    ft = BertForSequenceClassification.from_pretrained(bert_ft).eval()
    rebuilt = BertForSequenceClassification.from_pretrained(bert_ft).eval()
    rebuilt.load_state_dict(state, strict=False)
    ids = torch.randint(0, 30000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, ft(ids).logits, rtol=0, atol=1e-5)


def test_dare_delta_is_the_seed_mask_rescaled(bert_ft, tiny_bert_dir, store) -> None:
    base = base_of(tiny_bert_dir, store)
    m = ingest(
        store, "cls-99", bert_ft, base, method="dare", p=0.9, seed=5, show_progress=False
    ).manifest
    name = "encoder.layer.1.intermediate.dense.weight"
    entry = m.deltas[name]
    assert (entry.encoding, entry.pruned) == ("seed", True)
    assert entry.scale == pytest.approx(10.0)
    dd = store.load_delta(entry)
    assert torch.equal(dd.indices, kept_indices(5, name, 0.9, 128 * 64))
    d = (
        load_file(next(bert_ft.glob("*.safetensors")))["bert." + name]
        - load_file(next(tiny_bert_dir.glob("*.safetensors")))[name]
    ).flatten()
    torch.testing.assert_close(dd.values.float(), (d[dd.indices] * 10).half().float())
    assert 1 / 12 < m.ratio < 1 / 8  # ~10% of the entries, fp16 values, no indices


def test_decoder_keeps_norms_and_embeddings_exact(llama_ft, tiny_llama_dir, store) -> None:
    base = base_of(tiny_llama_dir, store)
    m = ingest(store, "lm", llama_ft, base, method="dare", p=0.99, show_progress=False).manifest
    assert m.task == "causal-lm" and m.extras == {}
    q = m.deltas["model.layers.0.self_attn.q_proj.weight"]
    assert q.pruned and q.encoding == "seed"
    emb = m.deltas["model.embed_tokens.weight"]
    assert not emb.pruned and emb.value_dtype == "float32"
    assert "model.norm.weight" not in m.deltas  # an unchanged tensor costs nothing
    base_sd = load_file(next(tiny_llama_dir.glob("*.safetensors")))
    ft_sd = load_file(next(llama_ft.glob("*.safetensors")))
    name = "model.layers.1.input_layernorm.weight"
    dd = store.load_delta(m.deltas[name])
    assert torch.equal(dd.to_dense(), ft_sd[name] - base_sd[name])


def _copy_ckpt(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(next(src.glob("*.safetensors")))
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


def _dare(store: DeltaStore, model_id: str, folder: Path, base_dir: Path, **kw):
    """Ingest ``folder`` with DARE (p = 0.9 unless given), quietly."""
    kw = {"method": "dare", "p": 0.9, "show_progress": False, **kw}
    return ingest(store, model_id, folder, base_of(base_dir, store), **kw)


def test_shape_mismatch_names_tensor_and_shapes(bert_ft, tiny_bert_dir, store, tmp_path) -> None:
    name = "bert.encoder.layer.0.output.dense.weight"
    bad = _copy_ckpt(bert_ft, tmp_path / "bad", lambda sd: sd.update({name: torch.zeros(64, 100)}))
    with pytest.raises(BaseMismatch, match=r"output\.dense\.weight.*\(64, 128\).*\(64, 100\)"):
        ingest(
            store,
            "bad",
            bad,
            base_of(tiny_bert_dir, store),
            method="dare",
            p=0.9,
            show_progress=False,
        )
    assert store.models() == {}


def test_wrong_base_is_refused(llama_ft, tiny_bert_dir, store) -> None:
    with pytest.raises(BaseMismatch, match="wrong base"):
        ingest(
            store,
            "x",
            llama_ft,
            base_of(tiny_bert_dir, store),
            method="dare",
            p=0.9,
            show_progress=False,
        )


def test_pickle_checkpoints_are_refused(bert_ft, tiny_bert_dir, store, tmp_path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((bert_ft / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    for target in (folder, folder / "pytorch_model.bin"):
        with pytest.raises(BadCheckpoint, match="pickle"):
            ingest(
                store,
                "p",
                target,
                base_of(tiny_bert_dir, store),
                method="dare",
                p=0.9,
                show_progress=False,
            )


def test_bad_values_are_refused_before_any_write(bert_ft, tiny_bert_dir, store, tmp_path):
    def poison(sd):  # the new head is stored last: a late check would have written every delta
        sd["classifier.weight"][0, 0] = float("nan")

    bad = _copy_ckpt(bert_ft, tmp_path / "nan", poison)
    with pytest.raises(BadCheckpoint, match=r"classifier\.weight.*NaN"):
        _dare(store, "nan", bad, tiny_bert_dir)
    assert store.models() == {}
    assert list(store.blobs.iter_keys()) == []


def test_a_float64_head_is_stored_as_float32_and_one_past_its_range_is_refused(
    bert_ft, tiny_bert_dir, store, tmp_path
) -> None:
    """The codec keeps 16- and 32-bit floats: a float64 head (the tensor stored last) is
    stored as its float32 rounding; a value float32 cannot hold is refused by name before
    any blob is written."""

    def to_f64(sd):
        for n in ("classifier.weight", "classifier.bias"):
            sd[n] = sd[n].double() + 1e-12  # below float32's resolution

    f64 = _copy_ckpt(bert_ft, tmp_path / "f64", to_f64)
    m = _dare(store, "f64", f64, tiny_bert_dir).manifest
    want = load_file(f64 / "model.safetensors")
    for n in ("classifier.weight", "classifier.bias"):
        e = m.extras[n]
        assert (e.dtype, e.value_dtype) == ("float32", "float32")
        assert torch.equal(store.load_delta(e).to_dense(), want[n].float())
    kept = set(store.blobs.iter_keys())

    def past_range(sd):
        to_f64(sd)
        sd["classifier.weight"][1, 2] = 1e300

    bad = _copy_ckpt(bert_ft, tmp_path / "f64-big", past_range)
    with pytest.raises(BadCheckpoint, match=r"classifier\.weight.*1 value\(s\) past float32"):
        _dare(store, "big", bad, tiny_bert_dir)
    assert set(store.models()) == {"f64"} and set(store.blobs.iter_keys()) == kept


def test_the_manifest_names_the_value_dtype_a_blob_holds(
    bert_ft, tiny_bert_dir, store, tmp_path
) -> None:
    """DARE at p = 0.999 scales by 1e3: a delta of 70 becomes 70,000, past float16, and its
    blob keeps float32 values; the manifest says so, not the float16 that was asked for."""
    name = "bert.encoder.layer.0.output.dense.weight"
    big = _copy_ckpt(bert_ft, tmp_path / "big", lambda sd: sd[name].add_(70.0))
    m = _dare(store, "big", big, tiny_bert_dir, p=0.999, seed=1).manifest
    entry = m.deltas[name.removeprefix("bert.")]
    assert entry.nnz > 0 and entry.value_dtype == "float32"
    assert store.load_delta(entry).values.dtype == torch.float32
    small = m.deltas["encoder.layer.1.output.dense.weight"]
    assert small.value_dtype == "float16" and store.load_delta(small).values.dtype == torch.float16


def test_darex_q_without_q_is_refused_before_any_write(bert_ft, tiny_bert_dir, store) -> None:
    base = base_of(tiny_bert_dir, store)
    with pytest.raises(PruningError, match="darex_q needs q"):
        ingest(store, "noq", bert_ft, base, method="darex_q", p=0.9, show_progress=False)
    assert store.models() == {}
    assert list(store.blobs.iter_keys()) == []


def test_failure_midway_leaves_no_entry_and_gc_cleans(bert_ft, tiny_bert_dir, store):
    base = base_of(tiny_bert_dir, store)
    other = ingest(store, "other", bert_ft, base, method="magnitude", p=0.5, show_progress=False)

    def race(_fraction: float, stage: str) -> None:
        # Another upload takes the same model_id after every blob was written.
        if stage == "registering":
            store.registry.set_model("racy", other.manifest_key)

    kept = set(store.blobs.iter_keys())
    with pytest.raises(ModelExists):
        ingest(
            store, "racy", bert_ft, base, method="dare", p=0.9, progress=race, show_progress=False
        )
    assert store.manifest("racy") == other.manifest  # the winner's entry, untouched
    store.registry.delete_model("racy")
    orphans = set(store.blobs.iter_keys()) - kept
    assert len(orphans) > 30
    assert store.verify().ok
    assert store.gc(grace_s=3600).deleted == 0  # young blobs may belong to an ingest in flight
    report = store.gc(grace_s=0)
    assert report.deleted == len(orphans) and set(store.blobs.iter_keys()) == kept


def test_existing_id_needs_replace(bert_ft, tiny_bert_dir, store) -> None:
    base = base_of(tiny_bert_dir, store)
    ingest(store, "dup", bert_ft, base, method="dare", p=0.9, show_progress=False)
    with pytest.raises(ModelExists):
        ingest(store, "dup", bert_ft, base, method="magnitude", p=0.9, show_progress=False)
    ingest(
        store, "dup", bert_ft, base, method="magnitude", p=0.9, replace=True, show_progress=False
    )
    m = store.manifest("dup")
    assert m.method == "magnitude"
    assert {e.encoding for e in m.deltas.values()} == {"explicit"}
    assert store.gc(grace_s=0).deleted > 0  # the replaced manifest's seed blobs
    assert store.verify().ok


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a/b",
        "a\\b",
        "..",
        "a..b",
        "../etc",
        "-lead",
        ".hidden",
        "x" * 129,
        "sp ace",
        "é",
        "a\nb",
        "a;b",
    ],
)
def test_invalid_model_ids(bad: str) -> None:
    with pytest.raises(InvalidModelId):
        validate_model_id(bad)


@pytest.mark.parametrize("good", ["sst2", "cola-v1.2", "org:model_7", "A" * 128, "0"])
def test_valid_model_ids(good: str) -> None:
    assert validate_model_id(good) == good


def _worker(data_dir: Path, model_id: str, ckpt: Path, base: Path, delay: float = 0.0):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(data_dir), model_id, str(ckpt), str(base), str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_sigkill_mid_ingest_leaves_a_store_verify_passes_and_gc_cleans(
    bert_ft, tiny_bert_dir, tmp_path
) -> None:
    data = tmp_path / "data"
    store = DeltaStore(data)
    base = base_of(tiny_bert_dir, store)  # hash cached before the race
    ingest(store, "keep", bert_ft, base, method="dare", p=0.99, show_progress=False)
    kept = set(store.blobs.iter_keys())
    proc = _worker(data, "victim", bert_ft, tiny_bert_dir, delay=0.05)
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("progress") and float(line.split()[1]) > 0.4:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert set(store.models()) == {"keep"}
    assert len(set(store.blobs.iter_keys()) - kept) > 5  # it did write blobs
    assert store.verify().ok
    store.gc(grace_s=0)
    assert set(store.blobs.iter_keys()) == kept
    assert not any((data / "tmp").iterdir())
    assert store.verify().ok


def test_two_concurrent_ingests_store_each_blob_once(bert_ft, tiny_bert_dir, tmp_path) -> None:
    data = tmp_path / "data"
    store = DeltaStore(data)
    base_of(tiny_bert_dir, store)
    procs = [_worker(data, mid, bert_ft, tiny_bert_dir) for mid in ("twin-a", "twin-b")]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    a, b = store.manifest("twin-a"), store.manifest("twin-b")
    assert a.keys() == b.keys()  # deterministic encoding: the same bytes, the same keys
    files = [f for f in (data / "objects").rglob("*") if f.is_file()]
    mkeys = {store.registry.get_model("twin-a"), store.registry.get_model("twin-b")}
    assert len(files) == len(a.keys() | mkeys)
    assert store.verify().ok


def test_lora_adapter_is_stored_as_ba_scaled(tiny_llama_dir, store, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    peft_model.save_pretrained(tmp_path / "adapter")
    # an adapter that does not say its task (task_type is optional in PEFT): on a decoder
    # base it is a causal LM, as an upload of it is
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "task_type": None}))
    m = ingest(
        store,
        "lora",
        tmp_path / "adapter",
        base_of(tiny_llama_dir, store),
        method="dare",
        p=0.5,
        value_dtype="float32",
        show_progress=False,
    ).manifest
    assert (m.source, m.task) == ("lora", "causal-lm")
    assert len(m.deltas) == 4 and all("q_proj" in k or "v_proj" in k for k in m.deltas)
    merged = peft_model.merge_and_unload().state_dict()
    base_sd = load_file(next(tiny_llama_dir.glob("*.safetensors")))
    name = "model.layers.1.self_attn.v_proj.weight"
    d = (merged[name] - base_sd[name]).flatten()
    dd = store.load_delta(m.deltas[name])
    torch.testing.assert_close(dd.values * 0.5, d[dd.indices], atol=1e-6, rtol=1e-4)


def test_without_a_method_the_recommended_one_is_used(bert_ft, tiny_bert_dir, store) -> None:
    m = ingest(
        store, "auto", bert_ft, base_of(tiny_bert_dir, store), p=0.9, show_progress=False
    ).manifest
    assert m.method in {"dare", "magnitude"} and "delta" in m.reason
    assert store.verify().ok


CALIB = [f"sample {i}: a short review of a film, a meal or a trip" for i in range(16)]


def test_calibration_texts_choose_darex_q_and_its_q(bert_ft, tiny_bert_dir, store) -> None:
    """With unlabeled texts a moderate delta is stored as DAREx-q, q by the output change
    on the very mask that is stored; without them it stays DARE."""
    from storage.checkpoint import open_checkpoint
    from storage.qsearch import outchange_q

    base = base_of(tiny_bert_dir, store)
    plain = ingest(store, "plain", bert_ft, base, p=0.999, show_progress=False).manifest
    assert plain.method == "dare" and "no labels" in plain.reason
    m = ingest(store, "cq", bert_ft, base, p=0.999, calib_texts=CALIB, show_progress=False).manifest
    assert m.method == "darex_q" and "output change" in m.reason
    assert 0.001 - 1e-9 <= m.q <= 0.01 + 1e-9 and m.q != pytest.approx(0.001)
    # the same search run by hand gives the same q; given darex_q alone, ingest searches it
    b, f = open_checkpoint(tiny_bert_dir), open_checkpoint(bert_ft)
    deltas = {n: f.get(f"bert.{n}") - b.get(n) for n in m.deltas}
    assert outchange_q(base.path, "encoder", deltas, CALIB, 0.999) == pytest.approx(m.q)
    m2 = ingest(
        store,
        "cq2",
        bert_ft,
        base,
        method="darex_q",
        p=0.999,
        calib_texts=CALIB,
        show_progress=False,
    ).manifest
    assert m2.q == pytest.approx(m.q)
    for name, e in m.deltas.items():  # scale 1/q on the DARE mask
        assert e.scale == pytest.approx(1.0 / m.q), name
    assert store.verify().ok


def test_labeled_examples_search_q_on_the_stored_mask(bert_ft, tiny_bert_dir, store) -> None:
    """Labeled ``val`` rows: DAREx-q with q for the best accuracy on them, the same q
    ``storage.labeled.labeled_q`` finds by hand; a label the fine-tune lacks stores nothing."""
    from storage.checkpoint import open_checkpoint
    from storage.labeled import labeled_q, read_labeled

    base = base_of(tiny_bert_dir, store)
    raw = "\n".join(
        json.dumps({"text": t, "label": ["neg", "neutral", "pos"][i % 3]})
        for i, t in enumerate(CALIB)
    )
    rows = read_labeled(raw)
    m = ingest(
        store, "lq", bert_ft, base, method="darex_q", p=0.99, val=rows, show_progress=False
    ).manifest
    assert m.method == "darex_q" and f"by accuracy on {len(CALIB)} labeled examples" in m.reason
    b, f = open_checkpoint(tiny_bert_dir), open_checkpoint(bert_ft)
    deltas = {n: f.get(f"bert.{n}") - b.get(n) for n in m.deltas}
    found = labeled_q(bert_ft, base.path, "encoder", deltas, rows, 0.99)
    assert found.q == pytest.approx(m.q) and found.score >= found.dare
    assert f"q={found.q:g}" in m.reason
    for name, e in m.deltas.items():  # scale 1/q on the DARE mask
        assert e.scale == pytest.approx(1.0 / m.q), name
    before = set(store.blobs.iter_keys())
    bad = read_labeled(raw + '\n{"text": "one more", "label": "positive"}')
    with pytest.raises(PruningError, match=r"line 17: label 'positive' is not one of"):
        ingest(store, "lq2", bert_ft, base, method="darex_q", p=0.99, val=bad, show_progress=False)
    assert set(store.blobs.iter_keys()) == before and "lq2" not in store.registry.list_models()
    assert store.verify().ok


def test_labeled_examples_compare_a_recommended_darex_q_with_magnitude(
    tiny_bert_dir, store, tmp_path
) -> None:
    """With labeled rows and no method, ingest scores the searched DAREx-q, magnitude and
    WANDA on them and stores the best: a heavy-tailed delta is stored as its top entries
    (magnitude, explicit indices, no q), and the reason gives every score. A requested
    darex_q is only given its q."""
    from pruning.methods import prune_tensor
    from storage.checkpoint import open_checkpoint
    from storage.labeled import read_labeled
    from tests.pruning.test_labeled import TEXTS, _classify
    from tests.server.finetunes import LABELS, save_spiky_classifier

    ft = save_spiky_classifier(tiny_bert_dir, tmp_path / "spiky", TEXTS)
    labels = _classify(ft, TEXTS)
    rows = read_labeled(
        "\n".join(
            json.dumps({"text": t, "label": LABELS[y]}) for t, y in zip(TEXTS, labels, strict=True)
        )
    )
    base = base_of(tiny_bert_dir, store)
    m = ingest(store, "spiky", ft, base, p=0.9, val=rows, show_progress=False).manifest
    assert (m.method, m.q) == ("magnitude", None)  # 30 % of the entries moved: no shortcut
    assert re.search(r"DARE [\d.]+.*; magnitude [\d.]+, wanda [\d.]+; chose magnitude", m.reason)
    b, f = open_checkpoint(tiny_bert_dir), open_checkpoint(ft)
    for name, e in m.deltas.items():
        if not e.pruned:
            continue
        d = f.get(f"bert.{name}") - b.get(name)
        want = prune_tensor("magnitude", d, 0.9, name=name)
        got = store.load_delta(e)
        assert e.encoding == "explicit" and torch.equal(got.indices, want.indices), name
        torch.testing.assert_close(got.values.float(), want.values.half().float())
    asked = ingest(
        store, "spiky-q", ft, base, method="darex_q", p=0.9, val=rows, show_progress=False
    ).manifest
    assert asked.method == "darex_q" and asked.q is not None and "chose" not in asked.reason
    assert store.verify().ok


def test_wanda_weighs_the_delta_by_input_norms_on_the_calibration_texts(
    bert_ft, tiny_bert_dir, store
) -> None:
    """method wanda measures each linear input's norm on the calibration texts through the
    fine-tune and keeps the top |d| * ||X_j|| of each row, as ``pruning.methods.wanda``
    does with norms taken on the fine-tuned model; tensors with no linear input take
    magnitude. Without texts it is refused before anything is written."""
    from transformers import AutoModel, AutoTokenizer

    from pruning.calib import capture
    from pruning.methods import prune_tensor
    from storage.checkpoint import open_checkpoint

    base = base_of(tiny_bert_dir, store)
    before = set(store.blobs.iter_keys())
    with pytest.raises(PruningError, match="method wanda needs calibration texts"):
        ingest(store, "w0", bert_ft, base, method="wanda", p=0.9, show_progress=False)
    assert set(store.blobs.iter_keys()) == before and "w0" not in store.registry.list_models()
    m = ingest(
        store, "w", bert_ft, base, method="wanda", p=0.9, calib_texts=CALIB, show_progress=False
    ).manifest
    assert m.method == "wanda"
    model = AutoModel.from_pretrained(bert_ft).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        norms = {
            k: s.col_norm
            for k, s in capture(
                model, [dict(tok(CALIB, padding=True, return_tensors="pt"))]
            ).items()
        }
    b, f = open_checkpoint(tiny_bert_dir), open_checkpoint(bert_ft)
    kinds = set()
    for name, e in m.deltas.items():
        if not e.pruned:
            continue
        d = f.get(f"bert.{name}") - b.get(name)
        linear = name in norms and d.dim() == 2
        kinds.add(linear)
        want = (
            prune_tensor("wanda", d, 0.9, name=name, col_norm=norms[name])
            if linear
            else prune_tensor("magnitude", d, 0.9, name=name)
        )
        assert torch.equal(store.load_delta(e).indices, want.indices), name
    assert kinds == {True, False}  # both linear weights and others were pruned
    assert store.verify().ok


def test_a_heavy_tailed_delta_with_calibration_texts_is_stored_as_wanda(
    tiny_bert_dir, store, tmp_path
) -> None:
    """The recommended method for a delta a few entries carry (spread > 3), with texts
    to measure input norms on, is WANDA, and ingest measures them (it used to fail)."""
    from tests.pruning.test_labeled import TEXTS
    from tests.server.finetunes import save_spiky_classifier

    ft = save_spiky_classifier(tiny_bert_dir, tmp_path / "spiky", TEXTS)
    base = base_of(tiny_bert_dir, store)
    m = ingest(store, "sw", ft, base, p=0.9, calib_texts=TEXTS, show_progress=False).manifest
    assert m.method == "wanda" and "spread" in m.reason, m.reason
    assert {e.encoding for e in m.deltas.values() if e.pruned} == {"explicit"}
    assert store.verify().ok


def test_a_lacking_weight_is_warned_about_and_a_lacking_integer_buffer_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """BERT checkpoints carry ``embeddings.position_ids`` (int64), which newer transformers
    no longer save: a fine-tune without it loses nothing and gets no warning."""
    from storage.checkpoint import open_checkpoint, plan_against_base

    pos = "embeddings.position_ids"
    base = {"a.weight": torch.ones(4, 4), "b.weight": torch.ones(4), pos: torch.arange(8)}
    save_file(base, tmp_path / "base.safetensors")
    for lacking, warned in ((pos, False), ("b.weight", True)):
        ft = {k: v for k, v in base.items() if k != lacking}
        save_file(ft, tmp_path / "ft.safetensors")
        caplog.clear()
        with caplog.at_level("WARNING", logger="storage.checkpoint"):
            plan = plan_against_base(
                open_checkpoint(tmp_path / "ft.safetensors"),
                open_checkpoint(tmp_path / "base.safetensors"),
            )
        assert plan.missing == [lacking]
        assert ("lacks base tensors ['b.weight']" in caplog.text) is warned, caplog.text
