"""darex CLI: ``darex reproduce [--quick]`` (the paper's experiments) and ``darex demo``."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from server.cli import (
    app,
    check_data_dir,
    check_data_dir_can_be_made,
    check_port_free,
    cli_settings,
    error_exit,
    folder_problem,
    print_wide,
)
from server.settings import Settings, rate_problem

console = Console()


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device {dev}"
    )


def _rows_table(rows, title: str) -> Table:
    t = Table(title=title)
    for c in ("task", "spec", "method", "p", "metric", "q", "stored KiB", "s"):
        t.add_column(c, justify="right" if c not in ("task", "spec", "method") else "left")
    for r in rows:
        if r.method == "recommend":
            continue
        spread = f" ± {100 * r.std:.1f}" if len(r.values) > 1 else ""
        t.add_row(
            r.task,
            r.spec,
            r.method,
            f"{r.p:g}",
            f"{100 * r.mean:.1f}{spread}",
            "-" if r.q is None else f"{r.q:.4g}",
            f"{r.stored_bytes / 1024:.0f}",
            f"{r.seconds:.0f}",
        )
    return t


@app.command()
def reproduce(
    quick: bool = typer.Option(False, "--quick", help="CI check: one task, asserts the headline."),
    out: Path | None = typer.Option(None, "--out", help="Write the report (markdown, PNGs) here."),
    work: Path = typer.Option(Path("bench/out/work"), help="Cache of fine-tunes and results."),
    only: list[str] = typer.Option([], "--only", help="Tasks to run (default: all of the base)."),
    part: list[str] = typer.Option([], "--part", help="Fine-tune specs to run (default: all)."),
    base: str = typer.Option("minilm-l6", help="minilm-l6 or smollm2-135m."),
    rates: str = typer.Option("", help="Comma-separated rates (default 0.5,0.9,0.95,0.99,0.999)."),
    methods: str = typer.Option("", help="Comma-separated methods (default: all)."),
    test: int | None = typer.Option(
        None, min=1, help="Test examples per evaluation (default: the task's grid budget)."
    ),
    val: int | None = typer.Option(
        None, min=1, help="Validation examples for the labeled q search (default: the grid's)."
    ),
    max_length: int | None = typer.Option(
        None, min=1, help="Tokens per example, longer ones cut (default: the grid's)."
    ),
    report_only: bool = typer.Option(False, help="Only rebuild the report from the results."),
    jobs: int = typer.Option(
        1, "--jobs", "-j", min=1, help="Settings run side by side (worker processes)."
    ),
    device: str = typer.Option(
        "auto", help="Where fine-tunes and evaluations run: auto (the GPU if any), cpu, cuda."
    ),
) -> None:
    """Fine-tune, prune with every method at every rate, evaluate; tables and plots.

    --jobs N runs N (task, spec) settings at once; cells and fine-tunes are kept in WORK/full.
    """
    from server import reproduce as rp
    from storage.bases import resolve_base
    from storage.errors import BadCheckpoint, UnknownBase
    from storage.tasks import list_tasks, load_task

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"{device!r}: use auto, cpu or cuda", param_hint="--device")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter("no CUDA device here; use auto or cpu", param_hint="--device")
    try:
        given_rates = tuple(float(x) for x in rates.split(",")) if rates else ()
    except ValueError:
        raise typer.BadParameter(
            f"{rates!r}: comma-separated numbers, e.g. 0.9,0.99", param_hint="--rates"
        ) from None
    if why := rate_problem(*given_rates):
        raise typer.BadParameter(why, param_hint="--rates")
    for option, folder in (("--out", out), ("--work", work)):
        if folder is not None and (why := folder_problem(folder)):
            raise typer.BadParameter(why, param_hint=option)
    if quick and (only or part or methods or rates or test or val or max_length or report_only):
        raise typer.BadParameter(
            "--quick runs its own setting (rt-sentiment, p 0.9 and 0.99, DARE and DAREx-q); "
            "--only, --part, --methods, --rates, --test, --val, --max-length and "
            "--report-only are for the full grid"
        )
    if report_only and out is None:
        raise typer.BadParameter("--report-only writes the report: give --out DIR")
    if report_only and (only or part or methods or rates):
        raise typer.BadParameter(
            "--report-only rebuilds the report from every row in --work (and --out's "
            "records); --only, --part, --methods and --rates choose what a run runs"
        )
    s = cli_settings()
    t0 = time.perf_counter()
    try:
        info = resolve_base(base, s.data_dir)
    except (UnknownBase, BadCheckpoint) as e:
        raise typer.BadParameter(str(e), param_hint="--base") from None
    if quick:
        res = rp.quick(work / "quick", info, load_task("rt-sentiment"), device=device)
        print_wide(_rows_table(res.rows, f"darex reproduce --quick ({res.seconds:.0f} s)"))
        console.print(
            f"p=0.99: DAREx-q - DARE = {100 * res.gain:+.1f} points (need >= +10), "
            f"unpruned - DAREx-q = {100 * res.gap:.1f} points (need <= 5)"
        )
        if out:
            _write_report(out, work / "quick", "quick", res.seconds, quick=True)
        if not res.ok:
            console.print("[red]headline NOT reproduced[/red]")
            if res.stalled and res.loss is not None:
                console.print(
                    f"[red]the fine-tune did not learn the task (training loss "
                    f"{res.loss[0]:.3f} -> {res.loss[1]:.3f}): there was no fine-tune for DARE "
                    "or DAREx-q to keep, so this run says nothing about either "
                    "(docs/results/reproduce.md, 'How the quick setting was found')[/red]"
                )
            raise typer.Exit(1)
        console.print("[green]headline reproduced[/green]")
        return
    full = work / "full"
    failed: list[str] = []
    if not report_only:
        specs = rp.DECODER_SPECS if info.arch == "decoder" else rp.ENCODER_SPECS
        unknown = [p for p in part if p not in specs]
        if unknown:
            raise typer.BadParameter(
                f"unknown fine-tune spec(s) {unknown}; {info.arch} specs: {', '.join(specs)}",
                param_hint="--part",
            )
        rate_list = given_rates or rp.RATES
        method_list = tuple(methods.split(",")) if methods else rp.METHODS
        if bad_m := [m for m in method_list if m not in rp.METHODS]:
            raise typer.BadParameter(
                f"unknown method(s) {bad_m}; methods: {', '.join(rp.METHODS)}",
                param_hint="--methods",
            )
        parts = [
            rp.Part(
                task,
                spec,
                specs[spec],
                rp.grid_budget(rp.slug(info.name), task, test, val, max_length),
                device,
            )
            for task in only or rp.TASKS[info.name if info.name in rp.TASKS else "minilm-l6"]
            for spec in part or list(specs)
        ]
        bad = sorted({p.task for p in parts} - set(list_tasks()))
        if bad:  # before any fine-tune starts
            raise typer.BadParameter(
                f"unknown task(s) {bad}; known tasks: {', '.join(list_tasks())}",
                param_hint="--only",
            )

        def show(p: rp.Part, res: list[rp.Row] | BaseException) -> None:
            if isinstance(res, BaseException):
                failed.append(f"{p.task}/{p.spec}")
                console.print(f"[red]{info.name} / {p.task} / {p.spec} failed:[/red] {res}")
            else:
                print_wide(_rows_table(res, f"{info.name} / {p.task} / {p.spec}"))

        rp.run_parts(full, info, parts, rate_list, method_list, jobs=jobs, on_done=show)
    if out:
        _write_report(out, full, "full", time.perf_counter() - t0, quick=False)
    if failed:
        console.print(f"[red]{len(failed)} part(s) failed:[/red] {', '.join(failed)}")
        raise typer.Exit(1)


def _write_report(out: Path, work: Path, name: str, seconds: float, *, quick: bool) -> None:
    """The report (markdown, PNGs) in ``out``. A full report is built from ``out/records``
    after ``work``'s rows and fine-tune records are merged into it
    (``reproduce_report.merge_records``), so runs in parts, on other machines too, add up
    to one report, and the report can be rebuilt from what is kept beside it."""
    from server import reproduce as rp
    from server import reproduce_report as rr

    out.mkdir(parents=True, exist_ok=True)
    if quick:
        rows = rp.read_rows(work)
    else:  # the rows and fine-tune records are kept in OUT/records and merged there
        rows = rr.merge_records(out / rr.RECORDS, work)
        work = out / rr.RECORDS
    rr.write_plots(rows, out, prefix=f"reproduce-{name}" if quick else "reproduce")
    argv = sys.argv or ["darex", "reproduce"]
    head = "python bench/reproduce.py" if argv[0].endswith("reproduce.py") else "darex"
    cmd = " ".join([head, *argv[1:]])
    lines = [
        f"<!-- generated by `{cmd}` -->",
        f"machine: {machine()}; run time {seconds:.0f} s",
        "",
        *rr.tables_markdown(rows, "" if quick else "./", work),
    ]
    (out / f"reproduce-{name}.md").write_text("\n".join(lines) + "\n")
    console.print(f"wrote {out / f'reproduce-{name}.md'}")


@app.command()
def demo(
    base: str | None = typer.Option(None, help="Base (default DAREX_BASE, i.e. minilm-l6)."),
    task: list[str] = typer.Option([], "--task", help="Demo tasks (default: 3 for encoders)."),
    steps: int | None = typer.Option(None, min=1, help="Fine-tune steps (default one epoch)."),
    train: int = typer.Option(2000, min=1, help="Training examples per fine-tune."),
    eval_n: int = typer.Option(400, "--eval", min=1, help="Test examples for the accuracy table."),
    rate: float = typer.Option(0.99, help="Pruning rate of the stored deltas, 0 <= p <= 0.999999."),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Start the server afterwards."),
    host: str | None = typer.Option(None, help="Bind address (default DAREX_HOST)."),
    port: int | None = typer.Option(None, min=0, max=65535, help="Port (default DAREX_PORT)."),
) -> None:
    """Fine-tune small demo models, store them at p = 0.99, print a table, then serve them."""
    import sqlite3

    from server.demo import DemoBudget, build_one, default_tasks, usage_lines
    from storage.bases import resolve_base
    from storage.errors import BadCheckpoint, StorageError, UnknownBase
    from storage.registry import open_registry
    from storage.store import DeltaStore

    if why := rate_problem(rate):
        raise error_exit(f"--rate: {why}", 2)
    from storage.tasks import list_tasks, load_task

    if bad := [t for t in task if t not in list_tasks()]:
        known = ", ".join(list_tasks())
        raise error_exit(f"--task: unknown task(s) {bad}; known tasks: {known}", 2)
    if not os.environ.get("DAREX_ADMIN_TOKEN"):
        os.environ.setdefault("DAREX_ENV", "development")
    s = cli_settings(Settings)
    check_data_dir_can_be_made(s.data_dir)
    try:
        info = resolve_base(base or s.base, s.data_dir)
    except (UnknownBase, BadCheckpoint) as e:
        where = "--base" if base else "DAREX_BASE"
        raise error_exit(f"{where}: {type(e).__name__}: {e}", 2) from None
    want = "generation" if info.arch == "decoder" else "classification"
    for t in task:  # a task the base cannot serve would fail after its fine-tune
        if (kind := load_task(t).kind) != want:
            raise error_exit(
                f"--task: {t!r} is a {kind} task, and base {info.name!r} (an {info.arch}) "
                f"serves {want} tasks, e.g. {', '.join(default_tasks(info))}",
                2,
            )
    h, pt = host or s.host, port if port is not None else s.port
    if serve:  # refused now, not after the fine-tunes; port 0 becomes the free port found
        try:
            s.check_serving()
        except ValueError as e:  # the default admin token outside development
            raise error_exit(str(e), 2) from None
        pt = check_port_free(h, pt)
    check_data_dir(s.data_dir, create=True)
    try:
        store = DeltaStore(s.data_dir, open_registry(s.registry))
    except (StorageError, OSError, sqlite3.Error, ValueError) as e:
        where = "DAREX_REGISTRY_URL" if s.registry_url else "the store in DAREX_DATA_DIR"
        raise error_exit(f"{where}: {type(e).__name__}: {e}", 1) from None
    budget = DemoBudget(steps=steps, train=train, eval_n=eval_n)
    rows = []
    try:
        for t in task or default_tasks(info):
            console.print(f"[bold]{t}[/bold]: fine-tune, store at p={rate}, evaluate")
            row = build_one(store, s.data_dir, info, t, budget, rate)
            rows.append(row)
            if row.reused:
                console.print(
                    f"  {row.model_id}: reused the fine-tune, the stored delta and its scores"
                )
    finally:
        store.close()
    tab = Table(title=f"demo fine-tunes of {info.name}, stored at p={rate}")
    for c in (
        "task",
        "model_id",
        "method",
        "unpruned",
        "stored",
        "stored bytes",
        "fp16 bytes",
        "ratio",
    ):
        tab.add_column(c)
    for r in rows:
        tab.add_row(
            r.task,
            r.model_id,
            r.method,
            f"{100 * r.unpruned:.1f}",
            f"{100 * r.stored:.1f}",
            f"{r.stored_bytes:,}",
            f"{r.fp16_bytes:,}",
            f"1/{r.fp16_bytes / max(r.stored_bytes, 1):.0f}",
        )
    print_wide(tab)
    token = s.api_key.get_secret_value() if s.api_key else None
    url = f"http://{'127.0.0.1' if h in ('0.0.0.0', '::') else h}:{pt}"
    for line in usage_lines(rows, info.arch, url, token):
        typer.echo(line)
    if not serve:
        return
    import uvicorn

    from server.api.app import create_app

    s = Settings(  # its token was checked before the fine-tunes
        base=str(info.path) if info.name not in ("minilm-l6", "smollm2-135m") else info.name
    )
    typer.echo(f"serving {len(rows)} fine-tunes of {info.name} on {url} (Ctrl-C stops)")
    uvicorn.run(create_app(s), host=h, port=pt, log_level="warning")
