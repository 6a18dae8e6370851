"""The delta store: blobs (immutable content) + registry (mutable names) + manifests.

``gc`` deletes only blobs that no registered manifest references, and only once
they are older than a grace period (an ingest in flight has written blobs it has
not registered yet; ``BlobStore.put`` refreshes the mtime of a blob it reuses).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from storage import codec
from storage.blobs import BlobStore, MissingBlob
from storage.codec import DecodedDelta
from storage.errors import CorruptBlob, StorageError, UnsupportedFormat
from storage.manifest import Manifest, TensorEntry
from storage.modelid import validate_model_id
from storage.registry import Registry, open_registry

log = logging.getLogger(__name__)

GC_GRACE_S = 3600.0


@dataclass
class GcReport:
    deleted: int = 0
    freed_bytes: int = 0
    kept: int = 0
    temps_deleted: int = 0
    young_unreferenced: int = 0  # unreferenced but inside the grace period


@dataclass
class VerifyReport:
    models: int = 0
    blobs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class DeltaStore:
    """``root/objects`` holds blobs; the registry maps model ids to manifest keys."""

    def __init__(self, root: Path | str, registry: Registry | str | None = None) -> None:
        self.root = Path(root)
        self.blobs = BlobStore(self.root)
        if registry is None:
            registry = f"sqlite:///{self.root / 'registry.sqlite3'}"
        self.registry = open_registry(registry) if isinstance(registry, str) else registry

    def close(self) -> None:
        self.registry.close()

    # ------------------------------------------------------------ manifests

    def put_manifest(self, manifest: Manifest) -> str:
        return self.blobs.put(manifest.to_bytes())

    def manifest_at(self, key: str) -> Manifest:
        return Manifest.from_bytes(self.blobs.get(key))

    def manifest(self, model_id: str) -> Manifest:
        """The registered manifest; ``UnknownModel`` when the id is not registered."""
        return self.manifest_at(self.registry.get_model(model_id))

    def register(self, model_id: str, manifest: Manifest, *, replace: bool = False) -> str:
        """Store the manifest and point ``model_id`` at it (atomic in the registry)."""
        validate_model_id(model_id)
        key = self.put_manifest(manifest)
        self.registry.set_model(model_id, key, replace=replace)
        log.info("registered %s -> %s", model_id, key, extra={"model_id": model_id})
        return key

    def models(self) -> dict[str, str]:
        return self.registry.list_models()

    def delete(self, model_id: str) -> bool:
        """Unregister; its blobs go at the next ``gc`` unless another manifest uses them."""
        gone = self.registry.delete_model(model_id)
        if gone:
            log.info("deleted %s", model_id, extra={"model_id": model_id})
        return gone

    # ------------------------------------------------------------ tensors

    def load_delta(self, entry: TensorEntry, device: torch.device | str = "cpu") -> DecodedDelta:
        """Flat sorted int64 indices + values of one tensor's delta, on ``device``."""
        dd = codec.decode(self.blobs.get(entry.key), device, shape=tuple(entry.shape))
        if dd.shape != tuple(entry.shape) or dd.nnz != entry.nnz:
            raise CorruptBlob(
                f"blob {entry.key}: holds shape {dd.shape} nnz {dd.nnz}, "
                f"manifest says {tuple(entry.shape)} nnz {entry.nnz}"
            )
        return dd

    def load_dense(self, entry: TensorEntry, device: torch.device | str = "cpu") -> torch.Tensor:
        """A dense tensor (extras such as a new classification head), exact, in its dtype."""
        t = codec.decode_dense(self.blobs.get(entry.key), device, shape=tuple(entry.shape))
        if tuple(t.shape) != tuple(entry.shape):
            raise CorruptBlob(f"blob {entry.key}: shape {tuple(t.shape)} != {tuple(entry.shape)}")
        return t

    # ------------------------------------------------------------ maintenance

    def referenced(self) -> set[str]:
        """Every blob key a registered model needs (manifests and their tensors)."""
        keys: set[str] = set()
        for model_id, mkey in self.registry.list_models().items():
            try:
                m = self.manifest_at(mkey)
            except (StorageError, KeyError) as e:
                # Unknown references: deleting anything now could lose data.
                raise CorruptBlob(f"model {model_id!r}: manifest {mkey} unreadable ({e})") from e
            keys.add(mkey)
            keys |= m.keys()
        return keys

    def gc(self, grace_s: float = GC_GRACE_S) -> GcReport:
        """Delete unreferenced blobs older than ``grace_s`` and stale temp files."""
        report = GcReport()
        live = self.referenced()
        doomed = []
        for key in list(self.blobs.iter_keys()):
            if key in live:
                report.kept += 1
                continue
            with contextlib.suppress(FileNotFoundError):
                if self.blobs.age_s(key) < grace_s:
                    report.young_unreferenced += 1
                else:
                    doomed.append(key)
        live = self.referenced()  # a model registered while we scanned keeps its blobs
        for key in doomed:
            if key in live:
                report.kept += 1
                continue
            report.freed_bytes += self.blobs.delete(key)
            report.deleted += 1
        for tmp in self.blobs.stale_temps(grace_s):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                report.temps_deleted += 1
        log.info("gc: %s", report)
        return report

    def verify(self) -> VerifyReport:
        """Every registered manifest and blob readable, hashing to its key, decodable."""
        report = VerifyReport()
        checked: set[str] = set()
        for model_id, mkey in self.registry.list_models().items():
            report.models += 1
            try:
                m = self.manifest_at(mkey)
            except (StorageError, KeyError) as e:
                report.problems.append(f"{model_id}: manifest {mkey}: {e}")
                continue
            checked.add(mkey)
            for name, entry in {**m.deltas, **m.extras}.items():
                if entry.key in checked:
                    continue
                checked.add(entry.key)
                try:
                    codec.read_header(self.blobs.get(entry.key))
                except (CorruptBlob, MissingBlob, UnsupportedFormat) as e:
                    report.problems.append(f"{model_id}: tensor {name}: {e}")
        for key in self.blobs.iter_keys():
            report.blobs += 1
            if key not in checked and not self.blobs.verify(key):
                report.problems.append(f"unreferenced blob {key} is corrupt")
        return report
