"""The delta store: blobs (immutable content) + registry (mutable names) + manifests.

``gc`` deletes only blobs that no registered manifest references, and only once
they are older than a grace period (an ingest in flight has written blobs it has
not registered yet; ``BlobStore.put`` refreshes the mtime of a blob it reuses).
It decides in two steps: a scan without a lock, then, under the blob store's
exclusive lock, a re-check of each candidate (still unreferenced, still older than
the grace period) right before it is unlinked. ``register`` refreshes and checks
every blob of the manifest and writes the registry entry under the shared lock,
so a model is never registered with a blob gc removed: either gc sees the new
entry (or the fresh mtimes) and keeps the blobs, or ``register`` finds a blob
gone and raises ``MissingBlob`` with nothing registered.

Each manifest names the base it was ingested against (``base.sha256``, the
content hash of ``storage.bases.weights_sha256``). ``serving_base``, set by a
server to the hash of its resident base, limits ``models()`` to that base's
fine-tunes.
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
        # The base a server serves from this store (``BaseInfo.sha256``): ``models()`` lists
        # only its fine-tunes. None (the CLI, tests): every registered model.
        self.serving_base: str | None = None
        # manifest key -> (base sha256, created, unix seconds); manifests are immutable
        self._facts: dict[str, tuple[str, float]] = {}

    def close(self) -> None:
        self.registry.close()

    # ------------------------------------------------------------ manifests

    def put_manifest(self, manifest: Manifest) -> str:
        return self.blobs.put(manifest.to_bytes())

    def manifest_at(self, key: str) -> Manifest:
        return Manifest.from_bytes(self.blobs.get(key))

    def manifest(self, model_id: str) -> Manifest:
        """The registered manifest; ``UnknownModel`` when the id is not registered,
        ``MissingBlob`` (naming the model) when its manifest blob is gone."""
        key = self.registry.get_model(model_id)
        try:
            return self.manifest_at(key)
        except MissingBlob as e:
            raise MissingBlob(
                f"model {model_id!r}: its manifest blob {key} is missing from the store "
                f"(run `darex verify`; then upload the fine-tune again with replace, "
                f"or `darex rm {model_id}`)"
            ) from e

    def register(self, model_id: str, manifest: Manifest, *, replace: bool = False) -> str:
        """Store the manifest and point ``model_id`` at it (atomic in the registry).

        Under the blob lock (shared), every blob the manifest references is
        refreshed (gc grace) and must still be there; then the entry is written.
        A blob a concurrent ``gc`` removed raises ``MissingBlob``, nothing registered.
        """
        validate_model_id(model_id)
        key = self.put_manifest(manifest)
        with self.blobs.locked():
            for k in [key, *sorted(manifest.keys())]:
                try:
                    self.blobs.touch(k)
                except MissingBlob as e:
                    raise MissingBlob(
                        f"model {model_id!r} was not registered: its blob {k} left the store "
                        "before registration (a concurrent `darex gc`?); run the ingest again"
                    ) from e
            self.registry.set_model(model_id, key, replace=replace)
        log.info("registered %s -> %s", model_id, key, extra={"model_id": model_id})
        return key

    def _facts_of(self, manifest_key: str) -> tuple[str, float]:
        facts = self._facts.get(manifest_key)
        if facts is None:
            m = self.manifest_at(manifest_key)
            facts = self._facts[manifest_key] = (m.base.sha256, m.created.timestamp())
        return facts

    def base_of(self, manifest_key: str) -> str:
        """The base sha256 a manifest was ingested against (cached: manifests are immutable)."""
        return self._facts_of(manifest_key)[0]

    def created_of(self, manifest_key: str) -> float:
        """When a manifest was made, in unix seconds (cached with ``base_of``)."""
        return self._facts_of(manifest_key)[1]

    def models(self, base_sha256: str | None = None) -> dict[str, str]:
        """``model_id -> manifest key`` of the registered models.

        With ``base_sha256`` (default: ``serving_base``) only the fine-tunes of
        that base; a model whose manifest cannot be read stays listed (using it
        names the problem). Each manifest is read once per process.
        """
        models = self.registry.list_models()
        base = base_sha256 if base_sha256 is not None else self.serving_base
        if base is None:
            return models
        out: dict[str, str] = {}
        for model_id, key in models.items():
            try:
                if self.base_of(key) != base:
                    continue
            except (StorageError, KeyError) as e:
                log.warning("model %s: manifest unreadable: %s", model_id, e)
            out[model_id] = key
        return out

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
        """Delete unreferenced blobs older than ``grace_s`` and stale temp files.

        The scan picks candidates without a lock; each is re-checked right before
        it is unlinked, under the exclusive blob lock: a blob an ingest reused
        meanwhile (``put`` refreshed its mtime) is young again and stays, and a
        model registered meanwhile (the registry's version moved) keeps its blobs.
        """
        report = GcReport()
        version = self.registry.version()
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
        with self.blobs.locked(exclusive=True):
            if self.registry.version() != version:
                live = self.referenced()  # a model registered while we scanned keeps its blobs
            for key in doomed:
                if key in live:
                    report.kept += 1
                    continue
                try:
                    young = self.blobs.age_s(key) < grace_s  # reused since the scan
                except FileNotFoundError:
                    continue
                if young:
                    report.young_unreferenced += 1
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
