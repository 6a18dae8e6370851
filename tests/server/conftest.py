"""Serving fixtures: real Engines over the tiny models with real (perturbed) fine-tunes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.deltas import ModelDelta
from server.engine import Engine
from tests.server.finetunes import causal_delta, classifier_delta, tiny_engine


@pytest.fixture(scope="session")
def llama_deltas(tiny_llama_dir: Path) -> dict[str, ModelDelta]:
    return {"ft-a": causal_delta(tiny_llama_dir, 1), "ft-b": causal_delta(tiny_llama_dir, 2)}


@pytest.fixture(scope="session")
def bert_deltas(tiny_bert_dir: Path) -> dict[str, ModelDelta]:
    return {
        "cls-a": classifier_delta(tiny_bert_dir, 3),
        "cls-b": classifier_delta(tiny_bert_dir, 4),
    }


@pytest.fixture()
def llama_engine(tiny_llama_dir: Path, llama_deltas: dict[str, ModelDelta]) -> Iterator[Engine]:
    eng = tiny_engine(tiny_llama_dir, "causal-lm", llama_deltas, "tiny-llama")
    yield eng
    eng.close()


@pytest.fixture()
def bert_engine(tiny_bert_dir: Path, bert_deltas: dict[str, ModelDelta]) -> Iterator[Engine]:
    eng = tiny_engine(tiny_bert_dir, "encoder", bert_deltas, "tiny-bert")
    yield eng
    eng.close()
