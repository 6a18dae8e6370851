"""darex CLI: ``darex finetune BASE TASK --out DIR``."""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path

import typer

from server.cli import app
from server.settings import Settings


class OptimizerName(StrEnum):
    adam = "adam"
    adamr_l2 = "adamr-l2"
    adamr_l1 = "adamr-l1"


DEFAULT_DATA_DIR = Settings.model_fields["data_dir"].default


@app.command()
def finetune(
    base: str = typer.Argument(..., help="Catalog name (minilm-l6, smollm2-135m) or HF folder."),
    task: str = typer.Argument(..., help="rt-sentiment, rt-subjectivity, convention-party, ..."),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Folder for the fine-tuned checkpoint: a new or empty folder, or a previous "
        "fine-tune's output (holding darex_finetune.json), which is replaced as a whole. "
        "Any other existing folder, a file, or the base's folder is refused.",
    ),
    optimizer: OptimizerName = typer.Option(OptimizerName.adam, help="adam or AdamR (L2/L1)."),
    reg: float = typer.Option(0.0, min=0.0, help="AdamR penalty lambda toward the base weights."),
    lora: bool = typer.Option(False, "--lora", help="Train a PEFT LoRA adapter instead."),
    rank: int = typer.Option(8, min=1, help="LoRA rank."),
    lr: float | None = typer.Option(None, help="Learning rate > 0 [5e-5 full, 1e-3 LoRA]."),
    epochs: int = typer.Option(1, min=1, help="Passes over the training examples."),
    max_steps: int | None = typer.Option(None, min=1, help="Stop after this many steps."),
    seed: int = typer.Option(0, help="Seed of the head init and the batch order."),
    batch_size: int = typer.Option(16, min=1, help="Examples per step."),
    max_train: int = typer.Option(4000, min=0, help="Use the first N training examples; 0 = all."),
    max_eval: int = typer.Option(0, min=0, help="Validate on the first N examples; 0 = all."),
    max_length: int = typer.Option(
        64, min=1, help="Tokens per example; longer inputs are truncated."
    ),
    train_embeddings: bool | None = typer.Option(
        None,
        "--train-embeddings/--freeze-embeddings",
        help="Default: encoders train them, decoders keep their tied embeddings frozen.",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    data_dir: Path = typer.Option(
        DEFAULT_DATA_DIR, envvar="DAREX_DATA_DIR", help="Where converted bases are cached."
    ),
) -> None:
    """Fine-tune BASE on TASK and write a HF checkpoint (or a LoRA adapter) to --out."""
    from server.training import FinetuneError, FinetuneOptions, check_out_dir
    from server.training import finetune as run_finetune
    from storage.bases import CATALOG, resolve_base
    from storage.errors import StorageError
    from storage.tasks import load_task

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"{device!r}: use auto, cpu or cuda", param_hint="--device")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter("no CUDA device here; use auto or cpu", param_hint="--device")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise typer.BadParameter(f"must be a number > 0, got {lr}", param_hint="--lr")
    if not math.isfinite(reg):
        raise typer.BadParameter(f"must be a finite number >= 0, got {reg}", param_hint="--reg")
    opts = {
        "optimizer": optimizer.value,
        "reg": reg,
        "lora": lora,
        "rank": rank,
        "lr": lr,
        "epochs": epochs,
        "max_steps": max_steps,
        "seed": seed,
        "batch_size": batch_size,
        "max_train": max_train or None,
        "max_eval": max_eval or None,
        "max_length": max_length,
        "train_embeddings": train_embeddings,
        "device": device,
    }
    try:
        FinetuneOptions(**opts).check()  # every check before the base is resolved or loaded
        check_out_dir(out, None if base in CATALOG else Path(base))  # and in run_finetune
        info = resolve_base(base, data_dir)
        the_task = load_task(task)
        result = run_finetune(info, the_task, out, **opts)
    except (StorageError, FinetuneError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    except Exception as e:  # one line, no traceback: out of memory, a full disk, ...
        typer.echo(f"error: {type(e).__name__}: {' '.join(str(e).split())}", err=True)
        raise typer.Exit(1) from e
    typer.echo(
        f"{the_task.name} on {info.name}: {result.steps} steps in {result.seconds:.1f} s, "
        f"probe loss {result.loss_before:.4f} -> {result.loss_after:.4f}"
    )
    typer.echo(f"validation {result.metric_name}: {result.metric:.4f}")
    typer.echo(f"wrote {result.out} ({'LoRA adapter' if lora else 'full checkpoint'})")
