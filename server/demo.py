"""``darex demo``: small fine-tunes of the base, stored at p = 0.99, then served.

Each demo fine-tune lives in ``<data_dir>/demo/<base>/<task>/`` and is stored as
``demo-<task>`` with the method ``recommend()`` picks (ingest's default), given
``CALIB_TEXTS`` unlabeled validation inputs to search DAREx-q's q on. The table
compares the unpruned fine-tune with what the store holds: the stored model is
rebuilt from the store (``W = W_base + scatter(delta)``, the dense head) and evaluated
on the first ``eval_n`` test examples. A second run reuses the fine-tune, the stored
model and the evaluation, as long as the base and the manifest are the same.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from server.reproduce_lab import Lab, by_length, open_lab, slug
from server.training import finetune_unless_current
from storage.bases import BaseInfo
from storage.errors import UnknownModel
from storage.ingest import ingest
from storage.store import DeltaStore
from storage.tasks import load_task

log = logging.getLogger(__name__)
CALIB_TEXTS = 32  # validation inputs (no labels) handed to ingest as calibration texts

ENCODER_TASKS = ("rt-sentiment", "rt-subjectivity", "convention-party")
DECODER_TASKS = ("arith", "rt-sentiment-gen")
EVAL_FILE = "demo_eval.json"


@dataclass
class DemoBudget:
    """Fine-tune budget per task (CPU-friendly defaults)."""

    steps: int | None = None  # None = one epoch of ``train`` examples
    train: int = 2000
    eval_n: int = 400
    lr: float | None = None  # None = 5e-5 encoders, 3e-4 decoders
    max_length: int = 128


@dataclass
class DemoRow:
    task: str
    model_id: str
    metric_name: str
    unpruned: float
    stored: float
    method: str
    p: float
    stored_bytes: int
    fp16_bytes: int
    manifest_key: str
    examples: int = 0  # test examples the two accuracies were measured on
    reused: bool = False


def default_tasks(base: BaseInfo) -> tuple[str, ...]:
    return DECODER_TASKS if base.arch == "decoder" else ENCODER_TASKS


def demo_dir(data_dir: Path, base: BaseInfo, task: str) -> Path:
    """Where the demo fine-tune of ``task`` on ``base`` is cached."""
    return Path(data_dir) / "demo" / slug(base.name) / task


def demo_finetune(data_dir: Path, base: BaseInfo, task: str, budget: DemoBudget) -> Path:
    """The cached demo fine-tune, trained when missing, made on another checkpoint of the
    base or with another budget (``stale_reason``): ``--steps 100`` after a default run
    trains 100 steps, not reuses the epoch."""
    out = demo_dir(data_dir, base, task)
    lr = budget.lr if budget.lr is not None else (3e-4 if base.arch == "decoder" else 5e-5)
    opts = {
        "lr": lr,
        "max_steps": budget.steps,
        "max_train": budget.train,
        "max_eval": min(budget.eval_n, 200),
        "max_length": budget.max_length,
    }
    finetune_unless_current(base, task, out, opts)
    return out


def _registered(store: DeltaStore, model_id: str, base: BaseInfo) -> str | None:
    try:
        key = store.registry.get_model(model_id)
    except UnknownModel:
        return None
    return key if store.manifest_at(key).base.sha256 == base.sha256 else None


@torch.no_grad()
def load_stored(lab: Lab, store: DeltaStore, model_id: str) -> None:
    """Set the lab's model to what the store holds for ``model_id``."""
    m = store.manifest(model_id)
    params = lab.params
    by_base = {bn: n for n, bn in lab.base_names.items()}
    for bn, entry in m.deltas.items():
        n = by_base[bn]
        dd = store.load_delta(entry, "cpu")
        w = lab.base_w[n].clone()
        w.view(-1).index_add_(0, dd.indices, dd.values.float())
        params[n].data.copy_(w)
    for name, entry in m.extras.items():
        if name in params:
            params[name].data.copy_(store.load_dense(entry, "cpu").float())


