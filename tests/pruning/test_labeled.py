"""DAREx-q's q searched on labeled examples (``storage.labeled``, ``darex prune --q labeled``).

The examples are labeled with the fine-tune's own predictions, so the unpruned model
scores 100; the search must report, for the q it picks, exactly the metric the written
checkpoint gets, and never less than plain DARE on the same mask.
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import server.cli.prune  # noqa: F401  (registers the commands)
from pruning.errors import PruningError
from pruning.sparse import keep_mask
from server.cli import app
from storage.labeled import read_labeled
from storage.predict import predict
from storage.tasks import Example, Task
from tests.server.finetunes import (
    LABELS,
    save_causal_finetune,
    save_classifier_finetune,
    save_spiky_classifier,
    spread_head,
)

runner = CliRunner()
RMS = 1e-2  # the classifier's delta: DARE at p = 0.9 loses labels, larger q win some back
ADJ = ("long", "short", "odd", "quiet", "loud", "new")
VERDICT = ("dull", "great", "fine", "bad", "warm", "cold", "slow", "fun")
TEXTS = [f"review {i}: the {a} film was {v}" for i, (a, v) in enumerate(product(ADJ, VERDICT))]


def _classify(folder: Path, texts: list[str]) -> list[int]:
    """Argmax labels of a saved classifier, with plain transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return model(**enc).logits.argmax(-1).tolist()


@pytest.fixture(scope="module")
def classifier_ft(tiny_bert_dir, tmp_path_factory) -> Path:
    """A 3-label classifier whose head reads the part of the pooled output that varies
    across TEXTS (random weights, centred on their mean), so its labels vary."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    out = save_classifier_finetune(tiny_bert_dir, tmp_path_factory.mktemp("cls") / "ft", seed=4)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    base = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the encoder: base + a dense Gaussian delta of rms RMS
        for name, prm in model.bert.named_parameters():
            prm.copy_(base[name] + torch.randn(prm.shape, generator=g) * RMS)
    spread_head(model, tok, TEXTS)
    model.save_pretrained(out)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / f).write_bytes((tiny_bert_dir / f).read_bytes())
    return out


def _said(res: Any) -> str:
    """The command's output on one line (rich wraps long messages)."""
    return " ".join(res.output.split())


def _run(*args: object) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def test_read_labeled_names_the_bad_line() -> None:
    rows = read_labeled('{"text": "a", "label": "positive"}\n\n{"text": "b", "label": 2}\n')
    assert [r["line"] for r in rows] == [1, 3] and rows[1]["label"] == 2
    cases = [
        ("not json", "line 1: not a JSON object"),
        ('{"text": "a"}', "exactly one of 'label' or 'target'"),
        ('{"text": "a", "label": 1, "target": "x"}', "exactly one of"),
        ('{"text": " ", "label": 1}', "'text' must be a non-empty string"),
        ('{"text": "a", "target": ""}', "'target' must be a non-empty string"),
        ('{"text": "a", "label": true}', "'label' must be a label name or an index"),
        ('{"text": "a", "label": 1}\n{"text": "b", "target": "x"}', "line 2: mixes"),
        ("[1, 2]", "line 1: not a JSON object"),
        ("\n \n", "no labeled example"),
    ]
    for raw, msg in cases:
        with pytest.raises(PruningError, match=msg.replace("(", r"\(")):
            read_labeled(raw)


