"""The bad-input corpus: checkpoints, blobs and model ids a hostile or careless client may send.

Every checkpoint case is a builder ``(out, base_dir, other_dir) -> folder`` that writes a
fine-tune folder (``config.json`` + weights) next to the expectation: the domain exception
``ingest`` must raise, a regex its message must match (what and why), and whether the HTTP
upload is refused synchronously (``sync``: 4xx before any job exists) or by the ingest job
(``job``: 202, then the job fails with that message; value checks need every byte read).
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from storage.errors import BadCheckpoint, BaseMismatch, InvalidModelId, StorageError

WEIGHTS = "model.safetensors"
UP_PROJ = "model.layers.0.mlp.up_proj.weight"  # (128, 64) in the tiny Llama
NORM = "model.layers.1.input_layernorm.weight"  # (64,)
LAST = "model.norm.weight"  # the last tensor in name order
MARKER_ENV = "DAREX_PICKLE_MARKER"

Builder = Callable[[Path, Path, Path], Path]


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    build: Builder
    error: type[StorageError]
    match: str  # regex the message must match
    when: str = "sync"  # "sync" (4xx at upload) or "job" (202, then the job fails)
    method: str | None = None  # ingest method (None = recommended)


# ---------------------------------------------------------------- helpers


def base_tensors(base_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(base_dir / WEIGHTS))


def finetune_tensors(base_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """The base moved by a small normal step on 5 % of every tensor: a plausible fine-tune."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base_tensors(base_dir).items():
        t = t.clone()
        flat = t.view(-1)
        k = max(1, flat.numel() // 20)
        idx = torch.randperm(flat.numel(), generator=g)[:k]
        flat[idx] += 0.05 * torch.randn(k, generator=g)
        out[name] = t
    return out


def write_folder(out: Path, base_dir: Path, weights: bytes | dict[str, torch.Tensor]) -> Path:
    """``config.json`` of the base + the weights (raw bytes or tensors) as model.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(base_dir / "config.json", out / "config.json")
    if isinstance(weights, bytes):
        (out / WEIGHTS).write_bytes(weights)
    else:
        save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    return out


def raw_safetensors(header: object, data: bytes = b"", declared_len: int | None = None) -> bytes:
    """``u64 header length | header JSON | data``; ``declared_len`` lies about the length."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if declared_len is None else declared_len
    return struct.pack("<Q", n) + hb + data


def _raw(header: object, data: bytes = b"", declared_len: int | None = None) -> Builder:
    def build(out: Path, base_dir: Path, _other: Path) -> Path:
        return write_folder(out, base_dir, raw_safetensors(header, data, declared_len))

    return build


def _bytes(data: bytes) -> Builder:
    return lambda out, base_dir, _o: write_folder(out, base_dir, data)


def _truncated(frac: float) -> Builder:
    def build(out: Path, base_dir: Path, _other: Path) -> Path:
        raw = (base_dir / WEIGHTS).read_bytes()
        return write_folder(out, base_dir, raw[: int(len(raw) * frac)])

    return build


def _edit(fn: Callable[[dict[str, torch.Tensor]], None]) -> Builder:
    """A plausible fine-tune, then ``fn`` breaks it in place."""

    def build(out: Path, base_dir: Path, _other: Path) -> Path:
        t = finetune_tensors(base_dir, seed=1)  # not the stored model's bytes: no dedup
        fn(t)
        return write_folder(out, base_dir, t)

    return build


def _set(name: str, value: float, at: int = 7) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        t[name].view(-1)[at] = value

    return fn


class _Evil:
    """Unpickling this runs code: it creates the marker file named by the environment."""

    def __reduce__(self):
        code = (
            "import os, pathlib; p = os.environ.get('DAREX_PICKLE_MARKER'); "
            "p and pathlib.Path(p).write_text('pickle was loaded')"
        )
        return (exec, (code,))


def evil_pickle() -> bytes:
    return pickle.dumps({"model.embed_tokens.weight": _Evil()})


def _pickle_file(filename: str, evil: bool = True) -> Builder:
    def build(out: Path, base_dir: Path, _other: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(base_dir / "config.json", out / "config.json")
        if evil:
            (out / filename).write_bytes(evil_pickle())
        else:
            torch.save(base_tensors(base_dir), out / filename)
        return out

    return build


def _other_arch(out: Path, base_dir: Path, other_dir: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(other_dir / "config.json", out / "config.json")
    shutil.copy(other_dir / WEIGHTS, out / WEIGHTS)
    return out


def _drop_most(t: dict[str, torch.Tensor]) -> None:
    for name in [n for n in t if n != "model.embed_tokens.weight"]:
        del t[name]


def _rename_all(t: dict[str, torch.Tensor]) -> None:
    for name in list(t):
        t[f"transformer.h.{abs(hash(name)) % 997}.{name.rsplit('.', 1)[-1]}"] = t.pop(name)


def _transpose(t: dict[str, torch.Tensor]) -> None:
    t[UP_PROJ] = t[UP_PROJ].T.contiguous()


def _as_int(t: dict[str, torch.Tensor]) -> None:
    t[UP_PROJ] = t[UP_PROJ].to(torch.int32)


def _as_fp8(t: dict[str, torch.Tensor]) -> None:
    t[UP_PROJ] = t[UP_PROJ].to(torch.float8_e4m3fn)


def _add_rank(t: dict[str, torch.Tensor]) -> None:
    t[NORM] = t[NORM].unsqueeze(0).contiguous()


# ---------------------------------------------------------------- checkpoint cases

_T = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
CHECKPOINT_CASES: list[Case] = [
    # malformed safetensors files: refused while reading the header, nothing else read
    Case("empty-file", "header", _bytes(b""), BadCheckpoint, "not a readable safetensors"),
    Case("short-prefix", "header", _bytes(b"\x10\x00"), BadCheckpoint, "not a readable"),
    Case(
        "header-len-past-eof",
        "header",
        _raw(b"{}", declared_len=1 << 20),
        BadCheckpoint,
        "not a readable",
    ),
    Case(
        "header-len-u64-max",
        "header",
        _raw(b"{", declared_len=(1 << 64) - 1),
        BadCheckpoint,
        "not a readable",
    ),
    Case("header-not-json", "header", _raw(b"\xff\xfe garbage"), BadCheckpoint, "not a readable"),
    Case("header-json-list", "header", _raw([1, 2, 3]), BadCheckpoint, "not a readable"),
    Case("header-deep-nesting", "header", _raw(b"[" * 100_000), BadCheckpoint, "not a readable"),
    Case("truncated-data", "header", _truncated(0.6), BadCheckpoint, "not a readable"),
    Case("truncated-header", "header", _truncated(0.0001), BadCheckpoint, "not a readable"),
    Case(
        "offsets-past-eof",
        "header",
        _raw({UP_PROJ: {**_T, "data_offsets": [0, 1 << 40]}}, b"\0" * 16),
        BadCheckpoint,
        "not a readable",
    ),
    Case(
        "huge-tensor-claim",
        "header",
        _raw({UP_PROJ: {**_T, "shape": [1 << 31, 1 << 31]}}, b"\0" * 16),
        BadCheckpoint,
        "not a readable",
    ),
    Case(
        "overlapping-offsets",
        "header",
        _raw({UP_PROJ: _T, NORM: {**_T, "data_offsets": [8, 24]}}, b"\0" * 24),
        BadCheckpoint,
        "not a readable",
    ),
    Case(
        "unknown-dtype",
        "header",
        _raw({UP_PROJ: {**_T, "dtype": "Q7"}}, b"\0" * 16),
        BadCheckpoint,
        "not a readable",
    ),
    Case(
        "negative-shape",
        "header",
        _raw({UP_PROJ: {**_T, "shape": [-2, -2]}}, b"\0" * 16),
        BadCheckpoint,
        "not a readable",
    ),
    # dtypes and shapes that do not fit the base: the message names the tensor and both sides
    Case("transposed-shape", "dtype-shape", _edit(_transpose), BaseMismatch, r"up_proj.*shape"),
    Case("extra-rank", "dtype-shape", _edit(_add_rank), BaseMismatch, r"input_layernorm.*shape"),
    Case("int-for-float", "dtype-shape", _edit(_as_int), BaseMismatch, r"up_proj.*dtype"),
    Case("fp8-dtype", "dtype-shape", _edit(_as_fp8), BadCheckpoint, r"up_proj.*dtype"),
    # non-finite values: found while reading (recommended method, and DARE with a fixed p)
    Case("nan", "values", _edit(_set(UP_PROJ, float("nan"))), BadCheckpoint, "up_proj.*NaN", "job"),
    Case("+inf", "values", _edit(_set(NORM, float("inf"))), BadCheckpoint, "layernorm.*Inf", "job"),
    Case(
        "-inf-last-tensor-dare",
        "values",
        _edit(_set(LAST, float("-inf"))),
        BadCheckpoint,
        r"model\.norm\.weight.*NaN/Inf",
        "job",
        method="dare",
    ),
    # another model altogether
    Case("other-architecture", "architecture", _other_arch, BaseMismatch, "wrong base"),
    Case("most-tensors-missing", "architecture", _edit(_drop_most), BaseMismatch, "lacks"),
    Case("no-name-matches", "architecture", _edit(_rename_all), BaseMismatch, "wrong base"),
    # pickles: refused by name, never unpickled (the marker file would appear)
    Case("pytorch-model-bin", "pickle", _pickle_file("pytorch_model.bin"), BadCheckpoint, "pickle"),
    Case("torch-save-pt", "pickle", _pickle_file("model.pt", evil=False), BadCheckpoint, "pickle"),
    Case("evil-pkl", "pickle", _pickle_file("model.pkl"), BadCheckpoint, "pickle"),
    Case("evil-ckpt", "pickle", _pickle_file("model.ckpt"), BadCheckpoint, "pickle"),
    Case(
        "pickle-named-safetensors",
        "pickle",
        _bytes(evil_pickle()),
        BadCheckpoint,
        "not a readable",
    ),
]

# ---------------------------------------------------------------- model ids

BAD_MODEL_IDS: list[str] = [
    "",
    "..",
    "../evil",
    "../../etc/passwd",
    "a/b",
    "a\\b",
    "/abs",
    "x" * 129,
    "-leading-dash",
    ".hidden",
    "a b",
    "a\x00b",
    "a\nb",
    "abc\n",  # a pattern ending in $ would take it
    "ünïcödé",
    "名前",
    "a\u202eb",  # right-to-left override
    "ｆｕｌｌｗｉｄｔｈ",
    "a%2F..%2Fb",
    "emoji-\U0001f600",
]


def check_model_id_cases() -> list[tuple[str, type[StorageError]]]:
    return [(m, InvalidModelId) for m in BAD_MODEL_IDS]
