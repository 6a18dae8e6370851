"""Reading fine-tuned checkpoints: safetensors only, lazily, checked against the base.

Accepted: a HF folder (``config.json`` + ``*.safetensors``, sharded index too) or
one or more ``.safetensors`` files. Pickle formats (``.bin``, ``.pt``, ``.pkl``,
...) are refused: loading them runs arbitrary code. Tensors are read one at a
time (memory-mapped), so ingest streams.

Name mapping: a fine-tune may prefix the base's names with its
``base_model_prefix`` (``bert.encoder...`` in BertForSequenceClassification vs
``encoder...`` in BertModel) or drop a prefix the base has; the prefix that
matches most base names is used. Fine-tuned tensors the base lacks are extras.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from storage.errors import BadCheckpoint, BaseMismatch

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy")
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorMeta:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """Lazy view of safetensors files: metadata now, tensor bytes on ``get``."""

    def __init__(self, files: Sequence[Path], config: dict[str, Any] | None = None) -> None:
        if not files:
            raise BadCheckpoint("no .safetensors files given")
        self.files = [Path(f) for f in files]
        self.config = config or {}
        self.meta: dict[str, TensorMeta] = {}
        self._handles: dict[Path, Any] = {}
        for f in self.files:
            h = self._open(f)
            for name in h.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                if name in self.meta:
                    first = self.meta[name].file
                    raise BadCheckpoint(f"tensor {name!r} appears in {first} and {f}")
                sl = h.get_slice(name)
                dt = sl.get_dtype()
                if dt not in _DTYPES:
                    raise BadCheckpoint(f"{f}: tensor {name!r} has unsupported dtype {dt}")
                self.meta[name] = TensorMeta(f, _DTYPES[dt], tuple(int(s) for s in sl.get_shape()))

    def _open(self, f: Path) -> Any:
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise BadCheckpoint(f"{f} is not a readable safetensors file: {e}") from e
        return self._handles[f]

    def names(self) -> list[str]:
        return list(self.meta)

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def get(self, name: str) -> torch.Tensor:
        m = self.meta[name]
        try:
            return self._open(m.file).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise BadCheckpoint(f"{m.file}: tensor {name!r} cannot be read: {e}") from e

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self.meta.values())


def _refuse_pickle(paths: Iterable[Path]) -> None:
    for p in paths:
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise BadCheckpoint(
                f"{p.name}: pickle checkpoints are refused (they can run code when loaded); "
                "save the model with safetensors (save_pretrained(..., safe_serialization=True))"
            )


def open_checkpoint(path: Path | str | Sequence[Path | str]) -> Checkpoint:
    """A HF folder, one ``.safetensors`` file, or a list of them."""
    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
        _refuse_pickle(files)
        bad = [f for f in files if f.suffix != ".safetensors" or not f.is_file()]
        if bad:
            raise BadCheckpoint(f"not .safetensors files: {[str(b) for b in bad]}")
        return Checkpoint(files, read_config(files[0].parent))
    p = Path(path)
    _refuse_pickle([p])
    if p.is_file():
        if p.suffix != ".safetensors":
            raise BadCheckpoint(f"{p}: expected a .safetensors file or a HF model folder")
        return Checkpoint([p], read_config(p.parent))
    if not p.is_dir():
        raise BadCheckpoint(f"{p}: no such file or folder")
    index = p / INDEX_FILE
    if index.is_file():
        files = [p / f for f in _read_index(index)]
        missing = [f.name for f in files if not f.is_file() or f.parent != p]
        if missing:
            raise BadCheckpoint(f"{index} names missing shards {missing}")
    else:
        files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
    if not files:
        _refuse_pickle(sorted(p.iterdir()))
        raise BadCheckpoint(f"{p} holds no .safetensors weights")
    return Checkpoint(files, read_config(p))


def _parse_json(path: Path) -> Any:
    """A small JSON file's value; ``ValueError`` saying why when it is not UTF-8 JSON (or
    nests too deeply to parse)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e})") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _read_index(index: Path) -> list[str]:
    """The shard file names of a ``model.safetensors.index.json`` (its ``weight_map``
    values: tensor name -> shard file name), sorted, each once."""
    try:
        weight_map = _parse_json(index)["weight_map"]
    except ValueError as e:  # json.JSONDecodeError too
        raise BadCheckpoint(f"{index}: not a safetensors index (not JSON: {e})") from None
    except (KeyError, TypeError):
        raise BadCheckpoint(
            f'{index}: not a safetensors index (no "weight_map" object in it)'
        ) from None
    if not isinstance(weight_map, dict):
        raise BadCheckpoint(
            f'{index}: not a safetensors index ("weight_map" is a JSON '
            f"{type(weight_map).__name__}, expected an object of tensor name -> shard file)"
        )
    odd = [k for k, v in weight_map.items() if not isinstance(v, str)]
    if odd:
        raise BadCheckpoint(
            f'{index}: not a safetensors index ("weight_map" maps {_short(odd[:3])} to something '
            "other than a shard file name)"
        )
    return sorted(set(weight_map.values()))