def test_prune_labeled_q_on_a_classifier(tiny_bert_dir, classifier_ft, tmp_path) -> None:
    labels = _classify(classifier_ft, TEXTS)
    assert len(set(labels)) == len(LABELS)  # a metric between 0 and 1, not all-or-nothing
    val = tmp_path / "val.jsonl"
    val.write_text(
        "\n".join(
            json.dumps({"text": t, "label": LABELS[y]}) for t, y in zip(TEXTS, labels, strict=True)
        )
    )
    out = tmp_path / "out"
    args = ["--method", "darex_q", "--rate", "0.9", "--q", "labeled", "--val", val, "--seed", "1"]
    text = _run("prune", tiny_bert_dir, classifier_ft, *args, "--out", out)
    summary = json.loads((out / "darex_prune.json").read_text())
    q = float(summary["q"].removeprefix("labeled="))
    rep = summary["val"]
    assert f"q={q:g} by accuracy on {len(TEXTS)} labeled examples" in text
    assert rep["unpruned"] == 1.0 and rep["n"] == len(TEXTS)
    tried = dict((round(a, 9), b) for a, b in rep["tried"])
    assert tried[0.1] == rep["dare"]  # q = 1-p: plain DARE, always tried
    assert rep["q"] == max(tried.values()) >= rep["dare"]
    assert tried[round(q, 9)] == rep["q"]
    scales = {k: v["scale"] for k, v in summary["tensors"].items()}
    assert all(s == pytest.approx(1.0 / q) for s in scales.values())
    # the stored checkpoint scores what the search reported for its q
    got = _classify(out, TEXTS)
    assert sum(a == b for a, b in zip(got, labels, strict=True)) / len(TEXTS) == rep["q"]
    # and it is base + the seed-1 DARE mask of the delta, scaled by 1/q
    name = "bert.encoder.layer.1.output.dense.weight"
    base = load_file(tiny_bert_dir / "model.safetensors")["encoder.layer.1.output.dense.weight"]
    ft = load_file(classifier_ft / "model.safetensors")[name]
    w = load_file(out / "model.safetensors")[name]
    mask = keep_mask(1, "encoder.layer.1.output.dense.weight", 0.9, w.numel()).view(w.shape)
    assert torch.allclose(w, base + (ft - base) * mask / q, atol=1e-6)


def test_prune_labeled_q_on_a_decoder(tiny_llama_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ft = save_causal_finetune(tiny_llama_dir, tmp_path / "ft", seed=3)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [f"Q: what is {i} plus {i + 3}?\nA:" for i in range(24)]
    gen = Task("t", "generation", (), [], [], [], "prefix", max_new_tokens=2)
    model = AutoModelForCausalLM.from_pretrained(ft).eval()
    targets = predict(model, tok, gen, [Example(p) for p in prompts])
    rows = [(p, t) for p, t in zip(prompts, targets, strict=True) if t.strip()]
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps({"text": p, "target": t}) for p, t in rows))
    out = tmp_path / "out"
    args = ["--method", "darex_q", "--rate", "0.75", "--q", "labeled", "--val", val]
    text = _run("prune", tiny_llama_dir, ft, *args, "--out", out)
    rep = json.loads((out / "darex_prune.json").read_text())["val"]
    assert rep["metric"] == "prefix" and f"on {len(rows)} labeled examples" in text
    assert rep["q"] >= rep["dare"]
    exs = [Example(p, target=t) for p, t in rows]
    longest = max(len(tok(t, add_special_tokens=False)["input_ids"]) for _, t in rows)
    task = Task("t", "generation", (), [], exs, [], "prefix", max_new_tokens=longest + 1)
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    preds = predict(pruned, tok, task, exs, max_length=128)
    assert task.metric(preds, [t for _, t in rows]) == rep["q"]


def test_prune_labeled_q_refuses_bad_input(tiny_bert_dir, tiny_llama_dir, classifier_ft, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "a film", "label": "positive"}\n{"text": "b", "label": "great"}\n')
    base = ["prune", str(tiny_bert_dir), str(classifier_ft), "--out", str(tmp_path / "o")]
    res = runner.invoke(app, [*base, "--method", "darex_q", "--q", "labeled", "--val", str(val)])
    assert res.exit_code == 1 and "line 2: label 'great' is not one of the fine-tune's" in _said(
        res
    )
    assert not (tmp_path / "o" / "model.safetensors").exists()
    res = runner.invoke(app, [*base, "--method", "darex_q", "--q", "labeled"])
    assert res.exit_code != 0 and "--val FILE" in _said(res)
    res = runner.invoke(app, [*base, "--method", "dare", "--val", str(val)])
    assert res.exit_code != 0 and "--q labeled" in _said(res)
    val.write_text('{"text": "a film", "target": "positive"}\n')
    res = runner.invoke(app, [*base, "--method", "darex_q", "--q", "labeled", "--val", str(val)])
    assert res.exit_code == 1 and "takes 'label' lines, not 'target'" in _said(res)
    res = runner.invoke(
        app,
        [
            "prune",
            str(tiny_bert_dir),
            str(tiny_bert_dir),
            "--out",
            str(tmp_path / "o2"),
            "--method",
            "darex_q",
            "--q",
            "labeled",
            "--val",
            str(val),
        ],
    )
    assert res.exit_code == 1 and "needs a sequence-classification fine-tune" in _said(res)


