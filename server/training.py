"""Fine-tuning a base on a task: full fine-tune (Adam or AdamR) or a PEFT LoRA adapter.

The output is what ``storage.ingest`` takes: a HF folder with safetensors weights (or a PEFT
adapter folder) plus ``darex_finetune.json`` with the settings and the validation metric.

- classification: ``AutoModelForSequenceClassification`` on the base with a new head
  (``num_labels``, ``id2label``), cross-entropy on the label.
- generation: the causal LM, cross-entropy on the answer tokens only,
  ``loss = -sum_t log p(target_t | prompt, target_<t) / |target|`` (prompt tokens masked).

Decoders train with their (tied) embeddings frozen by default: the tied ``lm_head`` gives every
vocabulary row a gradient, so training it turns the 28.3M-entry embedding matrix of SmolLM2
(21% of the model) into a dense delta, while the task is learnt by the transformer blocks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from server.evaluation import (
    DEFAULT_MAX_LENGTH,
    RESULT_FILE,
    eos_id,
    evaluate,
    load_finetuned,
    pad_id,
    pick_device,
    predict,
    reference,
)
from storage.bases import BaseInfo, tensor_names
from storage.blobs import nearest_existing
from storage.tasks import Example, Task, load_task

__all__ = [
    "RESULT_FILE",
    "FinetuneError",
    "FinetuneOptions",
    "FinetuneResult",
    "check_out_dir",
    "evaluate",
    "finetune",
    "finetune_unless_current",
    "load_finetuned",
    "stale_reason",
]

log = logging.getLogger(__name__)

Optimizer = Literal["adam", "adamr-l2", "adamr-l1"]
# The fraction of a fine-tune's steps that warm the learning rate up (then it decays to 0).
DEFAULT_WARMUP = 0.1
PROBE = 64  # training examples whose loss is measured before and after training


class FinetuneError(ValueError):
    """Options that cannot work together (a generation task on an encoder, AdamR missing...)."""


@dataclass
class FinetuneOptions:
    optimizer: Optimizer = "adam"
    reg: float = 0.0  # AdamR penalty lambda
    lora: bool = False
    rank: int = 8
    lora_alpha: float | None = None  # None = 2 * rank
    lr: float | None = None  # None = 5e-5 full fine-tune, 1e-3 LoRA
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    batch_size: int = 16
    max_train: int | None = 4000  # None or 0 = the whole train split
    max_eval: int | None = None  # None = the whole validation split
    max_length: int = DEFAULT_MAX_LENGTH  # tokens per example; long prompts keep their end
    train_embeddings: bool | None = None  # None = encoders yes, decoders no
    warmup: float = DEFAULT_WARMUP  # fraction of steps with a linear warm-up, then decay to 0
    device: str = "auto"

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.lora else 5e-5)

    def check(self) -> None:
        """Raise ``FinetuneError`` on a value that cannot work, before anything is loaded."""
        if self.optimizer not in ("adam", "adamr-l2", "adamr-l1"):
            raise FinetuneError(
                f"unknown optimizer {self.optimizer!r}; expected adam, adamr-l2, adamr-l1"
            )
        if self.optimizer != "adam" and self.lora:
            raise FinetuneError(
                "AdamR regularises full fine-tunes; use --optimizer adam with --lora"
            )
        if not (math.isfinite(self.reg) and self.reg >= 0):
            raise FinetuneError(f"--reg must be a finite number >= 0, got {self.reg}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise FinetuneError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.lora and self.rank < 1:
            raise FinetuneError(f"--rank must be >= 1, got {self.rank}")
        if self.lora_alpha is not None and not (
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0
        ):
            raise FinetuneError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if not (0.0 <= self.warmup <= 1.0):
            raise FinetuneError(f"warmup must be in [0, 1], got {self.warmup}")
        for name, value, low in (
            ("--epochs", self.epochs, 1),
            ("--batch-size", self.batch_size, 1),
            ("--max-length", self.max_length, 1),
            ("--max-steps", self.max_steps, 0),  # None or 0 = epochs * steps per epoch
            ("--max-train", self.max_train, 0),  # None or 0 = the whole train split
            ("--max-eval", self.max_eval, 0),  # None or 0 = the whole validation split
        ):
            if value is not None and value < low:
                raise FinetuneError(f"{name} must be >= {low}, got {value}")
        check_device(self.device)


@dataclass(frozen=True)
class FinetuneResult:
    out: Path
    metric_name: str
    metric: float  # on the validation split (or its first max_eval examples)
    loss_before: float  # mean loss on the first PROBE training examples, before training
    loss_after: float
    losses: list[float] = field(repr=False)  # one per optimizer step
    steps: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict, repr=False)


# -- models ---------------------------------------------------------------------------------


_HEAD_PREFIXES = ("classifier.", "score.")  # a sequence-classification head's parameters


def _load_model(base: BaseInfo, task: Task, opts: FinetuneOptions) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from storage.predict import load_tokenizer

    tokenizer = load_tokenizer(base.path)
    torch.manual_seed(opts.seed)  # the new classification head starts the same for a seed
    if task.kind == "generation":
        if base.arch != "decoder":
            raise FinetuneError(f"task {task.name} generates text; base {base.name} is an encoder")
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    else:
        # transformers reports the new head as MISSING weights, which is the point of a
        # classification fine-tune: its report is silenced, and anything else it would
        # have said (other missing, unexpected or mismatched tensors) is logged here
        prev = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                base.path,
                dtype=torch.float32,
                num_labels=len(task.labels),
                id2label=dict(enumerate(task.labels)),
                label2id={lab: i for i, lab in enumerate(task.labels)},
                output_loading_info=True,
                # a base that has a head of another size gets a new one: without this,
                # transformers raises, pointing at the report silenced here
                ignore_mismatched_sizes=True,
            )
        finally:
            hf_logging.set_verbosity(prev)
        head = {n for n, _ in model.named_parameters() if n.startswith(_HEAD_PREFIXES)}
        mismatched = {k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]}
        odd = {
            "missing": sorted(set(info["missing_keys"]) - head),
            "unexpected": sorted(info["unexpected_keys"]),
            "mismatched": sorted(set(map(str, mismatched)) - head),
        }
        if any(odd.values()):
            log.warning("loading %s for %s: %s", base.name, task.name, odd)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id(tokenizer, model)
    train_emb = opts.train_embeddings
    if train_emb is None:
        train_emb = base.arch == "encoder"
    if not train_emb and not opts.lora:
        model.get_input_embeddings().weight.requires_grad_(False)  # the tied lm_head too
    if opts.lora:
        model = _wrap_lora(model, task, opts)
    return model, tokenizer


def _wrap_lora(model: Any, task: Task, opts: FinetuneOptions) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    cfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM if task.kind == "generation" else TaskType.SEQ_CLS,
        r=opts.rank,
        lora_alpha=opts.lora_alpha if opts.lora_alpha is not None else 2 * opts.rank,
        lora_dropout=0.0,
        target_modules="all-linear",
    )
    return get_peft_model(model, cfg)


# -- batches --------------------------------------------------------------------------------


def encode_batch(
    task: Task, exs: Sequence[Example], tokenizer: Any, model: Any, max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenized, padded batch with ``labels``; for generation only answer tokens count."""
    if task.kind == "classification":
        enc = tokenizer(
            [e.text for e in exs],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([e.label for e in exs])
        return dict(enc)
    pad, eos = pad_id(tokenizer, model), eos_id(tokenizer, model)
    rows: list[tuple[list[int], list[int]]] = []
    for e in exs:
        target = tokenizer(e.target, add_special_tokens=False)["input_ids"]
        target = target + ([eos] if eos is not None else [])
        prompt = tokenizer(e.text, add_special_tokens=False)["input_ids"]
        prompt = prompt[-max(1, max_length - len(target)) :]  # keep the end of a long prompt
        rows.append((prompt + target, [-100] * len(prompt) + target))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = (
            torch.tensor(x),
            torch.tensor(y),
            1,
        )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def mean_loss(
    task: Task,
    exs: Sequence[Example],
    model: Any,
    tokenizer: Any,
    opts: FinetuneOptions,
    device: torch.device,
) -> float:
    """Mean per-batch loss in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, len(exs), opts.batch_size):
        batch = encode_batch(task, exs[i : i + opts.batch_size], tokenizer, model, opts.max_length)
        losses.append(float(model(**{k: v.to(device) for k, v in batch.items()}).loss))
    model.train(was_training)
    return sum(losses) / max(1, len(losses))


# -- optimizer ------------------------------------------------------------------------------


def new_parameter_names(model: Any, base: BaseInfo) -> set[str]:
    """Parameters the base checkpoint does not have (a new classification head)."""
    stored = tensor_names(base.path)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    return {
        n
        for n, _ in model.named_parameters()
        if n not in stored and n.removeprefix(prefix) not in stored
    }


def make_optimizer(
    named: list[tuple[str, torch.nn.Parameter]], opts: FinetuneOptions, new: Collection[str] = ()
) -> torch.optim.Optimizer:
    """adam = AdamW without weight decay (decay would touch every weight and densify the delta);
    adamr-l2 / adamr-l1 = ``pruning.adamr.AdamR`` pulling base weights toward their start
    values; parameters in ``new`` (a fresh head, stored dense anyway) get no pull."""
    lr = opts.resolved_lr()
    params = [p for _, p in named]
    if opts.optimizer == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if opts.optimizer in ("adamr-l2", "adamr-l1"):
        try:
            from pruning.adamr import AdamR
        except ImportError as e:
            raise FinetuneError(
                f"--optimizer {opts.optimizer} needs pruning.adamr.AdamR, "
                "which is not available in this installation; use --optimizer adam"
            ) from e
        groups = [
            {"params": [p for n, p in named if n not in new]},
            {"params": [p for n, p in named if n in new], "reg": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        return AdamR(groups, lr=lr, reg=opts.reg, norm=opts.optimizer.removeprefix("adamr-"))
    raise FinetuneError(f"unknown optimizer {opts.optimizer!r}; expected adam, adamr-l2, adamr-l1")


def _schedule(
    opt: torch.optim.Optimizer, total: int, warmup: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor: linear warm-up over ``warmup * total`` steps, then linear decay to 0."""
    w = max(1, round(warmup * total))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / w if s < w else max(0.0, (total - s) / max(1, total - w))
    )


