"""The manifest of one stored fine-tune: JSON, content-addressed like every blob.

``deltas`` are keyed by the base's own state_dict names; ``extras`` are dense
tensors the base does not have (a new classification head), keyed by the
fine-tune's names. ``ratio = stored_bytes / fp16_bytes`` where ``stored_bytes``
counts every tensor blob plus the manifest itself and ``fp16_bytes = 2 * numel``
of the fine-tuned checkpoint (every tensor as fp16).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.errors import CorruptBlob, UnsupportedFormat

MANIFEST_FORMAT = 1
Task = Literal["causal-lm", "sequence-classification", "feature-extraction"]
TASKS: tuple[str, ...] = get_args(Task)


class BaseRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    sha256: str


class TensorEntry(BaseModel):
    """One tensor blob: what it holds and how it is encoded."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(pattern=r"^[0-9a-f]{64}$")
    shape: tuple[int, ...]
    dtype: str  # dtype of the base tensor (deltas) or of the stored tensor (extras)
    encoding: Literal["seed", "explicit", "dense"]
    value_dtype: str
    nnz: int
    nbytes: int
    pruned: bool = True  # False: an exact (unpruned) delta or an extra
    scale: float | None = None  # rescale applied to kept entries (1/(1-p), 1/q, 1)


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    format: int = MANIFEST_FORMAT
    base: BaseRef
    task: Task = "feature-extraction"
    labels: list[str] | None = None
    source: Literal["full", "lora"] = "full"
    method: str
    p: float
    q: float | dict[str, float] | None = None
    seed: int = 0
    reason: str = ""
    deltas: dict[str, TensorEntry] = Field(default_factory=dict)
    extras: dict[str, TensorEntry] = Field(default_factory=dict)
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    fp16_bytes: int = 0
    tensor_bytes: int = 0  # sum of the tensor blobs' sizes

    def keys(self) -> set[str]:
        """Every tensor blob this manifest references."""
        return {e.key for e in self.deltas.values()} | {e.key for e in self.extras.values()}

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    def stored_bytes(self) -> int:
        return self.tensor_bytes + len(self.to_bytes())

    @property
    def ratio(self) -> float:
        """Bytes stored / bytes of the fine-tune as an fp16 checkpoint."""
        return self.stored_bytes() / self.fp16_bytes if self.fp16_bytes else float("nan")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            fmt = json.loads(data).get("format")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise CorruptBlob(f"manifest is not a JSON object: {e}") from e
        if fmt != MANIFEST_FORMAT:
            raise UnsupportedFormat(
                f"manifest format {fmt!r} is not supported (this build reads {MANIFEST_FORMAT})"
            )
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            raise CorruptBlob(f"manifest does not validate: {e}") from e
