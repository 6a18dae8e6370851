"""``storage.predict``: batches formed shortest first, predictions back in input order.

The reference is each example predicted alone (a batch of one has no padding at all),
so a prediction that depends on its batch, or one returned to the wrong example, fails.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from storage.predict import by_length, load_tokenizer, predict
from storage.tasks import Example, Task
from tests.server.finetunes import save_causal_finetune, save_classifier_finetune, spread_head

# Lengths from 3 to about 40 tokens, in an order that is not sorted by length.
TEXTS = [" ".join(f"word{(i * 7 + j) % 23}" for j in range(1 + (i * 11) % 19)) for i in range(20)]


@given(st.lists(st.integers(0, 50), max_size=60), st.integers(1, 9))
def test_by_length_batches_every_index_once_shortest_first(lengths, batch_size) -> None:
    batches = by_length(lengths, batch_size)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert all(len(b) == batch_size for b in batches[:-1])
    keys = [(lengths[i], i) for i in flat]  # by length, ties in the given order
    assert keys == sorted(keys)


def test_by_length_refuses_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        by_length([3, 1], 0)


def test_classification_predictions_do_not_depend_on_the_batch(tiny_bert_dir, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    folder = save_classifier_finetune(tiny_bert_dir, tmp_path / "ft", seed=4)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = load_tokenizer(tiny_bert_dir)
    spread_head(model, tok, TEXTS)
    task = Task("t", "classification", ("a", "b", "c"), [], [], [], "accuracy")
    exs = [Example(t, label=0) for t in TEXTS]
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    assert lengths != sorted(lengths) and len(set(lengths)) > 5
    alone = [predict(model, tok, task, [e], batch_size=1)[0] for e in exs]
    assert len(set(alone)) > 1  # the labels vary, so a shuffled answer shows
    with torch.no_grad():  # and one padded batch in file order, as plain transformers does
        enc = tok(TEXTS, padding=True, return_tensors="pt")
        padded = model(**enc).logits.argmax(-1).tolist()
    assert padded == alone
    for batch_size in (3, 7, 64):
        assert predict(model, tok, task, exs, batch_size=batch_size) == alone
    assert predict(model, tok, task, [], batch_size=4) == []


def test_generation_predictions_do_not_depend_on_the_batch(tiny_llama_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    folder = save_causal_finetune(tiny_llama_dir, tmp_path / "ft", seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = load_tokenizer(tiny_llama_dir)
    task = Task("t", "generation", (), [], [], [], "prefix", max_new_tokens=3)
    exs = [Example(t, target="") for t in TEXTS]
    alone = [predict(model, tok, task, [e], batch_size=1)[0] for e in exs]
    assert len(set(alone)) > 5
    for batch_size in (3, 64):
        assert predict(model, tok, task, exs, batch_size=batch_size) == alone
    # max_length keeps each prompt's last tokens, batched or alone
    cut = [predict(model, tok, task, [e], batch_size=1, max_length=4)[0] for e in exs]
    assert cut != alone
    assert predict(model, tok, task, exs, batch_size=5, max_length=4) == cut
