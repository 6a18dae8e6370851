"""The engine: one resident base in a flat buffer, fine-tunes hot-swapped by a fused scatter.

At start every floating parameter goes into one contiguous buffer ``buf`` and
the module parameters become views of it (tied weights once). A resident
delta is ``(idx, val)`` over ``buf`` (sorted, unique). Switching A -> B::

    buf[idx_a] = saved_a                          # restore A (index_copy_, bit-exact)
    saved_b = buf[idx_b]; buf[idx_b] += val_b     # save, then apply B (index_add_)

in one kernel call (numba on CPU, Triton on CUDA, torch ops as the reference).
A fine-tune's dense extras (a classification head) are swapped by reference:
the head module's parameters are the cached tensors themselves.

A store-backed engine that knows its base's content hash (``base_sha256``,
``storage.bases.BaseInfo.sha256``; ``Engine.load`` passes it) refuses fine-tunes
stored against another base with ``BaseMismatch`` (HTTP 422 ``base_mismatch``),
when their task is first looked up and when their delta is decoded, never per
forward; it also sets the store's ``serving_base`` so that ``store.models()``
(``/v1/models``) lists only this base's fine-tunes. ``loaded_fingerprint`` is a
different hash (of the flat buffer, in the serving dtype): it checks that swaps
restore the base, not which base a delta belongs to.

A swap kernel that raises may have run in part, so the buffer is in an unknown state: the
engine then drops the active fine-tune, reloads the base's weights (``reload_base``,
which ``Engine.load`` sets to read the checkpoint again) and checks the buffer's hash
against ``loaded_fingerprint``. Until that succeeds, ``broken`` says why and every
``activate`` raises ``WeightsCorrupt`` (HTTP 503, ``/readyz`` not ready): nothing is
served from weights that are neither the base nor a fine-tune.

Single writer: only one thread (the scheduler's worker) calls ``activate``,
``restore``, ``forget`` and the forward helpers; ``prefetch`` only reads the source.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from server import kernels
from server.cache import DeltaCache
from server.deltas import DeltaSource, ModelInfo, ResidentDelta, Slot, StoreSource, to_resident
from server.errors import WeightsCorrupt, WrongTask

log = logging.getLogger(__name__)

Kind = Literal["causal-lm", "encoder"]


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def input_limit(model: nn.Module, tokenizer: Any) -> int | None:
    """The most tokens an encoder's classify/embed input keeps (longer ones lose their end).

    The tokenizer's ``model_max_length`` alone is not it: a local base may say 512 (or
    nothing, 1e30) where the model has fewer positions, and the forward pass then fails.
    RoBERTa-style position ids start after the padding index, which takes that many off."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return None
    pos = getattr(
        getattr(getattr(model, "base_model", model), "embeddings", None),
        "position_embeddings",
        None,
    )
    pad = getattr(pos, "padding_idx", None)
    limit -= 0 if pad is None else pad + 1
    tok = getattr(tokenizer, "model_max_length", None)
    return min(limit, tok) if isinstance(tok, int) and tok > 0 else limit


def flatten_parameters(model: nn.Module) -> tuple[torch.Tensor, dict[str, Slot]]:
    """Move every floating parameter into one flat buffer; parameters become views of it.

    Returns ``(buf, slots)`` with a slot for every parameter name, aliases of a
    tied parameter pointing at the same slot. Integer buffers are left alone.
    """
    named = list(model.named_parameters(remove_duplicate=False))
    unique: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in named:
        unique.setdefault(id(p), (p, []))[1].append(name)
    dtypes = {p.dtype for p, _ in unique.values()}
    assert len(dtypes) == 1, f"one floating dtype expected among parameters, got {dtypes}"
    (dtype,) = dtypes
    device = next(iter(unique.values()))[0].device
    total = sum(p.numel() for p, _ in unique.values())
    buf = torch.empty(total, dtype=dtype, device=device)
    slots: dict[str, Slot] = {}
    off = 0
    for p, names in unique.values():
        n = p.numel()
        view = buf[off : off + n]
        view.copy_(p.detach().reshape(-1))
        p.data = view.view(p.shape)
        p.requires_grad_(False)
        for name in names:
            slots[name] = Slot(off, n, tuple(p.shape))
        off += n
    return buf, slots


