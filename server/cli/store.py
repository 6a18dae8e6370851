"""darex CLI: store commands (add, ls, rm, gc, verify, rebind)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from server.cli import (
    app,
    check_data_dir,
    check_data_dir_can_be_made,
    cli_settings,
    error_exit,
    file_problem,
    print_wide,
)
from server.settings import rate_problem

if TYPE_CHECKING:
    from storage.store import DeltaStore

console = Console()

SEED_MASK_METHODS = ("dare", "darex_q")  # the methods whose kept entries a seed redraws


def _store(*, create: bool = False, new_registry: bool = False) -> DeltaStore:
    """The store of ``DAREX_DATA_DIR``; only ``add`` (``create``) makes a missing folder.
    A SQLite registry file that does not exist is made only by ``add`` and by
    ``rebind --yes`` (``new_registry``): the commands that read would otherwise list an
    empty registry made on the spot (a mistyped ``DAREX_REGISTRY_URL``) as the store's."""
    import sqlite3

    from storage.errors import StorageError
    from storage.registry import sqlite_path
    from storage.store import DeltaStore

    s = cli_settings()
    check_data_dir(s.data_dir, create=create)
    path = sqlite_path(s.registry)
    if not (create or new_registry) and path is not None and not path.exists():
        where = (
            f"DAREX_REGISTRY_URL: no SQLite registry at {path}"
            if s.registry_url
            else f"DAREX_REGISTRY_URL is unset and the data folder has no registry ({path})"
        )
        raise error_exit(
            f"{where}: point DAREX_REGISTRY_URL at the store's registry, or, if that is "
            "lost for good, `darex rebind --yes` makes a new one the store's",
            2,
        )
    try:
        return DeltaStore(s.data_dir, s.registry)
    except (StorageError, OSError, sqlite3.Error, ValueError) as e:
        raise _fail(e) from None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _fail(e: Exception, code: int = 1) -> typer.Exit:
    """One ``error: <Type>: <message>`` line on stderr (never wrapped); exit 1 by default."""
    return error_exit(f"{type(e).__name__}: {e}", code)


def _check_add_options(
    method: str | None,
    rate: float | None,
    default_rate: float,
    q: float | None,
    encoding: str,
    values: str,
    calib: Path | None,
    val: Path | None,
) -> str | None:
    """Refuse bad or conflicting ``darex add`` options before any work (exit 2, naming the
    option). Returns the method: ``--q`` without ``--method`` means ``darex_q``."""
    from pruning.errors import PruningError
    from pruning.methods import Method, q_problem
    from storage.codec import VALUE_DTYPES
    from storage.ingest import ENCODING_CHOICES
    from storage.labeled import check_val_options

    def bad(option: str, why: str) -> typer.Exit:
        return error_exit(f"{option}: {why}", 2)

    methods = [m.value for m in Method]
    if method is not None and method not in methods:
        raise bad("--method", f"{method!r} is not one of {', '.join(methods)}")
    option, given = ("--rate", rate) if rate is not None else ("DAREX_DEFAULT_RATE", default_rate)
    if why := rate_problem(given):
        raise bad(option, why)
    if q is not None and (why := q_problem(q)):
        raise bad("--q", why)
    if encoding not in ENCODING_CHOICES:
        raise bad("--encoding", f"{encoding!r} is not one of {', '.join(ENCODING_CHOICES)}")
    if values not in VALUE_DTYPES:
        raise bad("--values", f"{values!r} is not one of {', '.join(VALUE_DTYPES)}")
    if val is not None:
        try:
            check_val_options(method, q)
        except PruningError as e:
            raise bad("--val", str(e).removeprefix("val: ")) from None
    if q is not None and method is None:
        method = "darex_q"
    if method == "dare" and q is not None:
        raise bad("--q", "dare rescales by 1/(1-p) and takes no q; use --method darex_q")
    if method == "darex_q" and q is None and calib is None and val is None:
        raise bad("--method", "darex_q needs --q, or --calib or --val to search q on")
    if method == "wanda" and calib is None:
        raise bad("--method", "wanda needs --calib FILE (its input norms are measured on it)")
    if encoding == "seed" and method is not None and method not in SEED_MASK_METHODS:
        raise bad(
            "--encoding",
            f"seed stores the mask as its seed, which only {' and '.join(SEED_MASK_METHODS)} "
            f"draw; method {method} needs explicit (or auto)",
        )
    return method


