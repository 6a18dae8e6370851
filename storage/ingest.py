"""Ingest: checkpoint -> validate -> recommend -> prune -> encode -> blobs -> manifest -> registry.

Streams tensor by tensor: one base tensor and its fine-tuned counterpart are in
memory at a time. For every base tensor ``d = W_ft - W_base`` (fp32); tensors the
selector picks are pruned with ``pruning.methods.prune_tensor``, the others are
kept as exact deltas (nonzero entries or dense, whichever is smaller; a zero
delta costs nothing). Tensors the base lacks (a new head) are stored dense.

The registry entry is written last: a failure at any step leaves no entry, and
the blobs written so far are unreferenced, so ``gc`` removes them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tqdm.auto import tqdm

from pruning.errors import PruningError
from pruning.methods import method_for, prune_tensor
from pruning.select import Selector, default_patterns
from storage import codec
from storage.bases import tensor_names
from storage.checkpoint import (
    HEAD,
    HEAD_BIAS,
    Checkpoint,
    open_checkpoint,
    plan_against_base,
    read_task,
    serve_problem,
)
from storage.errors import BadCheckpoint, BaseMismatch, ModelExists, UnknownModel
from storage.manifest import BaseRef, Manifest, TensorEntry
from storage.modelid import validate_model_id
from storage.store import DeltaStore

if TYPE_CHECKING:
    from storage.labeled import LabeledChoice

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
ENCODING_CHOICES = ("auto", "seed", "explicit", "dense")
DEFAULT_RATE = 0.99


class BaseLike(Protocol):
    name: str
    path: Path
    sha256: str
    arch: str


@dataclass
class Source:
    """What to store, as thunks so tensors are read one at a time."""

    kind: str  # "full" or "lora"
    deltas: dict[str, Callable[[], torch.Tensor]]  # base name -> d (fp32)
    base_dtypes: dict[str, torch.dtype]
    extras: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    task: str = "feature-extraction"
    labels: list[str] | None = None
    fp16_bytes: int = 0
    # Reads every tensor once and raises on bad values, before anything is written.
    check: Callable[[], None] | None = None

    def validate(self) -> None:
        if self.check is not None:
            self.check()
            return
        for read in [*self.deltas.values(), *self.extras.values()]:
            read()


def _full_source(ft: Checkpoint, base: Checkpoint) -> Source:
    plan = plan_against_base(ft, base)

    def delta(bname: str, fname: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            w_ft, w_base = ft.get(fname), base.get(bname)
            if not w_base.is_floating_point():
                if not torch.equal(w_ft, w_base):
                    raise BaseMismatch(f"tensor {fname!r}: integer buffer differs from the base")
                return torch.zeros(0)
            _check_finite(w_ft, fname)
            return w_ft.float() - w_base.float()

        return read

    def extra(fname: str) -> Callable[[], torch.Tensor]:
        return lambda: storable_extra(ft.get(fname), fname)

    extras = {f: extra(f) for f in plan.extras if ft.meta[f].dtype.is_floating_point}

    def check() -> None:
        for fname in plan.pairs.values():
            if ft.meta[fname].dtype.is_floating_point:
                _check_finite(ft.get(fname), fname)
        for read in extras.values():
            read()

    task, labels = read_task(ft.config)
    return Source(
        kind="full",
        deltas={b: delta(b, f) for b, f in plan.pairs.items()},
        base_dtypes={b: base.meta[b].dtype for b in plan.pairs},
        extras=extras,
        task=task,
        labels=labels,
        fp16_bytes=2 * sum(m.numel for m in ft.meta.values() if m.dtype.is_floating_point),
        check=check,
    )


TASK_FROM = {"lora": "task_type in adapter_config.json", "full": "architectures in config.json"}


def default_task(arch: str, task: str | None) -> str | None:
    """The task to store a fine-tune with when none is given: causal-lm on a decoder base
    (all it serves; a LoRA adapter need not say), else None (the checkpoint's config)."""
    return "causal-lm" if task is None and arch == "decoder" else task


def servable_problem(
    base: BaseLike,
    base_config: Mapping[str, Any],
    task: str | None,
    implied: str,
    kind: str,
    tensors: Mapping[str, tuple[int, ...] | None],
    labels: Sequence[str] | None,
    instead: str,
) -> str | None:
    """``storage.checkpoint.serve_problem`` for a fine-tune of ``base`` (its config gives
    the head's width): ``task`` as given (``default_task``), else ``implied``, the one the
    checkpoint's own config names (``kind``: full or lora, to say which file)."""
    hidden = base_config.get("hidden_size")
    return serve_problem(
        task or implied,
        base_name=base.name,
        arch=base.arch,
        tensors=tensors,
        labels=labels,
        hidden=hidden if isinstance(hidden, int) else None,
        implied_by=None if task else TASK_FROM[kind],
        instead=instead,
    )


def _check_servable(
    source: Source,
    base: BaseLike,
    base_ckpt: Checkpoint,
    task: str | None,
    labels: list[str] | None,
) -> None:
    """Refuse, before a blob is written, a fine-tune the base could not serve: a task of
    the other architecture, a classification head that is missing, of the wrong width or
    with another count of rows than labels."""
    heads = {n: tuple(source.extras[n]().shape) for n in (HEAD, HEAD_BIAS) if n in source.extras}
    why = servable_problem(
        base,
        base_ckpt.config,
        task,
        source.task,
        source.kind,
        {**dict.fromkeys([*source.deltas, *source.extras]), **heads},
        labels if labels is not None else source.labels,
        instead="store it with task feature-extraction (`darex add --task`, the upload's task "
        "field) to serve it on /v1/embeddings",
    )
    if why:
        raise BadCheckpoint(why)


def _check_finite(t: torch.Tensor, name: str, what: str = "NaN/Inf value(s)") -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise BadCheckpoint(f"tensor {name!r} holds {bad} {what}")


def storable_extra(t: torch.Tensor, name: str) -> torch.Tensor:
    """A tensor stored whole (a head, a LoRA ``modules_to_save``), checked for NaN/Inf.

    The codec keeps 16- and 32-bit floats; a float64 one is stored as float32, which is
    what the engine computes in at most (a value past float32's range is refused)."""
    _check_finite(t, name)
    if t.dtype == torch.float64:
        t = t.float()
        _check_finite(t, name, "value(s) past float32's range (it is float64)")
    return t


def check_tensor_count(n: int, limit: int) -> None:
    """Refuse a checkpoint or adapter with more tensors than ``DAREX_MAX_TENSORS``."""
    if n > limit:
        raise BadCheckpoint(f"checkpoint has {n} tensors, at most {limit} (DAREX_MAX_TENSORS)")


def is_lora_adapter(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


@dataclass(frozen=True)
class IngestResult:
    model_id: str
    manifest_key: str
    manifest: Manifest
    seconds: float


def _recommend(
    source: Source,
    selector: Selector,
    is_lora: bool,
    p: float,
    has_calib: bool = False,
    has_labels: bool = False,
) -> tuple[str, float | None, str]:
    """Method, q and reason from ``pruning.recommend`` on the statistics of the pruned deltas."""
    from pruning.recommend import delta_stats, recommend

    stats = {n: delta_stats(read()) for n, read in source.deltas.items() if selector.matches(n)}
    stats = {n: s for n, s in stats.items() if s.numel}
    if not stats:
        return "dare", None, "nothing to prune"
    rec = recommend(stats, has_labels=has_labels, is_lora=is_lora, has_calib=has_calib, p=p)
    return str(getattr(rec.method, "value", rec.method)), rec.params.get("q"), rec.reason


def _selected_deltas(source: Source, selector: Selector) -> dict[str, torch.Tensor]:
    """The deltas of the tensors that are pruned (what a q search scores), by base name."""
    return {n: read() for n, read in source.deltas.items() if selector.matches(n)}


def _search_q(
    source: Source,
    selector: Selector,
    base: BaseLike,
    texts: Sequence[str],
    p: float,
    seed: int,
    show_progress: bool,
) -> float:
    from storage.qsearch import outchange_q

    deltas = _selected_deltas(source, selector)
    with tqdm(desc="q search", unit="q", disable=not show_progress) as bar:
        return outchange_q(base.path, base.arch, deltas, texts, p, seed=seed, on_step=bar.update)


def _search_q_labeled(
    source: Source,
    selector: Selector,
    base: BaseLike,
    path: Path | str | Sequence[Path | str],
    lora: bool,
    rows: Sequence[Mapping[str, Any]],
    p: float,
    seed: int,
    show_progress: bool,
    compare: bool,
) -> LabeledChoice:
    """q searched on the labeled rows; with ``compare`` also magnitude and WANDA scored
    on them, and the best of the three (``storage.labeled.labeled_choice``)."""
    from storage.labeled import CANDIDATES, labeled_choice

    folder = Path(path[0]).parent if isinstance(path, (list, tuple)) else Path(path)
    deltas = _selected_deltas(source, selector)
    with tqdm(desc="labeled examples", unit="eval", disable=not show_progress) as bar:
        return labeled_choice(
            folder,
            base.path,
            base.arch,
            deltas,
            rows,
            p,
            seed=seed,
            lora=lora,
            on_step=bar.update,
            candidates=CANDIDATES if compare else ("darex_q",),
        )


def _encode_pruned(
    d: torch.Tensor,
    name: str,
    method: str,
    p: float,
    q: float | None,
    seed: int,
    enc: str,
    value_dtype: str,
    col_norm: torch.Tensor | None,
) -> tuple[bytes, float, str]:
    sd = prune_tensor(method, d, p, name=name, seed=seed, q=q, col_norm=col_norm)
    chosen = enc
    if enc == "auto":
        chosen = "seed" if sd.mask_seed is not None else "explicit"
    elif enc == "seed" and sd.mask_seed is None:
        raise PruningError(f"tensor {name!r}: method {method} draws no seed mask; use explicit")
    blob = codec.encode_sparse(sd, name, encoding=chosen, value_dtype=value_dtype)  # type: ignore[arg-type]
    return blob, float(sd.scale), chosen


def ingest(
    store: DeltaStore,
    model_id: str,
    path: Path | str | Sequence[Path | str],
    base: BaseLike,
    *,
    method: str | None = None,
    p: float | None = None,
    q: float | dict[str, float] | None = None,
    seed: int = 0,
    encoding: str = "auto",
    value_dtype: str = "float16",
    exact_dtype: str = "float32",
    selector: Selector | None = None,
    col_norms: dict[str, torch.Tensor] | None = None,
    task: str | None = None,
    labels: list[str] | None = None,
    calib_texts: Sequence[str] | None = None,
    val: Sequence[Mapping[str, Any]] | None = None,
    replace: bool = False,
    max_tensors: int = 10_000,
    progress: Progress | None = None,
    show_progress: bool = True,
) -> IngestResult:
    """Store one fine-tune (full safetensors or PEFT LoRA adapter) under ``model_id``.

    ``calib_texts`` (unlabeled samples of the fine-tune's inputs) let the recommended
    method be DAREx-q, and let ``darex_q`` go without a q: q is then searched on them by
    the output change (``storage.qsearch``). ``val`` (labeled examples, as
    ``storage.labeled.read_labeled`` returns them) does the same with q searched for the
    best metric on them (``storage.labeled``), and takes precedence over the texts.
    """
    t0 = time.perf_counter()
    validate_model_id(model_id)
    store.bind_if_new()  # a mismatch is refused now, not after the work
    task = default_task(base.arch, task)
    if encoding not in ENCODING_CHOICES:
        raise ValueError(f"encoding must be one of {ENCODING_CHOICES}, got {encoding!r}")
    if method == "darex_q" and q is None and not calib_texts and not val:
        raise PruningError(
            "method darex_q needs q, or labeled examples or calibration texts to search it on"
        )
    if method == "wanda" and col_norms is None and not calib_texts:
        raise PruningError(
            "method wanda needs calibration texts (calib): it weighs each delta entry by "
            "the norm of its input feature on them"
        )
    if not replace:
        try:
            store.registry.get_model(model_id)
        except UnknownModel:
            pass
        else:
            raise ModelExists(f"model {model_id!r} is already registered")
    report = progress or (lambda _f, _m: None)
    report(0.0, "validating")
    base_ckpt = open_checkpoint(base.path)
    lora = not isinstance(path, (list, tuple)) and is_lora_adapter(Path(path))
    if lora:
        from storage.lora_ingest import lora_source  # needs ingest.Source

        check_tensor_count(len(tensor_names(Path(path))), max_tensors)  # headers only
        source = lora_source(Path(path), base_ckpt)
    else:
        ft = open_checkpoint(path)
        check_tensor_count(len(ft.meta), max_tensors)
        source = _full_source(ft, base_ckpt)
    # Bad values are refused before the first blob is written: a refused
    # checkpoint leaves the store exactly as it was.
    report(0.01, "checking values")
    source.validate()
    _check_servable(source, base, base_ckpt, task, labels)
    selector = selector or default_patterns(base.arch)
    rate = DEFAULT_RATE if p is None else float(p)
    reason = "given"
    chosen = method is None
    if method is None:
        report(0.02, "choosing a method")
        method, rec_q, reason = _recommend(
            source, selector, lora, rate, bool(calib_texts), has_labels=bool(val)
        )
        q = q if q is not None else rec_q
    if method == "darex_q" and q is None and val:
        # A recommended DAREx-q is compared with magnitude and WANDA on the examples
        # (docs/results/reproduce.md scores that choice); a requested one only gets its q.
        report(0.03, "searching q on the labeled examples")
        found = _search_q_labeled(
            source, selector, base, path, lora, val, rate, seed, show_progress, chosen
        )
        method, q, col_norms = found.method, found.q, found.col_norms or col_norms
        reason += f"; {found.summary()}"
    elif method == "darex_q" and q is None:
        report(0.03, "searching q on the calibration texts")
        q = _search_q(source, selector, base, calib_texts or [], rate, seed, show_progress)
        reason += f"; q={q:g} by output change on the calibration texts"
    if method == "wanda" and col_norms is None:
        from storage.qsearch import wanda_col_norms

        report(0.03, "measuring input norms on the calibration texts")
        deltas_sel = _selected_deltas(source, selector)
        col_norms = wanda_col_norms(base.path, base.arch, deltas_sel, calib_texts)
        del deltas_sel
    log.info(
        "ingest %s: %s p=%s q=%s (%s)",
        model_id,
        method,
        rate,
        q,
        reason,
        extra={"model_id": model_id},
    )

    deltas: dict[str, TensorEntry] = {}
    extras: dict[str, TensorEntry] = {}
    total = len(source.deltas) + len(source.extras)
    bar = tqdm(total=total, desc=f"ingest {model_id}", unit="tensor", disable=not show_progress)
    done = 0
    for name, read in source.deltas.items():
        d = read()
        dtype = codec.dtype_name(source.base_dtypes[name])
        if d.numel() == 0:  # an integer buffer equal to the base
            pass
        elif selector.matches(name):
            tq = q.get(name) if isinstance(q, dict) else q
            cn = (col_norms or {}).get(name)
            m = method_for(method, d, cn)  # WANDA's tensors without input norms: magnitude
            blob, scale, enc = _encode_pruned(d, name, m, rate, tq, seed, encoding, value_dtype, cn)
            key = store.blobs.put(blob)
            h, _ = codec.read_header(blob)
            deltas[name] = TensorEntry(
                key=key,
                shape=tuple(d.shape),
                dtype=dtype,
                encoding=enc,
                value_dtype=h["value_dtype"],  # float32 where the values overflow float16
                nnz=h["nnz"],
                nbytes=len(blob),
                pruned=True,
                scale=scale,
            )
        else:
            blob = codec.encode_exact(d, name, value_dtype=exact_dtype)
            if blob is not None:
                h, _ = codec.read_header(blob)
                deltas[name] = TensorEntry(
                    key=store.blobs.put(blob),
                    shape=tuple(d.shape),
                    dtype=dtype,
                    encoding=h["encoding"],
                    value_dtype=h["value_dtype"],
                    nnz=h["nnz"],
                    nbytes=len(blob),
                    pruned=False,
                )
        done += 1
        bar.update(1)
        report(0.05 + 0.9 * done / max(total, 1), f"delta {name}")
    for name, read in source.extras.items():
        t = read()
        blob = codec.encode_dense(t, name)
        extras[name] = TensorEntry(
            key=store.blobs.put(blob),
            shape=tuple(t.shape),
            dtype=codec.dtype_name(t.dtype),
            encoding="dense",
            value_dtype=codec.dtype_name(t.dtype),
            nnz=t.numel(),
            nbytes=len(blob),
            pruned=False,
        )
        done += 1
        bar.update(1)
        report(0.05 + 0.9 * done / max(total, 1), f"extra {name}")
    bar.close()

    src_task, src_labels = source.task, source.labels
    manifest = Manifest(
        base=BaseRef(name=base.name, sha256=base.sha256),
        task=task or src_task,  # type: ignore[arg-type]
        labels=labels if labels is not None else src_labels,
        source=source.kind,  # type: ignore[arg-type]
        method=method,
        p=rate,
        q=q,
        seed=seed,
        reason=reason,
        deltas=deltas,
        extras=extras,
        fp16_bytes=source.fp16_bytes,
        tensor_bytes=sum({e.key: e.nbytes for e in [*deltas.values(), *extras.values()]}.values()),
    )
    report(0.97, "registering")
    key = store.register(model_id, manifest, replace=replace)
    seconds = time.perf_counter() - t0
    log.info(
        "ingested %s: %d deltas, %d extras, ratio 1/%.1f, %.2fs",
        model_id,
        len(deltas),
        len(extras),
        1 / manifest.ratio if manifest.ratio else math.inf,
        seconds,
        extra={"model_id": model_id},
    )
    report(1.0, "done")
    return IngestResult(model_id, key, manifest, seconds)
