"""Which tensors are pruned and which are kept as exact deltas.

A pattern is a glob (``*.self_attn.*.weight``, matched against the whole name with
``fnmatch``) or, with the prefix ``re:``, a regular expression searched in the name.
A tensor is pruned iff it is floating, matches some include pattern and no exclude
pattern; every other tensor the base has is kept as an exact (dense) delta.

Defaults (``default_patterns``):

- ``"encoder"`` (BERT-like, the paper's encoder setting): every floating tensor of
  the base is pruned, embeddings, LayerNorms and biases included. A new head
  (``classifier.*``, a tensor the base lacks) is not a delta at all; it is stored
  dense by the caller.
- ``"decoder"`` (Llama-like, the DARE reference code): only the attention and MLP
  weight matrices (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` and
  the GPT-2/BERT-style spellings ``attn``, ``attention``, ``mlp``, ``ffn``);
  embeddings, norms, biases and ``lm_head`` are kept as exact deltas.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from pruning.errors import PruningError

_DECODER_INCLUDE = (
    r"re:(^|\.)(self_attn|attn|attention|cross_attn|mlp|feed_forward|ffn)\..*weight$",
)
_DECODER_EXCLUDE = (
    r"re:(^|\.)(embed_tokens|embed_positions|wte|wpe|lm_head|embeddings)(\.|$)",
    r"re:(norm|ln_\d|ln_f|layernorm|LayerNorm)",
)


@dataclass(frozen=True)
class Selector:
    """Include/exclude patterns; ``selects(name, t)`` says whether ``t`` is pruned."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for pat in (*self.include, *self.exclude):
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    raise PruningError(f"bad tensor pattern {pat!r}: {e}") from e

    def matches(self, name: str) -> bool:
        return any(_match(p, name) for p in self.include) and not any(
            _match(p, name) for p in self.exclude
        )

    def selects(self, name: str, t: torch.Tensor | None = None) -> bool:
        if t is not None and not t.is_floating_point():
            return False
        return self.matches(name)

    def split(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """(pruned, kept-exact) in input order."""
        pruned, kept = [], []
        for n in names:
            (pruned if self.matches(n) else kept).append(n)
        return pruned, kept


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def default_patterns(arch: str) -> Selector:
    """The documented default selection for ``arch`` in {"encoder", "decoder"}."""
    if arch == "encoder":
        return Selector(include=("*",), exclude=())
    if arch == "decoder":
        return Selector(include=_DECODER_INCLUDE, exclude=_DECODER_EXCLUDE)
    raise PruningError(f"unknown architecture kind {arch!r} (expected 'encoder' or 'decoder')")


def make_selector(
    arch: str, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> Selector:
    """Defaults for ``arch``, with ``include`` replacing and ``exclude`` extending them."""
    base = default_patterns(arch)
    inc = tuple(include) if include else base.include
    return Selector(include=inc, exclude=base.exclude + tuple(exclude or ()))