def check_device(name: str) -> None:
    """Raise ``FinetuneError`` unless ``name`` is auto, cpu or an available cuda device."""
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise FinetuneError(f"unknown device {name!r}; use auto, cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FinetuneError(f"device {name!r}: no CUDA device here; use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FinetuneError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )


def check_out_dir(out: Path | str, base_dir: Path | str | None = None) -> None:
    """Raise ``FinetuneError`` unless ``out`` may receive a fine-tune's checkpoint.

    ``out`` may be missing, an empty folder or a previous run's output (a folder holding
    ``darex_finetune.json``), which is replaced as a whole; anything else (a file, a folder
    with other content, the base's folder, a folder inside it or one holding it) is refused,
    so a fine-tune never deletes data it did not write.
    """
    out = Path(out).expanduser()
    if base_dir is not None:
        o, b = out.resolve(), Path(base_dir).expanduser().resolve()
        if o == b or o.is_relative_to(b) or b.is_relative_to(o):
            raise FinetuneError(
                f"--out {out} must not be the base's folder ({b}), a folder inside it or one "
                "holding it"
            )
    if out.is_symlink() and not out.exists():
        raise FinetuneError(f"--out {out} is a dangling symlink")
    if out.exists():
        if not out.is_dir():
            raise FinetuneError(f"--out {out} is a file, not a folder")
        if any(out.iterdir()) and not (out / RESULT_FILE).is_file():
            raise FinetuneError(
                f"--out {out} is a folder that holds other files; give a new or empty folder, "
                f"or a previous fine-tune's (with {RESULT_FILE}), which is replaced"
            )
    else:
        parent = nearest_existing(out)
        if not parent.is_dir():
            raise FinetuneError(f"--out {out}: {parent} is a file, not a folder")
    # found now, not when the checkpoint is written after the training: it is written in a
    # temporary folder beside --out, then renamed into place
    where = nearest_existing(out.absolute().parent)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".darex-write-check-", dir=where))
    except OSError as e:
        raise FinetuneError(f"--out {out}: cannot write in {where} ({e.strerror or e})") from None


