"""darex CLI: store commands (add, ls, rm, gc, verify)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from server.cli import app
from server.settings import get_settings

console = Console()


def _store():
    from storage.store import DeltaStore

    s = get_settings()
    return DeltaStore(s.data_dir, s.registry)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _fail(e: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {type(e).__name__}: {e}")
    return typer.Exit(1)


@app.command()
def add(
    model_id: Annotated[str, typer.Argument(help="Name to serve the fine-tune under.")],
    path: Annotated[Path, typer.Argument(help="HF folder, .safetensors file or PEFT adapter.")],
    method: Annotated[
        str | None,
        typer.Option(
            help="dare, darex_q, magnitude, wanda (needs --calib), structural "
            "(default: recommended)."
        ),
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Pruning rate p (default DAREX_DEFAULT_RATE).")
    ] = None,
    q: Annotated[float | None, typer.Option(help="DAREx-q rescale 1/q (darex_q).")] = None,
    calib: Annotated[
        Path | None,
        typer.Option(
            help="Texts, one per line: DAREx-q's q is searched on them; WANDA's input "
            "norms are measured on them."
        ),
    ] = None,
    val: Annotated[
        Path | None,
        typer.Option(
            help="Labeled examples (JSON lines: 'text' and 'label' or 'target'): DAREx-q's "
            "q is searched for the best metric on them."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the DARE mask.")] = 0,
    encoding: Annotated[str, typer.Option(help="auto, seed, explicit or dense.")] = "auto",
    values: Annotated[str, typer.Option(help="float16, bfloat16, float32 or int8.")] = "float16",
    base: Annotated[str | None, typer.Option(help="Base (default DAREX_BASE).")] = None,
    replace: Annotated[bool, typer.Option(help="Replace an existing model_id.")] = False,
) -> None:
    """Prune a fine-tune against the base and store it as a sparse delta."""
    from pruning.errors import PruningError
    from storage.bases import resolve_base
    from storage.errors import StorageError
    from storage.ingest import ingest
    from storage.labeled import check_val_options, read_labeled
    from storage.qsearch import read_calib_texts

    s = get_settings()
    try:
        texts = rows = None
        if calib is not None:
            texts = read_calib_texts(calib.read_text())
            if not texts:
                raise ValueError(f"{calib} holds no calibration text")
        if val is not None:
            check_val_options(method, q)
            rows = read_labeled(val.read_text(), source=str(val))
        info = resolve_base(base or s.base, s.data_dir)
        if model_id == info.name:  # a server answers this id with the base itself
            raise ValueError(
                f"model_id {model_id!r} is the base's own id: a server serving this base "
                "would answer it with the base; pick another id"
            )
        store = _store()
        res = ingest(
            store,
            model_id,
            path,
            info,
            method=method,
            p=rate if rate is not None else s.default_rate,
            q=q,
            seed=seed,
            encoding=encoding,
            value_dtype=values,
            replace=replace,
            max_tensors=s.max_tensors,
            calib_texts=texts,
            val=rows,
        )
    except (StorageError, PruningError, ValueError, OSError) as e:
        raise _fail(e) from e
    m = res.manifest
    console.print(
        f"added [bold]{model_id}[/bold]: {m.method} p={m.p} "
        f"q={f'{m.q:.4g}' if isinstance(m.q, float) else m.q}, "
        f"{_size(m.stored_bytes())} = 1/{1 / m.ratio:.1f} of fp16, {res.seconds:.1f}s"
    )
    if m.reason and m.reason != "given":
        console.print(f"why: {m.reason}")


@app.command("ls")
def ls() -> None:
    """List stored fine-tunes: size, ratio vs fp16, method."""
    from storage.errors import StorageError

    try:
        store = _store()
        rows = [(mid, store.manifest(mid)) for mid in store.models()]
    except StorageError as e:
        raise _fail(e) from e
    table = Table("model_id", "task", "method", "p", "q", "size", "ratio", "created")
    for mid, m in rows:
        q = m.q if not isinstance(m.q, dict) else "per-layer"
        table.add_row(
            mid,
            m.task,
            m.method,
            f"{m.p:g}",
            str(q),
            _size(m.stored_bytes()),
            f"1/{1 / m.ratio:.1f}",
            m.created.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@app.command()
def rm(model_id: Annotated[str, typer.Argument(help="Model to delete.")]) -> None:
    """Unregister a fine-tune (its blobs go at the next gc)."""
    from storage.errors import StorageError

    try:
        gone = _store().delete(model_id)
    except StorageError as e:
        raise _fail(e) from e
    if not gone:
        console.print(f"[red]error:[/red] model {model_id!r} is not registered")
        raise typer.Exit(1)
    console.print(f"removed {model_id}")


@app.command()
def gc(
    grace_s: Annotated[
        float, typer.Option(help="Keep unreferenced blobs younger than this (in-flight ingests).")
    ] = 3600.0,
) -> None:
    """Delete blobs no registered model references."""
    from storage.errors import StorageError

    try:
        r = _store().gc(grace_s=grace_s)
    except StorageError as e:
        raise _fail(e) from e
    console.print(
        f"gc: deleted {r.deleted} blob(s), {_size(r.freed_bytes)} freed, kept {r.kept}, "
        f"{r.young_unreferenced} unreferenced within the grace period, "
        f"{r.temps_deleted} stale temp file(s)"
    )


@app.command()
def verify() -> None:
    """Re-hash every blob; check every registered model's manifest and tensors."""
    from storage.errors import StorageError

    try:
        r = _store().verify()
    except StorageError as e:
        raise _fail(e) from e
    for p in r.problems:
        console.print(f"[red]problem:[/red] {p}")
    console.print(f"verify: {r.models} model(s), {r.blobs} blob(s), {len(r.problems)} problem(s)")
    if not r.ok:
        raise typer.Exit(1)