def test_prefix_metric_needs_the_whole_answer() -> None:
    task = Task("t", "generation", (), [], [], [], "prefix", max_new_tokens=3)
    preds = [" 42.", " 42\nQ: next", " 420", "42", " positive review", " positives", " "]
    refs = ["42", "42", "42", " 42", "positive", "positive", "42"]
    assert [task.metric([p], [r]) for p, r in zip(preds, refs, strict=True)] == [
        1.0,
        1.0,
        0.0,
        1.0,
        1.0,
        0.0,
        0.0,
    ]


def _accuracy(folder: Path, labels: list[int]) -> float:
    got = _classify(folder, TEXTS)
    return sum(a == b for a, b in zip(got, labels, strict=True)) / len(TEXTS)


def _val_rows(labels: list[int]) -> list[dict[str, Any]]:
    return read_labeled(
        "\n".join(
            json.dumps({"text": t, "label": LABELS[y]}) for t, y in zip(TEXTS, labels, strict=True)
        )
    )


def _encoder_deltas(base_dir: Path, ft: Path) -> dict[str, torch.Tensor]:
    """The deltas ``darex prune`` and ingest prune by default, by the base's names."""
    from storage.checkpoint import open_checkpoint
    from storage.ingest import default_patterns

    b, f, sel = open_checkpoint(base_dir), open_checkpoint(ft), default_patterns("encoder")
    return {n: f.get(f"bert.{n}") - b.get(n) for n in b.names() if sel.matches(n)}


@pytest.mark.parametrize("spiky", [True, False])
def test_labeled_choice_scores_each_candidate_as_its_checkpoint(
    tiny_bert_dir, classifier_ft, tmp_path, spiky
) -> None:
    """Each candidate's reported accuracy is what ``darex prune`` with that method (WANDA
    calibrated on the same texts) scores, and the best one is chosen, ties to DAREx-q. A
    heavy-tailed delta goes to magnitude; the dense Gaussian one stays DAREx-q."""
    from storage.labeled import CANDIDATES, labeled_choice

    ft = save_spiky_classifier(tiny_bert_dir, tmp_path / "ft", TEXTS) if spiky else classifier_ft
    labels = _classify(ft, TEXTS)
    assert len(set(labels)) > 1
    choice = labeled_choice(
        ft, tiny_bert_dir, "encoder", _encoder_deltas(tiny_bert_dir, ft), _val_rows(labels), 0.5
    )
    assert list(choice.scores) == list(CANDIDATES)
    assert choice.scores["darex_q"] == choice.search.score >= choice.search.dare
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(TEXTS))
    for method, extra in (("magnitude", []), ("wanda", ["--calib", calib])):
        out = tmp_path / method
        _run("prune", tiny_bert_dir, ft, "--method", method, "--rate", "0.5", *extra, "--out", out)
        assert _accuracy(out, labels) == choice.scores[method], method
    best = max(choice.scores.values())
    assert choice.method == next(m for m in CANDIDATES if choice.scores[m] == best)
    assert choice.method == ("magnitude" if spiky else "darex_q")
    assert choice.q == (None if spiky else choice.search.q)
    assert (choice.col_norms is None) == (choice.method != "wanda")
    assert f"chose {choice.method}" in choice.summary()
