"""Where the engine gets a fine-tune's delta, and its resident form over the flat buffer.

A source yields a ``ModelDelta``: per base parameter (the base's own state_dict
name) the flat indices into that tensor and the already-rescaled values, plus
the fine-tune's dense extras (a new classification head) and its task.

The resident form maps those onto the engine's flat buffer::

    idx = concat_t(offset[t] + flat_idx[t])      # sorted, unique, int64
    val = concat_t(values[t]).to(buffer dtype)   # same order as idx

so one fused scatter over ``idx`` activates the whole fine-tune.

A delta only means something on the base it was taken against. ``StoreSource``
given the resident base's hash (``storage.bases.BaseInfo.sha256``, the same
``weights_sha256`` that ingest writes to ``manifest.base.sha256``) refuses a
fine-tune of another base with ``BaseMismatch`` naming both hashes. The check
reads the manifest the source reads anyway, so it costs one string comparison
per ``info`` (cached by the engine) and per ``load`` (once per decode).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from pruning.sparse import SparseDelta
from storage.blobs import MissingBlob
from storage.errors import BaseMismatch, CorruptBlob, UnknownModel, UnsupportedFormat

if TYPE_CHECKING:
    from storage.manifest import Manifest

TASKS = ("causal-lm", "sequence-classification", "feature-extraction")


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs before decoding: the task and the label names."""

    task: str
    labels: list[str] | None = None


@dataclass
class ModelDelta:
    """A decoded fine-tune: sparse deltas on base parameters + dense extras."""

    params: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (flat idx int64, values)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    task: str = "causal-lm"
    labels: list[str] | None = None


class DeltaSource(Protocol):
    """Anything that can hand the engine a fine-tune by model_id (raises ``UnknownModel``)."""

    def info(self, model_id: str) -> ModelInfo: ...

    def load(self, model_id: str) -> ModelDelta: ...


class MemorySource:
    """An in-memory source, filled directly from ``pruning`` outputs (tests, benches)."""

    def __init__(self) -> None:
        self._models: dict[str, ModelDelta] = {}

    def add(self, model_id: str, delta: ModelDelta) -> None:
        if delta.task not in TASKS:
            raise ValueError(f"{model_id}: unknown task {delta.task!r}, expected one of {TASKS}")
        self._models[model_id] = delta

    def add_sparse(
        self,
        model_id: str,
        deltas: Mapping[str, SparseDelta],
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
        task: str = "causal-lm",
        labels: list[str] | None = None,
    ) -> None:
        params = {name: (sd.indices, sd.values) for name, sd in deltas.items()}
        self.add(model_id, ModelDelta(params, dict(extras or {}), task, labels))

    def remove(self, model_id: str) -> None:
        self._models.pop(model_id, None)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def info(self, model_id: str) -> ModelInfo:
        d = self._get(model_id)
        return ModelInfo(d.task, d.labels)

    def load(self, model_id: str) -> ModelDelta:
        return self._get(model_id)

    def _get(self, model_id: str) -> ModelDelta:
        try:
            return self._models[model_id]
        except KeyError:
            raise UnknownModel(f"no model registered under {model_id!r}") from None


class StoreSource:
    """Adapter over ``storage.store.DeltaStore``: manifest -> decoded tensors on the host.

    With ``base_sha256`` (the resident base's ``BaseInfo.sha256``) a manifest
    ingested against another base raises ``BaseMismatch``; None skips the check.
    """

    def __init__(
        self, store: object, base_sha256: str | None = None, base_name: str | None = None
    ) -> None:
        self.store = store
        self.base_sha256 = base_sha256
        self.base_name = base_name

    def _manifest(self, model_id: str) -> Manifest:
        m = self.store.manifest(model_id)  # type: ignore[attr-defined]
        if self.base_sha256 is not None and m.base.sha256 != self.base_sha256:
            raise BaseMismatch(
                f"model {model_id!r} was stored against base {m.base.name!r} "
                f"(sha256 {m.base.sha256}), but this server's base "
                f"{self.base_name or 'base'!r} has sha256 {self.base_sha256}: its delta "
                "would patch other weights. Upload the fine-tune again against this base, "
                "or serve it with the base it was stored against"
            )
        return m

    def info(self, model_id: str) -> ModelInfo:
        m = self._manifest(model_id)
        return ModelInfo(m.task, list(m.labels) if m.labels else None)

    def load(self, model_id: str) -> ModelDelta:
        m = self._manifest(model_id)
        params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        extras: dict[str, torch.Tensor] = {}
        name = ""
        try:
            for name, entry in m.deltas.items():
                d = self.store.load_delta(entry, "cpu")  # type: ignore[attr-defined]
                params[name] = (d.indices, d.values)
            for name, entry in m.extras.items():
                extras[name] = self.store.load_dense(entry, "cpu")  # type: ignore[attr-defined]
        except (MissingBlob, CorruptBlob, UnsupportedFormat) as e:
            raise type(e)(
                f"model {model_id!r}: tensor {name}: {e} (run `darex verify`; then upload "
                f"the fine-tune again with replace, or `darex rm {model_id}`)"
            ) from e
        return ModelDelta(params, extras, m.task, list(m.labels) if m.labels else None)


