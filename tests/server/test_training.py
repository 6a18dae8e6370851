"""Fine-tuning the tiny real models: the loss drops, the checkpoint reloads, options hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.training import (
    RESULT_FILE,
    FinetuneError,
    encode_batch,
    evaluate,
    finetune,
    load_finetuned,
)
from storage.bases import BaseInfo, resolve_base
from storage.tasks import load_task

FAST = {"max_steps": 20, "batch_size": 8, "max_train": 16, "max_eval": 16, "lr": 3e-3}


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BaseInfo:
    return resolve_base(str(tiny_bert_dir), tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BaseInfo:
    return resolve_base(str(tiny_llama_dir), tmp_path_factory.mktemp("data"))


def test_classification_finetune_lowers_the_loss(tiny_bert: BaseInfo, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    result = finetune(tiny_bert, "rt-sentiment", out, **FAST)
    assert result.steps == 20 and len(result.losses) == 20
    assert result.loss_after < 0.8 * result.loss_before, result
    record = json.loads((out / RESULT_FILE).read_text())
    assert record["base_sha256"] == tiny_bert.sha256 and record["task"] == "rt-sentiment"
    assert record["settings"]["lr"] == 3e-3 and record["settings"]["optimizer"] == "adam"
    assert record["validation_metric"] == result.metric and record["validation_examples"] == 16
    model, _ = load_finetuned(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    # The saved checkpoint reproduces the metric computed in memory.
    assert evaluate(out, "rt-sentiment", "validation", limit=16) == result.metric


def test_the_new_head_is_not_reported_missing_but_other_missing_weights_are(
    tiny_bert: BaseInfo, tmp_path: Path, capfd, caplog
) -> None:
    """transformers' load report calls the new classification head MISSING, which is
    what a classification fine-tune is for: silenced. A base lacking another weight is
    still said, by a warning naming it."""
    import shutil

    from safetensors.torch import save_file

    from server.training import FinetuneOptions, _load_model

    opts = FinetuneOptions(**FAST)
    task = load_task("rt-sentiment")
    with caplog.at_level("WARNING", logger="server.training"):
        _load_model(tiny_bert, task, opts)
    err = capfd.readouterr().err
    assert "MISSING" not in err and "LOAD REPORT" not in err, err
    assert not [r for r in caplog.records if r.name == "server.training"]
    lacking = tmp_path / "lacking"
    shutil.copytree(tiny_bert.path, lacking)
    sd = load_file(lacking / "model.safetensors")
    del sd["pooler.dense.weight"]
    save_file(sd, lacking / "model.safetensors", metadata={"format": "pt"})
    other = resolve_base(str(lacking), tmp_path / "data")
    with caplog.at_level("WARNING", logger="server.training"):
        _load_model(other, task, opts)
    (rec,) = [r for r in caplog.records if r.name == "server.training"]
    assert "pooler.dense.weight" in rec.getMessage() and "classifier" not in rec.getMessage()
    # a base that already has a head of another size (3 labels) gets a new 2-label one
    from transformers import BertForSequenceClassification

    headed = tmp_path / "headed"
    BertForSequenceClassification.from_pretrained(tiny_bert.path, num_labels=3).save_pretrained(
        headed
    )
    shutil.copy(tiny_bert.path / "tokenizer.json", headed)
    caplog.clear()
    with caplog.at_level("WARNING", logger="server.training"):
        model, _ = _load_model(resolve_base(str(headed), tmp_path / "data"), task, opts)
    assert model.classifier.out_features == 2
    assert not [r for r in caplog.records if r.name == "server.training"]


def test_generation_finetune_lowers_the_loss_and_keeps_embeddings(
    tiny_llama: BaseInfo, tmp_path: Path
) -> None:
    out = tmp_path / "ft"
    result = finetune(tiny_llama, "arith", out, **FAST)
    # Per answer token: at least 0.5 nats better, i.e. its probability x1.65 on average.
    assert result.loss_after < result.loss_before - 0.5, result
    base = load_file(tiny_llama.path / "model.safetensors")
    tuned = load_file(out / "model.safetensors")
    emb = "model.embed_tokens.weight"
    assert "lm_head.weight" not in tuned  # still tied
    assert torch.equal(tuned[emb], base[emb])  # frozen by default for decoders
    changed = [k for k in base if k != emb and not torch.equal(tuned[k], base[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed


def test_generation_loss_counts_answer_tokens_only(tiny_llama: BaseInfo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = load_task("arith")
    tok = AutoTokenizer.from_pretrained(tiny_llama.path)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path)
    exs = task.train[:3]
    batch = encode_batch(task, exs, tok, model, max_length=128)
    for i, e in enumerate(exs):
        target = tok(e.target, add_special_tokens=False)["input_ids"] + [model.config.eos_token_id]
        labels = batch["labels"][i]
        assert labels[labels != -100].tolist() == target  # answer + EOS, nothing else
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, n - len(target) : n].tolist() == target


def test_lora_adapter(tiny_bert: BaseInfo, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    result = finetune(tiny_bert, "rt-sentiment", out, lora=True, rank=4, **FAST)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert result.loss_after < result.loss_before
    assert json.loads((out / RESULT_FILE).read_text())["format"] == "peft-lora"
    assert evaluate(out, "rt-sentiment", limit=16) == result.metric
    # A full fine-tune into the same folder replaces the adapter as a whole.
    finetune(tiny_bert, "rt-sentiment", out, **FAST | {"max_steps": 2})
    assert sorted(p.name for p in out.parent.iterdir()) == ["lora"]  # no temp folders left
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


def test_adamr_pulls_toward_the_base(tiny_bert: BaseInfo, tmp_path: Path) -> None:
    pytest.importorskip("pruning.adamr")
    opts = FAST | {"max_steps": 10}
    finetune(tiny_bert, "rt-sentiment", tmp_path / "adam", **opts)
    finetune(tiny_bert, "rt-sentiment", tmp_path / "adamr", optimizer="adamr-l2", reg=0.5, **opts)
    base = load_file(tiny_bert.path / "model.safetensors")

    def delta_norm(folder: Path) -> float:
        tuned = load_file(folder / "model.safetensors")
        return sum(float((tuned["bert." + k] - v).norm() ** 2) for k, v in base.items()) ** 0.5

    assert delta_norm(tmp_path / "adamr") < 0.9 * delta_norm(tmp_path / "adam")


def test_bad_combinations_are_refused(
    tiny_bert: BaseInfo, tiny_llama: BaseInfo, tmp_path: Path
) -> None:
    with pytest.raises(FinetuneError, match="encoder"):
        finetune(tiny_bert, "arith", tmp_path / "x", **FAST)
    with pytest.raises(FinetuneError, match="optimizer"):
        finetune(tiny_llama, "arith", tmp_path / "x", optimizer="sgd", **FAST)
    with pytest.raises(FinetuneError, match="--lora"):
        finetune(tiny_llama, "arith", tmp_path / "x", optimizer="adamr-l2", lora=True, **FAST)
    assert not (tmp_path / "x").exists()
