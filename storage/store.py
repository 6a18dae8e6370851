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

The store records the id of the registry its models are registered in
(``root/registry.id``): a server binds it at startup (its registry is the
deployment's), an ingest or a registration only when the store is new (it holds
no other blob). ``register``, ``ingest`` and ``gc`` refuse another registry with
``RegistryMismatch``: run against an empty or wrong registry (a shell without
``DAREX_REGISTRY_URL``, a Redis that came back empty), ``gc`` would see no model
and delete every blob. An unbound store that holds blobs (made before the record)
is not checked, but gc refuses it while the registry lists no model. ``rebind``
adopts the open registry when the recorded one is gone for good.

Replacing or removing a model refreshes its old blobs' mtime, so gc's grace period
also covers a replica still loading the old version.

Each manifest names the base it was ingested against (``base.sha256``, the
content hash of ``storage.bases.weights_sha256``). ``serving_base``, set by a
server to the hash of its resident base, limits ``models()`` to that base's
fine-tunes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from storage import codec
from storage.blobs import BlobStore, MissingBlob, fsync_dir, write_atomic
from storage.codec import DecodedDelta
from storage.errors import (
    CorruptBlob,
    RegistryMismatch,
    StorageError,
    UnknownModel,
    UnsupportedFormat,
)
from storage.manifest import Manifest, TensorEntry
from storage.modelid import validate_model_id
from storage.registry import Registry, open_registry

log = logging.getLogger(__name__)

GC_GRACE_S = 3600.0
REGISTRY_ID_FILE = "registry.id"