@dataclass(frozen=True)
class Slot:
    """Where one named parameter lives in the flat buffer."""

    offset: int
    numel: int
    shape: tuple[int, ...]


@dataclass
class ResidentDelta:
    """A fine-tune ready to scatter: sorted unique flat indices + values in the buffer dtype."""

    model_id: str
    idx: torch.Tensor  # (nnz,) int64, sorted, unique
    val: torch.Tensor  # (nnz,) buffer dtype
    extras: dict[str, torch.Tensor]
    task: str
    labels: list[str] | None

    @property
    def nbytes(self) -> int:
        n = self.idx.numel() * self.idx.element_size() + self.val.numel() * self.val.element_size()
        return n + sum(t.numel() * t.element_size() for t in self.extras.values())

    def to(self, device: torch.device, *, pin: bool = False) -> ResidentDelta:
        """A copy on ``device`` (the same object when already there); ``pin`` for host copies."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device == device:
                return t
            if device.type == "cuda":  # async only from pinned memory; stream-ordered after
                return t.to(device, non_blocking=t.is_pinned())
            out = t.to(device)  # device -> host stays synchronous
            return out.pin_memory() if pin else out

        if self.idx.device == device:
            return self
        return ResidentDelta(
            self.model_id,
            move(self.idx),
            move(self.val),
            {k: move(v) for k, v in self.extras.items()},
            self.task,
            self.labels,
        )


def to_resident(
    model_id: str,
    delta: ModelDelta,
    slots: Mapping[str, Slot],
    dtype: torch.dtype,
    extras_dtype: torch.dtype | None = None,
) -> ResidentDelta:
    """Map a ``ModelDelta`` onto the flat buffer (on the host).

    ``idx = offset + flat_idx`` per tensor, concatenated in buffer order. Tied
    names (two names, one slot) are applied once: the first name in the delta wins.
    """
    seen: dict[int, str] = {}
    parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for name, (fidx, vals) in delta.params.items():
        slot = slots.get(name)
        if slot is None:
            raise BaseMismatch(f"{model_id}: delta names {name!r}, which the base does not have")
        if slot.offset in seen:
            continue  # tied weight already covered by seen[slot.offset]
        seen[slot.offset] = name
        fidx = fidx.to("cpu", torch.int64).flatten()
        vals = vals.to("cpu").flatten()
        if fidx.numel() != vals.numel():
            raise BaseMismatch(
                f"{model_id}: {name} has {fidx.numel()} indices but {vals.numel()} values"
            )
        if fidx.numel() and (int(fidx.min()) < 0 or int(fidx.max()) >= slot.numel):
            raise BaseMismatch(
                f"{model_id}: {name} index out of range for shape {slot.shape} "
                f"(max {int(fidx.max())}, numel {slot.numel})"
            )
        parts.append((slot.offset, fidx, vals))
    parts.sort(key=lambda x: x[0])
    if parts:
        idx = torch.cat([off + fi for off, fi, _ in parts])
        val = torch.cat([v.to(dtype) for _, _, v in parts])
    else:
        idx = torch.empty(0, dtype=torch.int64)
        val = torch.empty(0, dtype=dtype)
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        order = torch.argsort(idx)
        idx, val = idx[order], val[order]
        if not bool((idx[1:] > idx[:-1]).all()):
            raise BaseMismatch(f"{model_id}: duplicate indices in a delta tensor")
    extras = {k: v.to("cpu", extras_dtype or dtype) for k, v in delta.extras.items()}
    return ResidentDelta(
        model_id, idx.contiguous(), val.contiguous(), extras, delta.task, delta.labels
    )
