"""Admin, behind the bearer token: upload a fine-tune, follow its job, inspect, delete.

``POST /admin/models`` streams a multipart body to disk (size limit ->
413), checks the checkpoint's tensor headers against the base at once (a
mismatch -> 422 naming the tensor, before any job exists), then returns a job
id while the ingest (prune, encode, store, register) runs on a background
thread that writes its progress to the registry.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request

from pruning.methods import q_problem
from server.api.deps import SettingsDep, StateDep, StoreDep, require_admin
from server.api.jobs import effective_job
from server.api.schemas import Deleted, JobAccepted, JobPublic, ModelPublic
from server.api.state import AppState
from server.api.upload import Upload, receive_upload
from server.errors import InvalidRequest, SchedulerClosed
from server.logging import model_id_var
from server.settings import rate_problem
from storage.blobs import MissingBlob
from storage.errors import (
    BadCheckpoint,
    CorruptBlob,
    IngestInProgress,
    ModelExists,
    StorageError,
    UnknownModel,
)
from storage.manifest import TASKS
from storage.modelid import validate_model_id
from storage.qsearch import read_calib_texts

if TYPE_CHECKING:
    from storage.manifest import Manifest
    from storage.registry import Job, Registry
    from storage.store import DeltaStore

log = logging.getLogger(__name__)
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

METHODS = ("dare", "darex_q", "magnitude", "wanda", "structural")


def _number_field(up: Upload, name: str) -> float | None:
    raw = up.fields.get(name)
    if raw in (None, ""):
        return None
    try:
        return float(raw)
    except ValueError:
        raise InvalidRequest(f"{name}: {raw!r} is not a number", field=name) from None


def _bool_field(up: Upload, name: str) -> bool:
    """A yes/no form field: true/false, 1/0, yes/no (any case); absent or empty is false."""
    raw = up.fields.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise InvalidRequest(
        f"{name}: {up.fields[name]!r} is not a yes/no value (true or false)", field=name
    )


def _val_field(up: Upload, method: str | None, q: float | None) -> list[dict] | None:
    """The labeled examples of the ``val`` field, checked against the uploaded config's
    labels when it names them; None when the field is absent."""
    from pruning.errors import PruningError
    from storage.labeled import check_against_config, check_val_options, read_labeled

    if "val" not in up.fields:
        return None
    try:
        check_val_options(method, q)
        rows = read_labeled(up.fields["val"])
        check_against_config(rows, up.folder)
    except BadCheckpoint:
        raise  # the uploaded config.json is bad, not the examples: 422 bad_checkpoint
    except (PruningError, ValueError) as e:
        raise InvalidRequest(str(e), field="val") from None
    return rows


def _checkpoint_path(up: Upload) -> Path:
    """The folder (HF model or PEFT adapter) that ingest reads; refuses pickles and empties."""
    names = set(up.files)
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if Path(n).suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        why = (
            f"pickle files {sorted(pickles)} are refused (they can run code when loaded)"
            if pickles
            else f"got {sorted(names) or 'no files'}"
        )
        raise InvalidRequest(f"files: expected .safetensors weights; {why}", field="files")
    return up.folder


def _precheck(state: AppState, folder: Path, task: str | None) -> None:
    """Header-only checks before a job exists: the store's registry, the tensor count (full
    checkpoint or LoRA adapter, ``DAREX_MAX_TENSORS``), a full checkpoint's shapes against
    the base, and whether the base can serve it (``storage.ingest.servable_problem``: the
    task sent, else the one its config names; the head's shape)."""
    from storage.bases import tensor_names
    from storage.checkpoint import open_checkpoint, plan_against_base, read_task
    from storage.ingest import (
        check_tensor_count,
        default_task,
        is_lora_adapter,
        servable_problem,
    )

    state.store.check_registry()
    lora = is_lora_adapter(folder)
    if lora:
        raw = tensor_names(folder)
        check_tensor_count(len(raw), state.settings.max_tensors)
    else:
        ckpt = open_checkpoint(folder)
        check_tensor_count(len(ckpt.meta), state.settings.max_tensors)
    if state.base is None:
        return
    base_ckpt = open_checkpoint(state.base.path)
    task = default_task(state.base.arch, task)
    if lora:
        from storage.lora import adapter_name

        # as storage.lora.read_adapter names them; shapes are checked by the ingest
        tensors: dict[str, tuple[int, ...] | None] = dict.fromkeys(adapter_name(n) for n in raw)
        implied, labels = (_lora_task(folder) if task is None else ""), None
    else:
        plan_against_base(ckpt, base_ckpt)
        implied, labels = read_task(ckpt.config)
        tensors = {n: tuple(m.shape) for n, m in ckpt.meta.items()}
    kind = "lora" if lora else "full"
    instead = "send task=feature-extraction to serve it on /v1/embeddings"
    why = servable_problem(
        state.base, base_ckpt.config, task, implied, kind, tensors, labels, instead
    )
    if why:
        raise InvalidRequest(why, field="task")


def _lora_task(folder: Path) -> str:
    """The task a PEFT adapter's ``task_type`` names, as ``storage.lora_ingest`` reads it."""
    from storage.lora import read_config
    from storage.lora_ingest import lora_task

    try:
        cfg = read_config(folder)
    except BadCheckpoint:
        raise
    except (ValueError, RecursionError) as e:  # not UTF-8, nested too deeply
        raise BadCheckpoint(f"{folder / 'adapter_config.json'} is not JSON: {e}") from None
    return lora_task(cfg)


def _hide_upload_path(text: str, up: Upload) -> str:
    """``text`` naming the uploaded files, not where the server keeps them: the temp
    folder's path (the data dir's layout) is dropped."""
    for f in sorted({str(up.folder), str(up.folder.resolve())}, key=len, reverse=True):
        text = text.replace(f + os.sep, "").replace(f, "the upload")
    return text


async def _create_job(state: AppState, store: DeltaStore, model_id: str) -> Job:
    """The upload's job, unless this server is still ingesting another upload of the same
    model_id: that one would be redone in full and then fail ("already registered") or
    race the first for the name, so it is a 409 naming the job. Per process: a job left
    by a server that died does not block the upload that replaces it."""
    with state.ingesting_lock:
        if model_id in state.ingesting:
            raise IngestInProgress(model_id, state.ingesting[model_id] or None)
        state.ingesting[model_id] = ""  # held while the job is created
    try:
        job = await asyncio.to_thread(store.registry.create_job, model_id, "queued")
    except BaseException:
        _release(state, model_id, "")
        raise
    with state.ingesting_lock:
        state.ingesting[model_id] = job.id
    return job


def _release(state: AppState, model_id: str, job_id: str) -> None:
    with state.ingesting_lock:
        if state.ingesting.get(model_id) == job_id:
            del state.ingesting[model_id]


def _report_progress(reg: Registry, job_id: str, fraction: float, message: str) -> None:
    """Write an ingest's progress to its job, best effort: a registry out for a moment
    must not throw away the ingest (only its final write needs the registry)."""
    try:
        reg.update_job(job_id, progress=fraction, message=message)
    except StorageError as e:
        log.warning("job progress not recorded: %s", e, extra={"job_id": job_id})


FORGET_TIMEOUT_S = 300.0  # a batch in flight finishes first; longer than the longest one


def _forget_cached(state: AppState, model_id: str) -> None:
    """Drop this server's cached copy of a model just stored (a replaced version's delta,
    task and labels), between batches, before its job reads done: from then on every
    request runs the new version. The registry watcher would drop it too, but only at
    its next check (``DAREX_REGISTRY_TTL_S`` later); other replicas still learn of it so."""
    sched, engine = state.scheduler, state.engine
    forget = getattr(engine, "forget", None)
    if sched is None or forget is None:
        return
    try:
        sched.call_sync(lambda: forget(model_id), timeout=FORGET_TIMEOUT_S)
    except SchedulerClosed:
        pass  # shutting down: no request runs on it
    except Exception as e:  # stored and registered all the same: the job is done
        log.warning(
            "cached copy not dropped (%s: %s); the registry watcher drops it within "
            "DAREX_REGISTRY_TTL_S",
            type(e).__name__,
            e,
            extra={"model_id": model_id},
        )


def _run_ingest(state: AppState, job_id: str, model_id: str, up: Upload, opts: dict) -> None:
    from storage.ingest import ingest

    reg = state.store.registry
    # a worker thread: the request's context is not here, so the storage layer's log
    # lines (a tensor the fine-tune lacks, say) name the model through this
    token = model_id_var.set(model_id)
    try:
        reg.update_job(job_id, state="running", message="ingesting")
        result = ingest(
            state.store,
            model_id,
            up.folder,
            state.base,
            progress=lambda f, m: _report_progress(reg, job_id, f, m),
            show_progress=False,
            max_tensors=state.settings.max_tensors,
            **opts,
        )
        m = result.manifest
        qs = f" q={m.q:g}" if isinstance(m.q, float) else ""
        msg = f"stored {m.method} p={m.p}{qs}: {m.stored_bytes()} bytes, {m.ratio:.4f} of fp16"
        _forget_cached(state, model_id)
        reg.update_job(job_id, state="done", progress=1.0, message=msg)
        log.info("ingest done: %s", msg, extra={"model_id": model_id, "job_id": job_id})
    except Exception as e:
        log.exception("ingest failed", extra={"model_id": model_id, "job_id": job_id})
        error = _hide_upload_path(f"{type(e).__name__}: {e}", up)
        reg.update_job(job_id, state="failed", error=error, message="failed")
    finally:
        try:
            if state.heartbeat is not None:
                state.heartbeat.discard(job_id)
            up.cleanup()
            _release(state, model_id, job_id)
        finally:
            model_id_var.reset(token)


@router.post("/models", status_code=202, response_model=JobAccepted)
async def upload_model(request: Request, state: StateDep, settings: SettingsDep, store: StoreDep):
    """Multipart: files (``*.safetensors`` + ``config.json``, or a PEFT adapter), ``model_id``,
    optional ``method``, ``rate`` (p), ``q``, ``calib`` (texts, one per line: q of DAREx-q
    searched on them), ``val`` (labeled examples, JSON lines: q searched for the best
    metric on them), ``task``, ``replace``."""
    up = await receive_upload(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
        settings.max_upload_bytes,
        settings.data_dir / "uploads",
    )
    try:
        model_id = up.fields.get("model_id", "")
        model_id_var.set(model_id or None)
        if not model_id:
            raise InvalidRequest("model_id: field required", field="model_id")
        validate_model_id(model_id)
        if model_id == state.base_id:
            raise InvalidRequest(
                f"model_id: {model_id!r} is the base model's own id (requests for it are "
                "served by the base, unpruned); choose another id for the fine-tune",
                field="model_id",
            )
        method = up.fields.get("method") or None
        if method is not None and method not in METHODS:
            raise InvalidRequest(f"method: {method!r} is not one of {METHODS}", field="method")
        rate = _number_field(up, "rate")
        if rate is not None and (why := rate_problem(rate)):  # as `darex add --rate`
            raise InvalidRequest(f"rate: {why}", field="rate")
        q = _number_field(up, "q")
        if q is not None and (why := q_problem(q)):  # as `darex add --q` and the library
            raise InvalidRequest(f"q: {why}", "q")
        calib = None
        if "calib" in up.fields:
            calib = read_calib_texts(up.fields["calib"])
            if not calib:
                raise InvalidRequest("calib: no text in it (one sample per line)", field="calib")
        val = _val_field(up, method, q)
        if method == "darex_q" and q is None and calib is None and val is None:
            raise InvalidRequest(
                "q: required with method darex_q unless val examples or calib texts are sent "
                "to search it on (a finite number >= 1e-06, e.g. the one "
                "`darex prune --q outchange` prints)",
                field="q",
            )
        if method == "wanda" and calib is None:
            raise InvalidRequest(
                "calib: method wanda needs calibration texts (one per line): it weighs each "
                "delta entry by the norm of its input feature on them",
                field="calib",
            )
        if q is not None and method != "darex_q":
            raise InvalidRequest(
                f"q: only method darex_q takes a q (method is {method or 'the recommended one'})",
                field="q",
            )
        replace = _bool_field(up, "replace")
        task = up.fields.get("task") or None
        if task is not None and task not in TASKS:
            raise InvalidRequest(f"task: {task!r} is not one of {TASKS}", field="task")
        folder = _checkpoint_path(up)
        if not replace:
            try:
                await asyncio.to_thread(store.registry.get_model, model_id)
                raise ModelExists(
                    f"model {model_id!r} is already registered; send replace=true to replace it"
                )
            except UnknownModel:
                pass
        await asyncio.to_thread(_precheck, state, folder, task)
        job = await _create_job(state, store, model_id)
    except BaseException as e:
        up.cleanup()
        if isinstance(e, BadCheckpoint) and getattr(e, "field", None) is None:
            e.field = "files"  # type: ignore[attr-defined]  # the param of the 422
        e.args = tuple(_hide_upload_path(a, up) if isinstance(a, str) else a for a in e.args)
        raise
    rate = settings.default_rate if rate is None else rate
    opts = {
        "method": method,
        "p": rate,
        "q": q,
        "replace": replace,
        "task": task,
        "calib_texts": calib,
        "val": val,
    }
    if state.heartbeat is not None:
        state.heartbeat.add(job.id, up.folder)
    state.jobs.submit(_run_ingest, state, job.id, model_id, up, opts)
    log.info(
        "upload accepted", extra={"job_id": job.id, "bytes": up.nbytes, "files": sorted(up.files)}
    )
    return JobAccepted(job_id=job.id, model_id=model_id, state=job.state)


@router.get("/jobs/{job_id}", response_model=JobPublic)
async def get_job(job_id: str, store: StoreDep, settings: SettingsDep) -> JobPublic:
    """A job's state; one whose server died mid-way reads ``failed`` ("interrupted")."""
    job = await asyncio.to_thread(store.registry.get_job, job_id)
    return JobPublic(**effective_job(job, settings.job_stale_s).model_dump())


def _manifest(store: DeltaStore, model_id: str) -> Manifest:
    """The registered manifest; ``UnknownModel`` (404) when the id is not registered, and an
    error naming the model and what to do when its manifest blob is missing or corrupt."""
    key = store.registry.get_model(model_id)
    fix = f"DELETE /admin/models/{model_id} removes the entry; then upload the fine-tune again"
    try:
        return store.manifest_at(key)
    except MissingBlob:
        raise MissingBlob(
            f"model {model_id!r}: its manifest {key} is missing from the store; {fix}"
        ) from None
    except CorruptBlob as e:
        raise CorruptBlob(
            f"model {model_id!r}: its manifest {key} is corrupt ({e}); {fix}"
        ) from None


@router.get("/models/{model_id}", response_model=ModelPublic)
async def get_model(model_id: str, store: StoreDep) -> ModelPublic:
    model_id_var.set(model_id)
    m = await asyncio.to_thread(_manifest, store, model_id)
    return ModelPublic(
        id=model_id,
        task=m.task,
        labels=m.labels,
        base=m.base.name,
        base_sha256=m.base.sha256,
        method=m.method,
        p=m.p,
        q=m.q,
        reason=m.reason,
        stored_bytes=m.stored_bytes(),
        fp16_bytes=m.fp16_bytes or None,
        ratio_vs_fp16=m.ratio if m.fp16_bytes else None,
        tensors=len(m.deltas) + len(m.extras),
        created=m.created.timestamp(),
    )


@router.delete("/models/{model_id}", response_model=Deleted)
async def delete_model(model_id: str, state: StateDep, store: StoreDep) -> Deleted:
    """Refuse new requests, let in-flight ones finish, unregister, drop cached copies."""
    model_id_var.set(model_id)
    with state.ingesting_lock:
        job_id = state.ingesting.get(model_id)
    if job_id is not None:  # it, or its replacement, is being stored: a race either way
        raise IngestInProgress(model_id, job_id or None)
    # 404 when unknown; the registry entry alone, so an entry whose manifest blob is
    # missing or corrupt can still be removed (and no longer blocks gc)
    key = await asyncio.to_thread(store.registry.get_model, model_id)

    def unregister() -> None:
        """Delete the version this request saw, not one uploaded while it waited (here or
        on another replica: the registry compares and deletes in one step)."""
        if store.delete(model_id, expected=key):
            return
        try:
            store.registry.get_model(model_id)
        except UnknownModel:
            return  # deleted meanwhile by another request: done
        raise ModelExists(
            f"model {model_id!r} was replaced by another upload while this delete "
            "waited for its requests; nothing was deleted (delete it again to remove "
            "the new version)"
        )

    if state.scheduler is not None:
        await state.scheduler.retire(model_id, then=unregister)
    else:
        await asyncio.to_thread(unregister)
    log.info("model deleted", extra={"model_id": model_id})
    return Deleted(id=model_id, deleted=True)
