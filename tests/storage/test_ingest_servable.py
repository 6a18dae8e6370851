"""A fine-tune the base could not serve is refused by the ingest itself (`darex add`, the
library, the upload's job), before a blob is written: a task of the other architecture,
a classification head that is missing, of the wrong width, or with a row count its
labels disagree with. The same checks answer an upload with a 422 before a job exists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import server.cli.store  # noqa: F401  (registers the commands)
from storage.bases import resolve_base
from storage.errors import BadCheckpoint
from storage.ingest import ingest
from storage.store import DeltaStore
from tests.cli_util import run

OPTS = {"method": "dare", "p": 0.9, "show_progress": False}


@pytest.fixture(scope="module")
def cls_ft(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertForSequenceClassification fine-tune of the tiny base, 2 labels."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig.from_pretrained(tiny_bert_dir)
    cfg.num_labels, cfg.id2label = 2, {0: "neg", 1: "pos"}
    cfg.label2id = {"neg": 0, "pos": 1}
    cfg.architectures = ["BertForSequenceClassification"]
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, config=cfg)
    out = tmp_path_factory.mktemp("cls-ft")
    model.save_pretrained(out)
    return out


def variant(src: Path, dst: Path, *, config: dict | None = None, tensors=None) -> Path:
    """A copy of the fine-tune folder with its config and tensors edited."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if tensors is not None:
        f = dst / "model.safetensors"
        sd = load_file(f)
        save_file(tensors(sd), f, metadata={"format": "pt"})
    return dst


def _head_of_width(sd: dict) -> dict:
    sd["classifier.weight"] = torch.zeros(2, 7)
    return sd


def _five_rows(sd: dict) -> dict:
    sd["classifier.weight"] = torch.zeros(5, sd["classifier.weight"].shape[1])
    sd["classifier.bias"] = torch.zeros(5)
    return sd


def _no_head(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("classifier.")}


def _short_bias(sd: dict) -> dict:
    sd["classifier.bias"] = torch.zeros(3)
    return sd


CASES = {
    "causal-lm-config": (
        {"architectures": ["BertLMHeadModel"]},
        None,
        ("'causal-lm' (named by the architectures in config.json)", "an encoder", "--task"),
    ),
    "head-width": (None, _head_of_width, ("classifier.weight", "[2, 7]", "[labels, 64]")),
    "rows-vs-labels": (None, _five_rows, ("5 rows", "2 labels (neg, pos)")),
    "no-head": (None, _no_head, ("needs a classification head", "has none")),
    "bias": (None, _short_bias, ("classifier.bias", "[3]", "need [2]")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ingest_refuses_a_finetune_the_base_cannot_serve(
    case: str, cls_ft: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    config, tensors, words = CASES[case]
    ft = variant(cls_ft, tmp_path / case, config=config, tensors=tensors)
    store = DeltaStore(tmp_path / "data")
    base = resolve_base(str(tiny_bert_dir), store.root)
    with pytest.raises(BadCheckpoint) as e:
        ingest(store, "odd", ft, base, **OPTS)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert store.registry.list_models() == {}
    assert list(store.blobs.iter_keys()) == []  # refused before the first blob
    store.close()


def test_the_unmodified_classifier_is_stored(cls_ft: Path, tiny_bert_dir: Path, tmp_path) -> None:
    """The check's counterpart: the same fine-tune, untouched, is accepted."""
    store = DeltaStore(tmp_path / "data")
    res = ingest(store, "ok", cls_ft, resolve_base(str(tiny_bert_dir), store.root), **OPTS)
    assert (res.manifest.task, res.manifest.labels) == ("sequence-classification", ["neg", "pos"])
    store.close()


def test_darex_add_refuses_it_in_one_line_and_task_stores_it_as_embeddings(
    env: Path, cls_ft: Path, tmp_path: Path
) -> None:
    ft = variant(cls_ft, tmp_path / "llm", config={"architectures": ["BertLMHeadModel"]})
    r = run("add", "ll", str(ft), "--method", "dare", "--rate", "0.9")
    assert r.exit_code == 1 and "BadCheckpoint" in r.output and "an encoder" in r.output
    assert "Traceback" not in r.output
    assert "ll" not in run("ls").output.split()
    r = run(
        "add", "ll", str(ft), "--method", "dare", "--rate", "0.9", "--task", "feature-extraction"
    )
    assert r.exit_code == 0, r.output
    assert "feature-extraction" in run("ls").output
    r = run("add", "x", str(ft), "--task", "translation")
    assert r.exit_code == 2 and "--task: 'translation' is not one of" in r.output


@pytest.mark.parametrize("kind", ["missing", "folder", "binary"])
@pytest.mark.parametrize("option", ["--calib", "--val"])
def test_darex_add_names_the_option_of_a_file_it_cannot_read(
    env: Path, cls_ft: Path, tmp_path: Path, option: str, kind: str
) -> None:
    path = (
        {"missing": tmp_path / "nope.txt", "folder": tmp_path}[kind] if kind != "binary" else None
    )
    if kind == "binary":
        path = tmp_path / "bin.txt"
        path.write_bytes(b"\x00\xff\xfe\x80 not text")
    r = run("add", "m", str(cls_ft), "--method", "darex_q", option, str(path))
    why = {"missing": "no such file", "folder": "is a folder", "binary": "is not UTF-8"}[kind]
    assert r.exit_code == 2 and f"{option}: " in r.output and why in r.output, r.output
    assert not (env / "objects").exists()  # refused before the store is touched


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"lora_alpha": None}, '"lora_alpha" must be a number > 0, got null'),
        ({"r": None}, '"r" must be an integer > 0, got null'),
        ({"r": 2.5}, '"r" must be an integer > 0, got 2.5'),
        ({"r": True}, '"r" must be an integer > 0, got true'),
        ({"lora_alpha": -4}, '"lora_alpha" must be a number > 0, got -4'),
        ({"rank_pattern": ["query"]}, '"rank_pattern" must be an object'),
        ({"alpha_pattern": {"query": "x"}}, '"alpha_pattern" \'query\': "x" is not > 0'),
        ({"rank_pattern": {"(": 2}}, "\"rank_pattern\" '(' is not a pattern"),
    ],
)
def test_a_lora_config_with_bad_numbers_is_a_bad_checkpoint_naming_the_field(
    tmp_path: Path, fields: dict, words: str
) -> None:
    """PEFT writes these fields; a hand-edited or foreign config got a TypeError before."""
    from storage.lora import read_adapter

    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **fields}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    key = "base_model.model.encoder.layer.0.attention.self.query"
    save_file(
        {f"{key}.lora_A.weight": torch.zeros(2, 8), f"{key}.lora_B.weight": torch.zeros(8, 2)},
        tmp_path / "adapter_model.safetensors",
    )
    with pytest.raises(BadCheckpoint) as e:
        read_adapter(tmp_path)
    assert words in str(e.value)
