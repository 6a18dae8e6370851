"""Base catalog: real MiniLM and SmolLM2 offline, local folders, the weights hash, build_once."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from storage.bases import (
    HASH_CACHE,
    build_once,
    compute_weights_sha256,
    list_bases,
    resolve_base,
    weights_sha256,
)
from storage.errors import BadCheckpoint, UnknownBase


@pytest.fixture(scope="session")
def bases_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DAREX_DATA_DIR when set (CI: one per run, so SmolLM2 is converted once), else a temp dir."""
    env = os.environ.get("DAREX_DATA_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("darex-data")


def test_catalog_names() -> None:
    assert list_bases() == ["minilm-l6", "smollm2-135m"]


def test_unknown_base_lists_the_catalog(tmp_path: Path) -> None:
    with pytest.raises(UnknownBase) as e:
        resolve_base("gpt-17", tmp_path)
    assert "gpt-17" in str(e.value)
    assert "minilm-l6" in str(e.value) and "smollm2-135m" in str(e.value)


def test_folder_without_safetensors_is_refused(tmp_path: Path, tiny_bert_dir: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_bert_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BadCheckpoint, match="safetensors"):
        resolve_base(str(folder), tmp_path)


def test_local_folders_resolve_with_arch(
    tmp_path: Path, tiny_bert_dir: Path, tiny_llama_dir: Path
) -> None:
    bert = resolve_base(str(tiny_bert_dir), tmp_path)
    llama = resolve_base(tiny_llama_dir, tmp_path)
    assert (bert.arch, llama.arch) == ("encoder", "decoder")
    assert bert.path == tiny_bert_dir.resolve() and bert.name == str(tiny_bert_dir.resolve())
    assert resolve_base(bert.name, tmp_path) == bert  # the name resolves back to the same base
    assert len(bert.sha256) == 64 and bert.sha256 != llama.sha256


def test_hash_is_of_the_tensors_not_the_file(tmp_path: Path, tiny_bert_dir: Path) -> None:
    tensors = load_file(tiny_bert_dir / "model.safetensors")
    reference = compute_weights_sha256(tiny_bert_dir)
    # Same tensors, other layout: two shards with header metadata -> same hash.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::2]}, sharded / "a.safetensors", {"x": "1"})
    save_file({k: tensors[k] for k in names[1::2]}, sharded / "b.safetensors")
    assert compute_weights_sha256(sharded) == reference
    # One element changed -> another hash.
    changed = tmp_path / "changed"
    changed.mkdir()
    name = names[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    save_file(tensors, changed / "model.safetensors")
    assert compute_weights_sha256(changed) != reference


def test_hash_cache_is_used_and_invalidated(tmp_path: Path, tiny_bert_dir: Path) -> None:
    folder = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, folder)
    digest = weights_sha256(folder)
    cache = folder / HASH_CACHE
    record = json.loads(cache.read_text())
    assert record["sha256"] == digest
    cache.write_text(json.dumps(record | {"sha256": "cached"}))
    assert weights_sha256(folder) == "cached"  # not recomputed while sizes/mtimes match
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert weights_sha256(folder) == digest  # the file changed: recomputed


def test_build_once_builds_once_across_concurrent_callers(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(tmp: Path) -> None:
        calls.append(1)
        (tmp / "part1").write_text("a")
        time.sleep(0.3)  # the second caller arrives while the first one builds
        (tmp / "part2").write_text("b")

    dst = tmp_path / "bases" / "thing"
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(build_once(dst, build)))]
    threads.append(threading.Thread(target=lambda: results.append(build_once(dst, build))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(results) == [False, True]
    assert sorted(p.name for p in dst.iterdir()) == ["part1", "part2"]
    assert (dst.stat().st_mode & 0o777, (dst / "part1").stat().st_mode & 0o777) == (0o755, 0o644)
    assert [p.name for p in dst.parent.iterdir() if ".tmp-" in p.name] == []


def test_build_once_failure_leaves_nothing(tmp_path: Path) -> None:
    def build(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    dst = tmp_path / "thing"
    with pytest.raises(RuntimeError, match="disk full"):
        build_once(dst, build)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def _mean_pooled(model, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state  # (B, T, 384)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.slow
def test_minilm_similarity_orders_paraphrase_above_antonym(bases_data_dir: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    info = resolve_base("minilm-l6", bases_data_dir)
    assert info.arch == "encoder" and info.name == "minilm-l6"
    assert resolve_base("minilm-l6", bases_data_dir).sha256 == info.sha256
    model = AutoModel.from_pretrained(info.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    triples = [
        (
            "I love this restaurant, the food is delicious.",
            "This place serves amazing food and I adore it.",
            "I hate this restaurant, the food is disgusting.",
            "The train to Berlin leaves at noon.",
        ),
        (
            "The children are happy.",
            "The kids are cheerful.",
            "The children are sad.",
            "Paris is in France.",
        ),
    ]
    for anchor, paraphrase, antonym, unrelated in triples:
        v = _mean_pooled(model, tokenizer, [anchor, paraphrase, antonym, unrelated])
        sim = v[1:] @ v[0]  # cosine to the anchor
        assert sim[0] > sim[1] + 0.05, (anchor, sim.tolist())
        assert sim[2] < 0.2 < sim[1], (anchor, sim.tolist())


@pytest.mark.slow
def test_smollm2_converts_once_and_completes_a_prompt(bases_data_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = resolve_base("smollm2-135m", bases_data_dir)  # converts on first use (~20 s)
    assert info.arch == "decoder" and info.path == bases_data_dir / "bases" / "smollm2-135m"
    start = time.perf_counter()
    assert resolve_base("smollm2-135m", bases_data_dir) == info
    assert time.perf_counter() - start < 1.0  # cached folder and hash
    stored = load_file(info.path / "model.safetensors")
    assert "lm_head.weight" not in stored  # tied: stored once, as the embeddings
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(model.config, "quantization_config")
    enc = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    completion = tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
    assert completion.strip().startswith("Paris"), completion