def shown_url(url: str) -> str:
    """A registry URL without its password (redis://user:secret@host -> redis://user:***@host)."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


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
    # corrupt blobs no registered model references (a version replaced since): nothing
    # serves them, the next gc removes them, and ``put`` rewrites one it would reuse
    unreferenced_corrupt: list[str] = field(default_factory=list)

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

    def __enter__(self) -> DeltaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ manifests

    def put_manifest(self, manifest: Manifest) -> str:
        return self.blobs.put(manifest.to_bytes())

    def manifest_at(self, key: str) -> Manifest:
        return Manifest.from_bytes(self.blobs.get(key))

    def manifest(self, model_id: str) -> Manifest:
        """The registered manifest; ``UnknownModel`` when the id is not registered,
        ``MissingBlob`` / ``CorruptBlob`` / ``UnsupportedFormat`` naming the model when its
        manifest cannot be read."""
        return self._manifest_of(model_id, self.registry.get_model(model_id))

    def _manifest_of(self, model_id: str, key: str) -> Manifest:
        """``manifest_at(key)``, its errors naming the model (and a way out)."""
        fix = f"run `darex verify`; then upload it again with replace, or `darex rm {model_id}`"
        try:
            return self.manifest_at(key)
        except MissingBlob as e:
            raise MissingBlob(
                f"model {model_id!r}: its manifest blob {key} is missing from the store ({fix})"
            ) from e
        except UnsupportedFormat as e:
            raise UnsupportedFormat(
                f"model {model_id!r}: manifest {key}: {e} (written by a newer darex-serve?)"
            ) from e
        except (CorruptBlob, ValueError, OSError) as e:
            # ValueError: a registry entry that is not a blob key, a manifest that does not
            # parse; OSError: a file this process may not read
            raise CorruptBlob(f"model {model_id!r}: manifest {key} unreadable: {e} ({fix})") from e

    def register(self, model_id: str, manifest: Manifest, *, replace: bool = False) -> str:
        """Store the manifest and point ``model_id`` at it (atomic in the registry).

        Under the blob lock (shared), every blob the manifest references is
        refreshed (gc grace) and must still be there; then the entry is written.
        A blob a concurrent ``gc`` removed raises ``MissingBlob``, nothing registered.
        """
        validate_model_id(model_id)
        key = self.put_manifest(manifest)
        self.bind_if_new({key, *manifest.keys()})
        old = self._registered_key(model_id) if replace else None
        with self.blobs.locked():
            for k in [key, *sorted(manifest.keys())]:
                try:
                    self.blobs.touch(k)
                except MissingBlob as e:
                    raise MissingBlob(
                        f"model {model_id!r} was not registered: its blob {k} left the store "
                        "before registration (a concurrent `darex gc`?); run the ingest again"
                    ) from e
            self._refresh(old if old != key else None)
            self.registry.set_model(model_id, key, replace=replace)
        log.info("registered %s -> %s", model_id, key, extra={"model_id": model_id})
        return key

    # ------------------------------------------------------------ the store's registry

    def _recorded_registry(self) -> str | None:
        path = self.root / REGISTRY_ID_FILE
        try:
            return path.read_text(encoding="utf-8").strip() or None  # empty: a torn write
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise RegistryMismatch(
                f"{path} is a folder, not the store's registry record; remove it, then run "
                "`darex rebind --yes`"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise RegistryMismatch(
                f"{path} cannot be read ({e}); rewrite it: `darex rebind --yes`"
            ) from None

    def _mismatch(self, recorded: str, rid: str | None) -> str:
        which = f"registry {rid}" if rid else "a registry that was never bound to a store"
        return (
            f"the store {self.root} belongs to registry {recorded}, but "
            f"{shown_url(self.registry.url)} is {which}: the store's models are registered "
            "in the other one, and a gc here would delete their blobs. Point "
            "DAREX_REGISTRY_URL at the store's registry (the one the server uses); if that "
            "registry is lost for good (a Redis that came back empty), `darex rebind --yes` "
            "makes this one the store's"
        )

    def registry_problem(self) -> str | None:
        """Why the open registry is not the store's (``RegistryMismatch``'s text), or None.

        Reads only: neither the store nor the registry is written. An unbound store (made
        before the record, or with nothing registered yet) has no problem.
        """
        recorded = self._recorded_registry()
        if recorded is None:
            return None
        rid = self.registry.registry_id(create=False)
        return None if rid == recorded else self._mismatch(recorded, rid)

    def check_registry(self) -> None:
        """``RegistryMismatch`` when the open registry is not the store's."""
        if problem := self.registry_problem():
            raise RegistryMismatch(problem)

    def bind_registry(self) -> str | None:
        """Record the open registry as the store's when the store has none yet; the
        mismatch's text when it has another (nothing written then), else None.

        A server calls it at startup: its registry is the deployment's. A registration
        calls it only for a new store (``bind_if_new``).
        """
        if self._recorded_registry() is None:
            rid = self.registry.registry_id(create=True)
            recorded = self._write_registry_id(rid, exclusive=True)
            if recorded == rid:
                log.info("store %s bound to registry %s", self.root, rid)
        return self.registry_problem()

    def bind_if_new(self, keys: Iterable[str] = ()) -> None:
        """Refuse another registry; bind an unbound store that holds no blob but ``keys``
        (a new store: an ingest's start, or its registration). An unbound store holding
        other blobs (made before the record) is left for its server or `darex rebind
        --yes` to bind: a stray registration must not decide where its models are."""
        if self._recorded_registry() is None:
            if set(self.blobs.iter_keys()) <= set(keys):
                self.bind_registry()
            return
        self.check_registry()

    def _write_registry_id(self, rid: str, *, exclusive: bool) -> str:
        """Write ``registry.id`` durably; ``exclusive``: only if absent or empty (returns
        the id it holds after: ours, or a racing writer's)."""
        dst = self.root / REGISTRY_ID_FILE
        data = (rid + "\n").encode()
        if exclusive and self._recorded_registry() is None:
            try:
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:  # a racing writer's, or an empty one a crash left
                pass
            else:
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(self.root)
        if not exclusive or self._recorded_registry() is None:
            # the temp file is not in blobs.tmp: gc sweeps that folder
            write_atomic(self.root / f".{REGISTRY_ID_FILE}.{uuid.uuid4().hex}.tmp", dst, data)
        return self._recorded_registry() or rid

    def rebind(self) -> tuple[str | None, str]:
        """Make the open registry the store's; returns (the id recorded before, the new id).

        For a store whose registry is lost for good, or an unbound one: blobs of models
        not registered in this registry are unreferenced from now on, and go at the next
        ``gc``.
        """
        path = self.root / REGISTRY_ID_FILE
        try:
            old = self._recorded_registry() if path.exists() else None
        except RegistryMismatch:
            if path.is_dir():  # not replaced: a folder is not ours to delete
                raise
            old = "an unreadable record"  # what `darex rebind --yes` is told to rewrite
        rid = self.registry.registry_id(create=True)
        self._write_registry_id(rid, exclusive=False)
        log.warning("store %s bound to registry %s (was %s)", self.root, rid, old or "none")
        return old, rid

    def _registered_key(self, model_id: str) -> str | None:
        try:
            return self.registry.get_model(model_id)
        except UnknownModel:
            return None

    def _refresh(self, manifest_key: str | None) -> None:
        """Refresh the mtime of a manifest about to leave the registry (None: none) and of
        its blobs (just the manifest's if it cannot be read). Call it with the blob lock
        held, before the registry changes: a gc then either still sees it registered or
        finds it fresh, and its grace period covers a replica still loading it. Best
        effort."""
        if manifest_key is None:
            return
        try:
            keys = {manifest_key, *self.manifest_at(manifest_key).keys()}
        except (StorageError, KeyError, ValueError, OSError):
            keys = {manifest_key}
        for k in keys:
            with contextlib.suppress(MissingBlob, OSError, ValueError):
                self.blobs.touch(k)

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
            except (StorageError, KeyError, ValueError, OSError) as e:
                log.warning("manifest unreadable: %s", e, extra={"model_id": model_id})
            out[model_id] = key
        return out

    def delete(self, model_id: str, *, expected: str | None = None) -> bool:
        """Unregister; its blobs go at the next ``gc`` (once past its grace period, counted
        from now) unless another manifest uses them. ``expected``: only while the id still
        points at this manifest key (False, nothing deleted, otherwise)."""
        old = expected or self._registered_key(model_id)
        with self.blobs.locked():
            self._refresh(old)
            gone = self.registry.delete_model(model_id, expected=expected)
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
            # A manifest that cannot be read leaves unknown references: deleting anything
            # now could lose data, so its error stops gc
            m = self._manifest_of(model_id, mkey)
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
        self.check_registry()
        unbound = self._recorded_registry() is None
        if (
            unbound
            and not self.registry.list_models()
            and any(True for _ in self.blobs.iter_keys())
        ):
            raise RegistryMismatch(
                f"the store {self.root} holds blobs but is not bound to a registry, and "
                f"{shown_url(self.registry.url)} lists no model: a gc would delete "
                "every blob. If this is the store's registry, `darex rebind --yes` "
                "binds it (then gc); else point DAREX_REGISTRY_URL at the one the "
                "server uses"
            )
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
            # under the exclusive lock: ``put`` writes its temp files under the shared one,
            # so none of these is a write in flight
            for tmp in self.blobs.stale_temps(grace_s):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    report.temps_deleted += 1
        log.info("gc: %s", report)
        return report

    def verify(self) -> VerifyReport:
        """Every registered manifest and blob readable, hashing to its key, decodable."""
        report = VerifyReport()
        if problem := self.registry_problem():
            report.problems.append(problem)
        checked: set[str] = set()
        for model_id, mkey in self.registry.list_models().items():
            report.models += 1
            checked.add(mkey)  # reported here if unreadable, not again as unreferenced
            try:
                m = self._manifest_of(model_id, mkey)
            except StorageError as e:
                report.problems.append(str(e))
                continue
            for name, entry in {**m.deltas, **m.extras}.items():
                if entry.key in checked:
                    continue
                checked.add(entry.key)
                try:
                    codec.read_header(self.blobs.get(entry.key))
                except (CorruptBlob, MissingBlob, UnsupportedFormat, ValueError, OSError) as e:
                    report.problems.append(f"{model_id}: tensor {name}: {e}")
        for key in self.blobs.iter_keys():
            report.blobs += 1
            if key not in checked and not self.blobs.verify(key):
                report.unreferenced_corrupt.append(key)
        return report
