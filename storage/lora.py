"""Reading a PEFT LoRA adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``.

Every LoRA target module becomes a ``LoraModule`` (A, B, alpha, r, rsLoRA flag,
layout) keyed by the weight it changes, named as in the fine-tuned model's
state_dict (``model.layers.0.self_attn.q_proj.weight``): PEFT's
``base_model.model.`` prefix is stripped. Mapping those names onto a base
checkpoint that uses another prefix is the caller's job
(``storage.checkpoint``). ``modules_to_save`` tensors (a new head) are returned
dense in ``extras``. DoRA, LoRA biases and convolution LoRA are refused with
``BadCheckpoint``; pickle adapters (``adapter_model.bin``) too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pruning.lora import lora_delta
from storage.errors import BadCheckpoint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def adapter_name(key: str) -> str:
    """A PEFT adapter tensor's name as the model has it: PEFT's wrapper prefix dropped, and a
    ``modules_to_save`` copy (a new head) named as the module it replaces."""
    return key.removeprefix(_PEFT_PREFIX).replace(".modules_to_save", "")


_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<kind>A|B|embedding_A|embedding_B)(\.weight)?")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``delta() = (B @ A) * scaling`` laid out like the base weight."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    alpha: float
    r: int
    rslora: bool = False
    transpose: bool = False  # fan_in_fan_out (GPT-2 Conv1D) and embeddings store W as (in, out)

    def delta(self, name: str = "?") -> torch.Tensor:
        d = lora_delta(self.a, self.b, self.alpha, self.r, rslora=self.rslora, name=name)
        return d.T.contiguous() if self.transpose else d


@dataclass
class LoraAdapter:
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)  # weight name -> module
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save tensors

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module name suffix as a regex."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise BadCheckpoint(f"{folder}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadCheckpoint(f"{path} is not JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise BadCheckpoint(f"{path}: expected a JSON object")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise BadCheckpoint(f"{path}: peft_type {kind} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise BadCheckpoint(f"{path}: DoRA adapters are not supported")
    if cfg.get("lora_bias"):
        raise BadCheckpoint(f"{path}: LoRA adapters with trained biases are not supported")
    _check_numbers(cfg, path)
    return cfg


def _is_number(v: Any, *, integer: bool = False) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return float(v).is_integer() if integer else math.isfinite(v)
    except OverflowError:  # an integer past float's range: no rank or alpha
        return False


def _check_numbers(cfg: dict[str, Any], path: Path) -> None:
    """The fields the scale r and alpha come from, as PEFT writes them: a bad one is a
    ``BadCheckpoint`` naming it, not a TypeError deep in the ingest."""
    for key, integer, default in (("r", True, 8), ("lora_alpha", False, 8)):
        v = cfg.get(key, default)
        if not _is_number(v, integer=integer) or v <= 0:
            kind = "an integer" if integer else "a number"
            raise BadCheckpoint(f'{path}: "{key}" must be {kind} > 0, got {json.dumps(v)}')
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise BadCheckpoint(
                f'{path}: "{key}" must be an object of module pattern -> number, '
                f"got {type(patterns).__name__}"
            )
        for pattern, v in patterns.items():
            if not _is_number(v, integer=integer) or v <= 0:
                raise BadCheckpoint(f'{path}: "{key}" {pattern!r}: {json.dumps(v)} is not > 0')
            try:
                re.compile(pattern)
            except re.error as e:
                raise BadCheckpoint(f'{path}: "{key}" {pattern!r} is not a pattern: {e}') from None


def read_adapter(folder: Path | str) -> LoraAdapter:
    """Parse a PEFT LoRA adapter folder into per-module factors and dense extras."""
    folder = Path(folder)
    cfg = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if any(folder.glob("adapter_model.bin")):
            raise BadCheckpoint(
                f"{folder}: adapter_model.bin is a pickle and is refused; "
                "save the adapter with safetensors (save_pretrained(..., safe_serialization=True))"
            )
        raise BadCheckpoint(f"{folder}: no {WEIGHTS_FILE}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise BadCheckpoint(f"{weights} is not a readable safetensors file: {e}") from e

    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    out = LoraAdapter(config=cfg)
    for key, t in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        if "lora_magnitude_vector" in name:
            raise BadCheckpoint(f"{weights}: tensor {key!r} is DoRA, not supported")
        m = _LORA_KEY.fullmatch(name)
        if m is None:
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise BadCheckpoint(f"{weights}: tensor {key!r} is not a finite float tensor")
            out.extras[adapter_name(key)] = t
            continue
        parts.setdefault(m["module"], {})[m["kind"]] = t

    for module, ab in parts.items():
        emb = "embedding_A" in ab or "embedding_B" in ab
        a, b = ab.get("embedding_A" if emb else "A"), ab.get("embedding_B" if emb else "B")
        if a is None or b is None:
            raise BadCheckpoint(f"{weights}: module {module!r} has only one LoRA factor")
        if a.dim() != 2 or b.dim() != 2:
            raise BadCheckpoint(
                f"{weights}: module {module!r} has {a.dim()}-D factors (conv LoRA unsupported)"
            )
        for side, t in (("A", a), ("B", b)):
            if not bool(torch.isfinite(t).all()):
                raise BadCheckpoint(f"{weights}: module {module!r} lora_{side} holds NaN/Inf")
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0))
        if a.shape[0] != r or b.shape[1] != r:
            raise BadCheckpoint(
                f"{weights}: module {module!r} factors A {tuple(a.shape)}, B {tuple(b.shape)} "
                f"do not have rank r={r} from the config"
            )
        out.modules[f"{module}.weight"] = LoraModule(
            a, b, alpha, r, rslora, transpose=emb or fan_in_fan_out
        )
    if not out.modules:
        raise BadCheckpoint(f"{weights}: no LoRA factors found")
    return out