@app.command()
def add(
    model_id: Annotated[str, typer.Argument(help="Name to serve the fine-tune under.")],
    path: Annotated[Path, typer.Argument(help="HF folder, .safetensors file or PEFT adapter.")],
    method: Annotated[
        str | None,
        typer.Option(
            help="dare, darex_q, magnitude, wanda (needs --calib), structural "
            "(default: darex_q when --q is given, else recommended)."
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(help="Pruning rate p, 0 <= p <= 0.999999 (default DAREX_DEFAULT_RATE)."),
    ] = None,
    q: Annotated[
        float | None,
        typer.Option(
            help="DAREx-q rescale 1/q, q > 0; without --method it means --method darex_q "
            "(dare takes none)."
        ),
    ] = None,
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
    encoding: Annotated[
        str, typer.Option(help="auto, seed (dare, darex_q), explicit or dense.")
    ] = "auto",
    values: Annotated[str, typer.Option(help="float16, bfloat16, float32 or int8.")] = "float16",
    base: Annotated[str | None, typer.Option(help="Base (default DAREX_BASE).")] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="feature-extraction, sequence-classification or causal-lm (default: the "
            "one the checkpoint's config names)."
        ),
    ] = None,
    replace: Annotated[bool, typer.Option(help="Replace an existing model_id.")] = False,
) -> None:
    """Prune a fine-tune against the base and store it as a sparse delta."""
    from pruning.errors import PruningError
    from storage.bases import resolve_base
    from storage.errors import BadCheckpoint, ModelExists, StorageError, UnknownBase
    from storage.ingest import ingest
    from storage.labeled import read_labeled
    from storage.modelid import validate_model_id
    from storage.qsearch import read_calib_texts

    s = cli_settings()
    method = _check_add_options(method, rate, s.default_rate, q, encoding, values, calib, val)
    from storage.manifest import TASKS

    if task is not None and task not in TASKS:
        raise error_exit(f"--task: {task!r} is not one of {', '.join(TASKS)}", 2)
    for option, file in (("--calib", calib), ("--val", val)):
        if file is not None and (why := file_problem(file)):
            raise error_exit(f"{option}: {why}", 2)
    # everything that can refuse the command is checked before the store is opened, so a
    # refused first `darex add` leaves no new store behind
    check_data_dir_can_be_made(s.data_dir)
    try:
        validate_model_id(model_id)
    except StorageError as e:
        raise error_exit(f"MODEL_ID: {e}", 2) from None

    def own_id() -> typer.Exit:
        return error_exit(
            f"MODEL_ID: {model_id!r} is the base's own id: a server serving this base would "
            "answer it with the base; pick another id",
            2,
        )

    if model_id == (base or s.base):  # a catalog base's id; a folder's has a "/"
        raise own_id()
    if not path.exists():
        raise error_exit(f"PATH: {path} does not exist", 2)
    texts = rows = None
    if calib is not None:
        texts = read_calib_texts(calib.read_text(encoding="utf-8"))
        if not texts:
            raise error_exit(f"--calib: {calib} holds no calibration text", 2)
    if val is not None:
        try:
            rows = read_labeled(val.read_text(encoding="utf-8"), source=str(val))
        except PruningError as e:
            raise error_exit(f"--val: {e}", 2) from None
    try:
        info = resolve_base(base or s.base, s.data_dir)
    except (UnknownBase, BadCheckpoint) as e:  # a usage error: --base / DAREX_BASE
        where = "--base" if base else "DAREX_BASE"
        raise error_exit(f"{where}: {type(e).__name__}: {e}", 2) from None
    except (StorageError, OSError) as e:
        raise _fail(e) from None
    if model_id == info.name:  # a server answers this id with the base itself
        raise own_id()
    store = _store(create=True)
    try:
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
            task=task,
        )
    except ModelExists as e:
        raise error_exit(f"{type(e).__name__}: {e} (use --replace to overwrite)") from None
    except (StorageError, PruningError, ValueError, OSError) as e:
        raise _fail(e) from None
    finally:
        store.close()
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

    rows, problems = [], []
    try:
        store = _store()
        for mid in store.models():
            try:
                rows.append((mid, store.manifest(mid)))
            except StorageError as e:  # one broken model does not hide the others
                problems.append(str(e))
                rows.append((mid, None))
    except (StorageError, OSError, ValueError) as e:
        raise _fail(e) from None
    table = Table("model_id", "task", "method", "p", "q", "size", "ratio", "created")
    for mid, m in rows:
        if m is None:
            table.add_row(mid, "[red]unreadable[/red]", *["-"] * 6)
            continue
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
    print_wide(table)
    for p in problems:
        console.print(f"[red]problem:[/red] {p}", soft_wrap=True)
    if problems:
        raise typer.Exit(1)