# Settings that leave the trained weights as they are: where it ran (a fine-tune made on a
# GPU serves a CPU rerun, and ``auto`` is recorded as the device it picked) and how many
# validation examples scored it
_NOT_WEIGHTS = frozenset({"device", "max_eval"})


def changed_settings(recorded: dict[str, Any], opts: dict[str, Any]) -> dict[str, tuple]:
    """The settings, as ``{name: (recorded, asked)}``, in which a fine-tune's recorded
    ``settings`` differ from the ``FinetuneOptions`` fields ``opts`` in a way that changes the
    weights. A setting the record lacks (one added since) counts as its default; ``lr``
    compares resolved (None = the default for the kind) and ``max_train``/``max_steps`` of
    0 and None both mean "no limit"."""
    asked_opts, default = FinetuneOptions(**opts), FinetuneOptions()

    def norm(k: str, v: Any) -> Any:
        return (v or None) if k in ("max_train", "max_steps") else v

    asked = dataclasses.asdict(asked_opts) | {"lr": asked_opts.resolved_lr()}
    return {
        k: (have, v)
        for k, v in asked.items()
        if k not in _NOT_WEIGHTS
        and norm(k, have := recorded.get(k, getattr(default, k))) != norm(k, v)
    }


def _reusable(
    out: Path, base: BaseInfo, opts: dict[str, Any]
) -> tuple[dict[str, Any], None] | tuple[None, str]:
    """``(record, None)`` when ``out`` holds a fine-tune of this checkpoint of ``base``
    trained with the settings ``opts`` asks for; ``(None, why not)`` otherwise."""
    rec_file = out / RESULT_FILE
    if not rec_file.is_file():
        return None, "is missing"
    try:
        rec = json.loads(rec_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"has an unreadable {RESULT_FILE} ({e})"
    if rec.get("base_sha256") != base.sha256:
        return None, f"was trained on another checkpoint of {base.name}"
    changed = changed_settings(rec.get("settings", {}), opts)
    if changed:
        diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        return None, f"was trained with other settings ({diff})"
    return rec, None


def stale_reason(out: Path, base: BaseInfo, opts: dict[str, Any]) -> str | None:
    """None when ``out`` holds a fine-tune of this checkpoint of ``base`` trained with the
    settings ``opts`` asks for, so it can be reused; otherwise why not, as a phrase."""
    return _reusable(out, base, opts)[1]


def finetune_unless_current(
    base: BaseInfo, task: Task | str, out: Path, opts: dict[str, Any]
) -> dict[str, Any]:
    """The record of the fine-tune in ``out``, trained first (replacing what is there) when
    ``stale_reason`` says it cannot be reused; a replaced one is logged with the reason."""
    rec, why = _reusable(out, base, opts)
    if rec is not None:
        return rec  # read once: the reuse path does not open the record again
    if (out / RESULT_FILE).is_file():
        task_name = task if isinstance(task, str) else task.name
        extra = {"model_id": out.name, "task": task_name, "base": base.name}
        log.warning("fine-tune %s %s; training it again", out, why, extra=extra)
    finetune(base, task, out, **opts)
    return json.loads((out / RESULT_FILE).read_text())


def _replace_dir(new: Path, dst: Path) -> None:
    """Put folder ``new`` at ``dst``, replacing an empty folder or a previous run's folder as a
    whole (``check_out_dir`` refuses anything else), so a folder with ``darex_finetune.json``
    is always one complete checkpoint, never a mix of two."""
    new.chmod(0o755)
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
        os.rename(dst, old / "prev")
    os.rename(new, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- training -------------------------------------------------------------------------------


def finetune(base: BaseInfo, task: Task | str, out: Path | str, **opts: Any) -> FinetuneResult:
    """Fine-tune ``base`` on ``task``, write the checkpoint to ``out``, return the result.

    ``opts`` are the fields of ``FinetuneOptions``.
    """
    o = FinetuneOptions(**opts)
    o.check()
    out = Path(os.path.abspath(Path(out).expanduser()))
    check_out_dir(out, base.path)
    task = load_task(task) if isinstance(task, str) else task
    device = pick_device(o.device)
    t0 = time.perf_counter()
    model, tokenizer = _load_model(base, task, o)
    model.to(device)
    train = task.train[: o.max_train] if o.max_train else task.train
    if not train:
        raise FinetuneError(f"task {task.name} has no training examples")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = make_optimizer(named, o, new_parameter_names(model, base))
    per_epoch = math.ceil(len(train) / o.batch_size)
    total = o.max_steps if o.max_steps else o.epochs * per_epoch
    scheduler = _schedule(optimizer, total, o.warmup)
    probe = train[:PROBE]
    loss_before = mean_loss(task, probe, model, tokenizer, o, device)
    extra = {"model_id": out.name, "task": task.name, "base": base.name}
    log.info("fine-tuning %s on %s: %d steps", base.name, task.name, total, extra=extra)

    gen = torch.Generator().manual_seed(o.seed)
    losses: list[float] = []
    model.train()
    bar = tqdm(total=total, desc=f"finetune {task.name}", unit="step")
    order: list[int] = []
    while len(losses) < total:
        if not order:
            order = torch.randperm(len(train), generator=gen).tolist()
        idx, order = order[: o.batch_size], order[o.batch_size :]
        batch = encode_batch(task, [train[i] for i in idx], tokenizer, model, o.max_length)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    loss_after = mean_loss(task, probe, model, tokenizer, o, device)

    model.eval()
    val = task.validation[: o.max_eval] if o.max_eval else task.validation
    preds = predict(model, tokenizer, task, val, max_length=o.max_length)
    metric = task.metric(preds, [reference(task, e) for e in val])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    settings = dataclasses.asdict(o) | {"lr": o.resolved_lr(), "device": str(device)}
    record = {
        "base": base.name,
        "base_sha256": base.sha256,
        "base_path": str(base.path),
        "task": task.name,
        "kind": task.kind,
        "labels": list(task.labels),
        "format": "peft-lora" if o.lora else "full",
        "settings": settings,
        "train_examples": len(train),
        "steps": total,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "validation_examples": len(val),
        "metric_name": task.metric_name,
        "validation_metric": metric,
        "seconds": round(seconds, 2),
    }
    try:
        (tmp / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        check_out_dir(out, base.path)  # again: something may have been put there meanwhile
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    log.info("validation %s = %.4f", task.metric_name, metric, extra=extra)
    return FinetuneResult(
        out, task.metric_name, metric, loss_before, loss_after, losses, total, seconds, settings
    )