class Engine:
    """Resident base + swap; see the module docstring for the semantics."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        kind: Kind,
        source: DeltaSource | Any,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        device_cache_bytes: int = 1 << 30,
        host_cache_bytes: int = 4 << 30,
        base_name: str = "base",
        kernel: str | None = None,
        base_sha256: str | None = None,
        reload_base: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        assert kind in ("causal-lm", "encoder"), f"unknown engine kind {kind!r}"
        self.kind: Kind = kind
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        # The padded, truncated batches of classify/embed get their own copy: a fast
        # tokenizer switches padding and truncation on its shared Rust object when a call's
        # settings differ from the last one's, and that switch while another thread is
        # encoding (the routes count and encode prompts on worker threads) raises
        # "Already borrowed". The shared one is then only ever called without either, the
        # state it is put in here (a tokenizer.json may configure both).
        self._batch_tokenizer = copy.deepcopy(tokenizer)
        self.max_input_tokens = input_limit(self.model, tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.no_padding()
            backend.no_truncation()
        self.base_name = base_name
        self.base_sha256 = base_sha256  # weights_sha256 of the base, as manifests record it
        self.source: DeltaSource = source
        if hasattr(source, "manifest"):  # a DeltaStore
            self.source = StoreSource(source, base_sha256, base_name)
            if base_sha256 is not None and hasattr(source, "serving_base"):
                source.serving_base = base_sha256  # its listing: only this base's fine-tunes
        self.buf, self.slots = flatten_parameters(self.model)
        self.kernel = kernel or kernels.kernel_name(self.buf)
        if self.kernel == "numba":
            kernels.cpu.warmup()
        self.cache = DeltaCache(self._decode, self.device, device_cache_bytes, host_cache_bytes)
        self.active: str | None = None
        self.head: nn.Module | None = None
        self._cur: ResidentDelta | None = None
        self._scratch = [self.buf.new_empty(0), self.buf.new_empty(0)]
        self._slot = 0  # which scratch holds the active delta's saved values
        self._saved = self._scratch[0]
        self._info: dict[str, ModelInfo] = {}
        # forget() bumps a model's count: an info read begun before it is not cached after
        # it (``describe`` runs off the worker thread, beside a replacing upload's forget)
        self._forgotten: dict[str, int] = {}
        self._info_lock = threading.Lock()
        self.last_swap_s = 0.0
        self._loaded_fingerprint = self.base_fingerprint()
        # the base's parameters by name, read again after a failed kernel (None: no recovery)
        self._reload_base = reload_base
        self.broken: str | None = None  # why the weights cannot be trusted, when they cannot

    @classmethod
    def load(
        cls,
        base: Any,
        source: DeltaSource | Any,
        settings: Any = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        device_cache_bytes: int | None = None,
        host_cache_bytes: int | None = None,
    ) -> Engine:
        """Load ``base`` (a ``storage.bases.BaseInfo``: name, path, arch) with plain transformers.

        Explicit arguments win over ``settings`` (a ``server.settings.Settings``).
        """
        from transformers import AutoModel, AutoModelForCausalLM

        from storage.predict import load_tokenizer

        def pick(value: Any, field: str, default: Any) -> Any:
            if value is not None:
                return value
            return getattr(settings, field, default) if settings is not None else default

        dev = resolve_device(pick(device, "device", "auto"))
        dt = resolve_dtype(pick(dtype, "dtype", "auto"), dev)
        kind: Kind = "causal-lm" if base.arch == "decoder" else "encoder"
        auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
        model = auto.from_pretrained(str(base.path), dtype=dt)
        tok = load_tokenizer(base.path)

        def reload_base() -> Mapping[str, torch.Tensor]:
            return auto.from_pretrained(str(base.path), dtype=dt).state_dict()

        return cls(
            model,
            tok,
            kind=kind,
            source=source,
            device=dev,
            dtype=dt,
            device_cache_bytes=pick(device_cache_bytes, "device_cache_bytes", 1 << 30),
            host_cache_bytes=pick(host_cache_bytes, "host_cache_bytes", 4 << 30),
            base_name=base.name,
            base_sha256=getattr(base, "sha256", None),
            reload_base=reload_base,
        )

    # ---- swapping -------------------------------------------------------------------------
    def _decode(self, model_id: str) -> ResidentDelta:
        """Source -> resident form on the host (runs on the caller's or the prefetch thread)."""
        rd = to_resident(model_id, self.source.load(model_id), self.slots, self.dtype)
        self._info[model_id] = ModelInfo(rd.task, rd.labels)
        return rd

    def _target(self, model_id: str | None) -> str | None:
        return None if model_id is None or model_id == self.base_name else model_id

    def activate(self, model_id: str | None) -> bool:
        """Make ``model_id`` (None or the base's name = the base) the active model.

        Returns whether anything changed. Raises ``UnknownModel`` with nothing changed, and
        ``WeightsCorrupt`` while ``broken``.
        """
        if self.broken is not None:
            raise WeightsCorrupt(self.broken)
        target = self._target(model_id)
        if target == self.active:
            return False
        new = self.cache.get(target, pin=True) if target is not None else None
        t0 = time.perf_counter()
        try:
            self._swap_to(new)
        except BaseException:
            # the target is not in use: a pin left on it would keep it cached for good and
            # fail its delete. (A failure before the kernel, such as running out of memory
            # for the scratch buffer, changed nothing; allocations come first for that. A
            # failure in the kernel is handled by _after_failed_kernel.)
            if new is not None:
                self.cache.unpin(new.model_id)
            raise
        self.last_swap_s = time.perf_counter() - t0
        log.debug(
            "activated",
            extra={"model_id": target, "swap_ms": 1e3 * self.last_swap_s, "kernel": self.kernel},
        )
        return True

    def restore(self) -> None:
        """Back to the base, bit-exactly."""
        self.activate(None)

    def _swap_to(self, new: ResidentDelta | None) -> None:
        old = self._cur
        empty_i = torch.empty(0, dtype=torch.int64, device=self.device)
        idx_a = old.idx if old is not None else empty_i
        saved_a = self._saved[: idx_a.numel()]
        nxt = 1 - self._slot
        n_b = new.idx.numel() if new is not None else 0
        # everything that can fail for want of memory or a bad head comes before the kernel
        if self._scratch[nxt].numel() < n_b:
            self._scratch[nxt] = self.buf.new_empty(n_b + n_b // 8)
        saved_b = self._scratch[nxt][:n_b]
        idx_b = new.idx if new is not None else empty_i
        val_b = new.val if new is not None else self.buf.new_empty(0)
        head = self._make_head(new)
        try:
            kernels.swap(self.buf, idx_a, saved_a, idx_b, val_b, saved_b, impl=self.kernel)
            if self.device.type == "cuda":  # a kernel's fault surfaces here
                torch.cuda.current_stream(self.device).synchronize()
        except BaseException as e:
            self._after_failed_kernel(old, e)
            raise
        self._slot, self._saved, self._cur = nxt, saved_b, new
        if old is not None:
            self.cache.unpin(old.model_id)
        self.active = new.model_id if new is not None else None
        self.head = head

    def _after_failed_kernel(self, old: ResidentDelta | None, err: BaseException) -> None:
        """The kernel raised and may have run in part: no fine-tune is active any more, and
        the base is read again and its hash checked; ``broken`` stays set when that fails."""
        was = self.active
        self._cur, self.active, self.head = None, None, None
        if old is not None:
            self.cache.unpin(old.model_id)
        self.broken = (
            f"a swap kernel failed ({type(err).__name__}: {err}); the resident weights "
            "are in an unknown state"
        )
        log.error("swap kernel failed", extra={"model_id": was, "error": str(err)})
        if self._reload_base is None:
            self.broken += " and this engine has no checkpoint to reload the base from"
            return
        try:
            state = self._reload_base()
            with torch.no_grad():
                for name, p in self.model.named_parameters():  # tied ones once
                    p.copy_(state[name].to(device=p.device, dtype=p.dtype).view(p.shape))
            fp = self.base_fingerprint()
        except Exception as e:  # e.g. a device that faults on every call now
            self.broken += f"; reloading the base failed ({type(e).__name__}: {e})"
            log.error("base reload failed", extra={"model_id": was, "error": str(e)})
            return
        if fp != self._loaded_fingerprint:
            want = self._loaded_fingerprint
            self.broken += f"; the reloaded base hashes to {fp[:12]}, not {want[:12]}"
            log.error("base reload differs", extra={"model_id": was, "sha256": fp})
            return
        self.broken = None
        log.warning(
            "base reloaded after a failed swap kernel", extra={"model_id": was, "sha256": fp}
        )

    def _make_head(self, rd: ResidentDelta | None) -> nn.Module | None:
        """A Linear whose parameters are the cached extras themselves (no copy)."""
        if rd is None or rd.task != "sequence-classification":
            return None
        w = rd.extras.get("classifier.weight")
        if w is None:
            return None
        b = rd.extras.get("classifier.bias")
        head = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        head.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            head.bias = nn.Parameter(b, requires_grad=False)
        return head.eval()

    def prefetch(self, model_id: str | None) -> None:
        """Start decoding ``model_id`` into the cache on the background thread (non-blocking)."""
        target = self._target(model_id)
        if target is not None and target != self.active:
            self.cache.prefetch(target)

    def forget(self, model_id: str) -> None:
        """Drop cached copies after a delete (restores the base first if it is active)."""
        if self.active == model_id:
            self.restore()
        self.cache.forget(model_id)
        with self._info_lock:
            self._info.pop(model_id, None)
            self._forgotten[model_id] = self._forgotten.get(model_id, 0) + 1

    # ---- metadata ------------------------------------------------------------------------
    def _model_info(self, model_id: str) -> ModelInfo:
        with self._info_lock:
            info, seen = self._info.get(model_id), self._forgotten.get(model_id, 0)
        if info is None:
            info = self.source.info(model_id)
            with self._info_lock:
                if self._forgotten.get(model_id, 0) == seen:
                    self._info[model_id] = info
        return info

    def describe(self, model_id: str | None) -> tuple[str, list[str] | None]:
        """``(task, label names)`` of a model, from one read of its info at most; the task
        is "causal-lm" | "sequence-classification" | "feature-extraction"."""
        target = self._target(model_id)
        if target is None:
            return ("causal-lm" if self.kind == "causal-lm" else "feature-extraction"), None
        info = self._model_info(target)
        return info.task, info.labels

    @property
    def active_labels(self) -> list[str] | None:
        """The label names of the fine-tune whose head is applied now (None: the base)."""
        return self._cur.labels if self._cur is not None else None

    def task_of(self, model_id: str | None) -> str:
        return self.describe(model_id)[0]

    def labels_of(self, model_id: str | None) -> list[str] | None:
        return self.describe(model_id)[1]

    def cache_stats(self) -> dict[str, Any]:
        out = self.cache.stats()
        out.update(active=self.active, kernel=self.kernel, last_swap_ms=1e3 * self.last_swap_s)
        return out

    def base_fingerprint(self) -> str:
        """sha256 of the flat buffer's bytes (equals the loaded one whenever the base is active)."""
        raw = self.buf.detach().cpu().contiguous().view(torch.uint8).numpy()
        return hashlib.sha256(raw).hexdigest()

    @property
    def loaded_fingerprint(self) -> str:
        return self._loaded_fingerprint

    # ---- forward helpers -----------------------------------------------------------------
    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self._batch_tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_input_tokens,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.inference_mode()
    def classify(self, texts: list[str]) -> list[list[float]]:
        """softmax(classifier(pooler_output)) under the active fine-tune (eval mode, no dropout)."""
        if self.head is None:
            raise WrongTask(
                f"active model {self.active or self.base_name!r} has no classification head"
            )
        out = self.model(**self._encode(texts))
        logits = self.head(out.pooler_output)  # (B, num_labels)
        return torch.softmax(logits.float(), dim=-1).tolist()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean of the last hidden state over non-padding tokens, per text."""
        enc = self._encode(texts)
        hidden = self.model.base_model(**enc).last_hidden_state  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled.float().tolist()

    def close(self) -> None:
        self.cache.close()