def _cached_row(path: Path) -> DemoRow | None:
    """The scores a previous run cached, or None (none, or a file it cannot read)."""
    try:
        return DemoRow(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        log.warning("ignoring the cached demo scores %s: %s", path, e)
        return None


def build_one(
    store: DeltaStore, data_dir: Path, base: BaseInfo, task_name: str, budget: DemoBudget, p: float
) -> DemoRow:
    """Fine-tune (or reuse), ingest at rate p with the recommended method (or reuse), evaluate."""
    task = load_task(task_name)
    ft_dir = demo_finetune(data_dir, base, task_name, budget)
    model_id = f"demo-{task_name}"
    key = _registered(store, model_id, base)
    # The scores live beside the fine-tune, so a fine-tune trained again has none: the
    # registered delta is this fine-tune's only when the scores name it
    ours = _cached_row(ft_dir / EVAL_FILE)
    if ours is not None and (ours.manifest_key, ours.p) != (key, p):
        ours = None
    exs = by_length(task.test[: budget.eval_n])
    if ours is not None and ours.examples == len(exs):
        ours.reused = True
        return ours
    if ours is None:
        # unlabeled validation inputs: a delta DARE cannot keep is stored as DAREx-q
        calib = [e.text for e in task.validation[-CALIB_TEXTS:]]
        res = ingest(store, model_id, ft_dir, base, p=p, replace=True, calib_texts=calib)
        key = res.manifest_key
    m = store.manifest_at(key)
    lab = open_lab(base, ft_dir, task, max_length=budget.max_length)
    unpruned = lab.metric(exs)
    load_stored(lab, store, model_id)
    stored = lab.metric(exs)
    row = DemoRow(
        task_name,
        model_id,
        task.metric_name,
        unpruned,
        stored,
        m.method,
        m.p,
        m.stored_bytes(),
        m.fp16_bytes,
        key,
        len(exs),
    )
    (ft_dir / EVAL_FILE).write_text(json.dumps(asdict(row), indent=2) + "\n")
    log.info(
        "demo %s: %s %.3f -> %.3f",
        task_name,
        m.method,
        unpruned,
        stored,
        extra={"model_id": model_id},
    )
    return row


def usage_lines(rows: list[DemoRow], arch: str, url: str, token: str | None) -> list[str]:
    """curl and ``openai`` client lines that work against the running server."""
    auth = f' -H "Authorization: Bearer {token}"' if token else ""
    key = token or "none"
    lines = [f"# list the models\ncurl -s {url}/v1/models{auth}", ""]
    for r in rows:
        if arch == "decoder":
            body = {
                "model": r.model_id,
                "messages": [{"role": "user", "content": _prompt(r.task)}],
                "max_tokens": 8,
            }
            lines += [
                f"# {r.task}",
                f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
                f"-d '{json.dumps(body)}'",
                f"python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', "
                f"api_key='{key}'); print(c.chat.completions.create(model='{r.model_id}', "
                f"messages=[{{'role': 'user', 'content': {_prompt(r.task)!r}}}], max_tokens=8)"
                f'.choices[0].message.content)"',
                "",
            ]
        else:
            body = {"model": r.model_id, "input": [_sample(r.task)]}
            lines += [
                f"# {r.task}",
                f"curl -s {url}/v1/classify -H 'Content-Type: application/json'{auth} "
                f"-d '{json.dumps(body)}'",
                f"python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', "
                f"api_key='{key}'); print(c.post('/classify', cast_to=object, "
                f"body={{'model': '{r.model_id}', 'input': [{_sample(r.task)!r}]}}))\"",
                "",
            ]
    return lines


_SAMPLES = {
    "rt-sentiment": "a warm, funny and beautifully acted film",
    "rt-subjectivity": "the film follows a young woman who moves to paris to study music",
    "convention-party": "we will cut taxes for small businesses and get government out of the way",
}


def _sample(task: str) -> str:
    return _SAMPLES.get(task, "a short example text")


def _prompt(task: str) -> str:
    if task == "arith":
        from storage.tasks import arith_prompt

        return arith_prompt("Ava", 12, "apples", 7)
    from storage.tasks import sentiment_prompt

    return sentiment_prompt(_SAMPLES["rt-sentiment"])


def table_data(rows: list[DemoRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
