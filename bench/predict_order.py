"""Evaluation batches shortest first (``storage.predict.by_length``) against file order.

``predict`` pads each batch to its longest example. Taking the examples shortest first
pads less; this measures how much time that saves, in one run (the two orders
alternate, ``--repeats`` times each, and the ratio of the medians is printed), and
checks that both orders give the same predictions.

    python -m bench.predict_order                  # MiniLM-L6, rt-sentiment, 500 test examples
    python -m bench.predict_order --base smollm2-135m --task rt-sentiment-gen --n 200 \
        --max-length 64

Without ``--finetune`` the base itself is evaluated (MiniLM-L6 with an untrained
classification head): the time depends on the shapes, not on the weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import storage.predict as sp
from server.evaluation import load_finetuned
from server.settings import Settings
from storage.bases import resolve_base
from storage.tasks import load_task


def file_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The former batching: consecutive examples."""
    idx = list(range(len(lengths)))
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def padded_per_row(lengths: Sequence[int], batches: list[list[int]]) -> float:
    return sum(max(lengths[i] for i in b) * len(b) for b in batches) / len(lengths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="minilm-l6")
    ap.add_argument("--task", default="rt-sentiment")
    ap.add_argument("--finetune", type=Path, help="a fine-tuned folder (default: the base)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=500, help="examples (the grid's test budget)")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64, help="the reproduction's batch")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)  # the untrained head, when there is one
    task = load_task(args.task)
    exs = task.split(args.split)[: args.n]
    if args.finetune:
        model, tok = load_finetuned(args.finetune, "cpu")
    else:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        path = resolve_base(args.base, Settings().data_dir).path
        if task.kind == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(task.labels)
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model, tok = model.eval(), sp.load_tokenizer(path)
    rows = sp.token_rows(tok, task, [e.text for e in exs], args.max_length)
    lengths = [len(r) for r in rows]

    orders = {"file order": file_order, "by length": sp.by_length}
    seconds: dict[str, list[float]] = {k: [] for k in orders}
    preds: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, split in orders.items():
            sp.by_length = split  # predict looks it up at call time
            t0 = time.perf_counter()
            preds[name] = sp.predict(
                model, tok, task, exs, batch_size=args.batch_size, max_length=args.max_length
            )
            seconds[name].append(time.perf_counter() - t0)
    sp.by_length = orders["by length"]

    cpu = platform.processor() or platform.machine()
    print(
        f"{args.base} / {args.task}: {len(exs)} {args.split} examples, {args.max_length} tokens, "
        f"batches of {args.batch_size}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), {cpu}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    )
    for name, split in orders.items():
        pad = padded_per_row(lengths, split(lengths, args.batch_size))
        med = statistics.median(seconds[name])
        print(f"  {name:10s}: {pad:5.1f} tokens a row, {med:7.2f} s (median of {args.repeats})")
    ratio = statistics.median(seconds["file order"]) / statistics.median(seconds["by length"])
    same = sum(a == b for a, b in zip(preds["file order"], preds["by length"], strict=True))
    print(f"  by length is {ratio:.2f}x faster; same predictions: {same}/{len(exs)}")


if __name__ == "__main__":
    main()