def read_config(folder: Path) -> dict[str, Any] | None:
    """``config.json`` of a folder (None when there is none), checked by ``check_config``."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        out = _parse_json(cfg)
    except ValueError as e:  # json.JSONDecodeError too
        raise BadCheckpoint(f"{cfg} is not JSON: {e}") from None
    check_config(out, cfg.name)
    return out


def check_config(config: Any, source: str = "config.json") -> None:
    """Refuse a HF config whose fields this package reads have the wrong shape: it must be
    a JSON object, ``architectures`` a list of strings, ``id2label`` an object whose keys
    are integers (``{"0": "negative", ...}``). ``BadCheckpoint`` says which."""
    if not isinstance(config, dict):
        raise BadCheckpoint(f"{source} is not a JSON object (it is a JSON {type(config).__name__})")
    archs = config.get("architectures")
    if archs is not None and not isinstance(archs, list):
        raise BadCheckpoint(
            f'{source}: "architectures" must be a list of class names, '
            f"got a JSON {type(archs).__name__}"
        )
    if archs is not None and not all(isinstance(a, str) for a in archs):
        raise BadCheckpoint(
            f'{source}: "architectures" must be a list of strings (class names), '
            f"got {_short(archs)}"
        )
    id2label = config.get("id2label")
    if id2label is None:
        return
    if not isinstance(id2label, dict):
        raise BadCheckpoint(
            f'{source}: "id2label" must be an object of label index -> name '
            f'({{"0": "negative", ...}}), got a JSON {type(id2label).__name__}'
        )
    bad = [k for k in id2label if not _is_int(k)]
    if bad:
        raise BadCheckpoint(
            f'{source}: "id2label" keys must be integers (label indices), got {_short(bad[:3])}'
        )


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (it quotes an uploaded file)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(key: Any) -> bool:
    try:
        int(key)
    except (TypeError, ValueError):
        return False
    return True


def read_task(config: dict[str, Any] | None) -> tuple[str, list[str] | None]:
    """``(task, labels)`` from a HF config: the head named in ``architectures``."""
    check_config(config or {})
    archs = (config or {}).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        id2label = (config or {}).get("id2label") or {}
        try:
            labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
        except (TypeError, ValueError) as e:
            raise BadCheckpoint(f"config id2label keys are not integers: {id2label}") from e
        return "sequence-classification", labels or None
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm", None
    return "feature-extraction", None


@dataclass
class Plan:
    """How a fine-tune lines up with its base."""

    pairs: dict[str, str] = field(default_factory=dict)  # base name -> fine-tune name
    extras: list[str] = field(default_factory=list)  # fine-tune names the base lacks
    missing: list[str] = field(default_factory=list)  # base names the fine-tune lacks
    prefix: str = ""  # how names were mapped, in words


def _best_mapping(ft: Iterable[str], base: set[str]) -> tuple[dict[str, str], str]:
    ft = list(ft)
    candidates: list[tuple[str, str]] = [("", "")]  # (strip, add)
    candidates += [(n.split(".", 1)[0] + ".", "") for n in ft if "." in n]
    candidates += [("", b.split(".", 1)[0] + ".") for b in base if "." in b]
    best: tuple[int, dict[str, str], str] = (-1, {}, "")
    for strip, add in dict.fromkeys(candidates):
        m: dict[str, str] = {}
        for n in ft:
            if n in base:
                m[n] = n
            elif strip and n.startswith(strip) and n[len(strip) :] in base:
                m[n] = n[len(strip) :]
            elif add and add + n in base:
                m[n] = add + n
        if len(set(m.values())) < len(m):
            continue  # two fine-tuned tensors on one base name: not this mapping
        if len(m) > best[0]:
            how = f"strip {strip!r}" if strip else f"add {add!r}" if add else "same names"
            best = (len(m), m, how)
    return best[1], best[2]


def plan_against_base(ft: Checkpoint, base: Checkpoint) -> Plan:
    """Map names and check shapes/dtypes; raises ``BaseMismatch`` naming the tensor."""
    mapping, how = _best_mapping(ft.names(), set(base.names()))
    if not mapping:
        raise BaseMismatch(
            f"no tensor of the fine-tune matches the base by name (fine-tune has e.g. "
            f"{ft.names()[:3]}, base has e.g. {base.names()[:3]}): wrong base?"
        )
    plan = Plan(prefix=how)
    for ft_name, base_name in mapping.items():
        fm, bm = ft.meta[ft_name], base.meta[base_name]
        if fm.shape != bm.shape:
            raise BaseMismatch(
                f"tensor {ft_name!r}: base {base_name!r} has shape {bm.shape}, "
                f"fine-tune has {fm.shape}"
            )
        if fm.dtype.is_floating_point != bm.dtype.is_floating_point:
            raise BaseMismatch(
                f"tensor {ft_name!r}: base dtype {bm.dtype}, fine-tune dtype {fm.dtype}"
            )
        plan.pairs[base_name] = ft_name
    plan.extras = [n for n in ft.names() if n not in mapping]
    plan.missing = [n for n in base.names() if n not in plan.pairs]
    if len(plan.missing) * 2 > len(base.meta):
        raise BaseMismatch(
            f"the fine-tune lacks {len(plan.missing)} of the base's {len(base.meta)} tensors "
            f"(e.g. {plan.missing[:3]}): wrong base?"
        )
    # a weight the fine-tune lacks is worth a warning; an integer buffer such as BERT's
    # ``embeddings.position_ids``, which newer transformers no longer save, is not (it
    # has no delta either way)
    if weights := [n for n in plan.missing if base.meta[n].dtype.is_floating_point]:
        log.warning("fine-tune lacks base tensors %s; their delta is zero", weights[:5])
    return plan


HEAD = "classifier.weight"  # the classification head the engine applies (server.engine)
HEAD_BIAS = "classifier.bias"


def serve_problem(
    task: str,
    *,
    base_name: str,
    arch: str,
    tensors: Mapping[str, tuple[int, ...] | None],
    labels: Sequence[str] | None = None,
    hidden: int | None = None,
    implied_by: str | None = None,
    instead: str = "",
) -> str | None:
    """Why a base cannot serve a fine-tune stored with ``task``, or None.

    A decoder base serves causal-lm only; an encoder base feature-extraction, and
    sequence-classification when the fine-tune has the head the engine applies: a
    ``classifier.weight`` of (labels, ``hidden``) (``hidden``: the base's width, None to
    skip), one row per label of its config, and a bias of one value per row. ``tensors``:
    the fine-tune's tensor names, with their shapes where known (None: names only).
    ``implied_by``: where a task nobody sent came from; ``instead``: what the caller can do
    to store it as embeddings (its own option's name), said after a refusal it implied.
    """
    what = repr(task) + (f" (named by the {implied_by})" if implied_by else "")
    hint = f"; {instead}" if instead else ""
    if arch == "decoder":
        if task == "causal-lm":
            return None
        return (
            f"task: {what} is not served by base {base_name!r}, a decoder: it serves only "
            "'causal-lm' (/v1/completions, /v1/chat/completions)"
        )
    if task == "causal-lm":
        return (
            f"task: {what} is not served by base {base_name!r}, an encoder: it serves "
            "'feature-extraction' (/v1/embeddings) and, for a checkpoint with a "
            f"'{HEAD}' tensor, 'sequence-classification' (/v1/classify)"
            + (hint if implied_by else "")
        )
    if task != "sequence-classification":
        return None
    if HEAD not in tensors:
        return (
            f"task: {what} needs a classification head, a '{HEAD}' tensor, in the "
            f"checkpoint, and it has none{hint}"
        )
    shape = tensors[HEAD]
    if shape is None:
        return None
    rows = shape[0] if len(shape) == 2 else None
    if rows is None or rows == 0 or (hidden is not None and shape[1] != hidden):
        width = hidden if hidden is not None else "the base's width"
        return (
            f"tensor '{HEAD}' has shape {list(shape)}: base {base_name!r} needs "
            f"[labels, {width}] (its pooled output is {width} wide)"
        )
    if labels and len(labels) != rows:
        return (
            f"tensor '{HEAD}' has {rows} rows but the config's id2label names {len(labels)} "
            f"labels ({', '.join(labels)}): one row per label"
        )
    bias = tensors.get(HEAD_BIAS)
    if bias is not None and list(bias) != [rows]:
        return f"tensor '{HEAD_BIAS}' has shape {list(bias)}: the head's {rows} rows need [{rows}]"
    return None