@app.command()
def rm(model_id: Annotated[str, typer.Argument(help="Model to delete.")]) -> None:
    """Unregister a fine-tune (its blobs go at the next gc)."""
    from storage.errors import StorageError

    try:
        gone = _store().delete(model_id)
    except (StorageError, OSError, ValueError) as e:
        raise _fail(e) from None
    if not gone:
        raise error_exit(f"model {model_id!r} is not registered")
    console.print(f"removed {model_id}")


def _not_nan(value: float) -> float:
    if math.isnan(value):  # click's FloatRange (older typer) lets NaN past min=0
        raise typer.BadParameter("nan is not a number of seconds >= 0")
    return value


@app.command()
def gc(
    grace_s: Annotated[
        float,
        typer.Option(
            min=0.0,
            callback=_not_nan,
            help="Keep unreferenced blobs younger than this many seconds, >= 0 "
            "(in-flight ingests).",
        ),
    ] = 3600.0,
) -> None:
    """Delete blobs no registered model references."""
    from storage.errors import StorageError

    try:
        r = _store().gc(grace_s=grace_s)
    except (StorageError, OSError, ValueError) as e:
        raise _fail(e) from None
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
    except (StorageError, OSError, ValueError) as e:
        raise _fail(e) from None
    for p in r.problems:
        console.print(f"[red]problem:[/red] {p}", soft_wrap=True)
    for key in r.unreferenced_corrupt:
        console.print(
            f"[yellow]note:[/yellow] unreferenced blob {key} is corrupt (no model uses it; "
            "`darex gc` removes it)",
            soft_wrap=True,
        )
    console.print(f"verify: {r.models} model(s), {r.blobs} blob(s), {len(r.problems)} problem(s)")
    if not r.ok:
        raise typer.Exit(1)


@app.command()
def rebind(
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: the configured registry becomes the store's.")
    ] = False,
) -> None:
    """Make the configured registry the store's, when the one it was bound to is lost.

    gc and uploads refuse a registry that is not the store's (a shell without
    DAREX_REGISTRY_URL, a Redis that came back empty). When the store's registry is gone
    for good, or the store was made before stores recorded theirs, this binds the
    configured one: blobs of models not registered in it are unreferenced from then on,
    and go at the next gc.
    """
    from storage.errors import RegistryMismatch, StorageError
    from storage.store import REGISTRY_ID_FILE, shown_url

    try:
        store = _store(new_registry=yes)
        url = shown_url(store.registry.url)
        try:
            problem = store.registry_problem()
        except RegistryMismatch as e:  # registry.id unreadable: what --yes rewrites
            if not yes or (store.root / REGISTRY_ID_FILE).is_dir():
                raise
            problem = str(e)
        bound = (store.root / REGISTRY_ID_FILE).exists()
        if bound and problem is None:
            console.print(f"nothing to do: {url} is the store's registry", soft_wrap=True)
            return
        if not yes:
            problem = problem or (
                f"the store {store.root} is not bound to a registry yet (nothing was stored "
                f"in it, or it was made before stores recorded theirs); `darex rebind --yes` "
                f"makes {url} its registry"
            )
            raise error_exit(problem, 1)
        old, new = store.rebind()
    except (StorageError, OSError, ValueError) as e:
        raise _fail(e) from None
    console.print(
        f"rebound: the store's registry is now {new} (was {old or 'none'})", soft_wrap=True
    )
