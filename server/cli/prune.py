"""darex CLI: ``darex inspect BASE FINETUNED`` and ``darex prune BASE FINETUNED ... --out DIR``.

``prune`` writes a merged, pruned HF checkpoint: for every pruned tensor
``W = W_base + sparse(d)``, so it differs from the base only at kept entries;
tensors kept exact carry the fine-tuned values; tensors the base lacks (a new
head) are copied. Tensors are read one at a time (memory-mapped safetensors)
and written one at a time to a single ``model.safetensors``: peak extra memory is
a few copies of the largest tensor. Pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from server.cli import app, error_exit, file_problem, print_wide
from server.settings import Settings, rate_problem

log = logging.getLogger(__name__)
console = Console()
DEFAULT_DATA_DIR = Settings.model_fields["data_dir"].default
_Q_MODES = ("outchange", "labeled", "auto", "analytical")
PRUNE_RECORD = "darex_prune.json"  # what marks a folder as a prune's output
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")
_ST_DTYPE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor: the header is laid out up front."""

    def __init__(self, path: Path, metas: list[tuple[str, torch.dtype, tuple[int, ...]]], meta):
        self.path, self.tmp = path, path.with_suffix(".tmp")
        header: dict[str, Any] = {"__metadata__": meta}
        off = 0
        for name, dtype, shape in metas:
            n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {
                "dtype": _ST_DTYPE[dtype],
                "shape": list(shape),
                "data_offsets": [off, off + n],
            }
            off += n
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self.order = [(n, d, s) for n, d, s in metas]
        self.f = open(self.tmp, "wb")  # noqa: SIM115  (closed in close() or abort())
        try:
            self.f.write(struct.pack("<Q", len(hb)) + hb)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, t: torch.Tensor) -> None:
        want = self.order.pop(0)
        assert (name, t.dtype, tuple(t.shape)) == want, (
            f"{name} {t.dtype} {tuple(t.shape)} vs {want}"
        )
        self.f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        assert not self.order, f"{len(self.order)} tensors not written"
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temporary file (a no-op after ``close``); ``path`` is left
        as it was."""
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _resolve(base: str, data_dir: Path) -> tuple[Path, str]:
    """(local folder, arch) of a catalog name or folder."""
    try:
        from storage.bases import resolve_base
    except ImportError:
        folder = Path(base)
        cfg = json.loads((folder / "config.json").read_text())
        causal = any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in cfg.get("architectures") or []
        )
        return folder, "decoder" if causal else "encoder"
    from storage.errors import BadCheckpoint, UnknownBase

    try:
        info = resolve_base(base, data_dir)
    except (UnknownBase, BadCheckpoint) as e:  # a usage error, as for `darex add --base`
        raise error_exit(f"BASE: {type(e).__name__}: {e}", 2) from None
    return Path(info.path), info.arch


def _open_pair(base: str, finetuned: Path, data_dir: Path):
    from storage.checkpoint import open_checkpoint, plan_against_base

    base_dir, arch = _resolve(base, data_dir)
    b, f = open_checkpoint(base_dir), open_checkpoint(finetuned)
    return base_dir, arch, b, f, plan_against_base(f, b)


def _fail(e: Exception) -> typer.Exit:
    """One ``error: <Type>: <message>`` line on stderr (never wrapped); exit 1."""
    return error_exit(f"{type(e).__name__}: {e}")


def _errors() -> tuple[type[Exception], ...]:
    from pruning.errors import PruningError
    from storage.errors import StorageError

    return (PruningError, StorageError, OSError, json.JSONDecodeError)


DATA_DIR_HELP = "Where converted catalog bases are cached."
PATTERN_HELP = (
    "a glob matched against the whole tensor name with fnmatch ('*.attention.*'), or "
    "'re:REGEX' searched in the name; repeat the option for several"
)


def _check_rate(rate: float) -> float:
    if why := rate_problem(rate):
        raise typer.BadParameter(f"--rate: {why}")
    return rate


def _parse_q(q: str | None) -> float | str | None:
    """None, a mode of ``_Q_MODES`` or a finite number >= ``MIN_Q``."""
    if q is None or q in _Q_MODES:
        return q
    try:
        value = float(q)
    except ValueError:
        value = math.nan
    from pruning.methods import MIN_Q

    if not (math.isfinite(value) and value >= MIN_Q):
        raise typer.BadParameter(
            f"--q must be a number >= {MIN_Q:g} or one of {', '.join(_Q_MODES)}; got {q!r}"
        )
    return value


def _check_file(path: Path | None, option: str) -> None:
    if path is not None and (why := file_problem(path)):
        raise typer.BadParameter(f"{option} {why}")


def _check_patterns(include: list[str] | None, exclude: list[str] | None) -> None:
    """A bad ``re:`` pattern is a usage error, found before anything is read."""
    from pruning.errors import PruningError
    from pruning.select import Selector

    try:
        Selector(include=tuple(include or ("*",)), exclude=tuple(exclude or ()))
    except PruningError as e:
        raise typer.BadParameter(str(e)) from e


def _check_out(out: Path, finetuned: Path, base_dir: Path) -> None:
    """--out must be usable and must not hold the inputs: the merged checkpoint would be
    written over the fine-tune's or the base's weights."""
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"--out {out} is a file, not a folder")
    o, ft = out.resolve(), finetuned.resolve()
    inputs = {ft, base_dir.resolve()} | ({ft.parent} if ft.is_file() else set())
    if o in inputs:
        raise typer.BadParameter(
            f"--out must not be the fine-tune's or the base's folder, got {out}"
        )
    # another model's config or tokenizer left beside the pruned weights would be read
    # with them; a previous prune's folder is replaced
    if out.is_dir() and any(out.iterdir()) and not (out / PRUNE_RECORD).is_file():
        raise typer.BadParameter(
            f"--out {out} holds other files; give a new or empty folder, or a previous "
            f"prune's (with {PRUNE_RECORD}), which is replaced"
        )


@app.command()
def inspect(
    base: Annotated[str, typer.Argument(help="Catalog name (minilm-l6, ...) or HF folder.")],
    finetuned: Annotated[Path, typer.Argument(help="Fine-tuned HF folder or .safetensors.")],
    rate: Annotated[float, typer.Option(help="Target pruning rate p, 0 <= p <= 0.999999.")] = 0.99,
    limit: Annotated[int, typer.Option(min=0, help="Rows of the per-tensor table (0 = all).")] = 30,
    data_dir: Annotated[
        Path, typer.Option(envvar="DAREX_DATA_DIR", help=DATA_DIR_HELP)
    ] = DEFAULT_DATA_DIR,
) -> None:
    """Print delta statistics per tensor and the recommended pruning method."""
    from pruning.delta import compute_delta
    from pruning.recommend import delta_stats, merge_stats, recommend
    from pruning.select import default_patterns

    _check_rate(rate)  # before the scan
    try:
        _, arch, b, f, plan = _open_pair(base, finetuned, data_dir)
        sel = default_patterns(arch)
        table = Table(title=f"delta {finetuned} - {base} ({arch}, names: {plan.prefix})")
        for col in ("tensor", "shape", "pruned", "mean|d|", "std|d|", "rms", "rms/rms(W)"):
            table.add_column(
                col, justify="left" if col == "tensor" else "right", overflow="fold", no_wrap=False
            )
        stats = {}
        for bname, fname in tqdm(plan.pairs.items(), desc="inspect", unit="tensor"):
            if not b.meta[bname].dtype.is_floating_point:
                continue
            w = b.get(bname)
            s = delta_stats(compute_delta(w, f.get(fname), fname), base=w)
            pruned = sel.matches(bname)
            if pruned:
                stats[bname] = s
            if not limit or len(table.rows) < limit:
                rel = f"{s.rms / s.base_rms:.3f}" if s.base_rms else "-"
                table.add_row(
                    bname,
                    "x".join(map(str, b.meta[bname].shape)),
                    "yes" if pruned else "exact",
                    f"{s.mean_abs:.2e}",
                    f"{s.std_abs:.2e}",
                    f"{s.rms:.2e}",
                    rel,
                )
        print_wide(table, 150)  # full tensor names
        m = merge_stats(stats.values())
        console.print(
            f"pruned tensors: {len(stats)}, {m.size:,} entries ({m.numel:,} changed); "
            f"mean|d| {m.mean_abs:.3e}, "
            f"spread {m.spread:.2f}, rms {m.rms:.3e}, noise ratio at p={rate}: "
            f"{m.noise_ratio(rate):.2f}; extras (dense): {plan.extras or 'none'}"
        )
        rec = recommend(stats, has_labels=False, is_lora=False, p=rate)
        console.print(f"recommended: [bold]{rec.method.value}[/bold] {rec.params} — {rec.reason}")
    except _errors() as e:
        raise _fail(e) from e


def _calib_batches(path: Path, tok_dirs: list[Path], n: int, max_len: int) -> list[dict]:
    from storage.predict import load_tokenizer
    from storage.qsearch import read_calib_texts, text_batches

    lines = read_calib_texts(path.read_text())[:n]
    if not any(t.strip() for t in lines):
        raise typer.BadParameter(f"{path} holds no calibration text")
    tok_dir = next((d for d in tok_dirs if (d / "tokenizer_config.json").is_file()), tok_dirs[-1])
    return text_batches(load_tokenizer(tok_dir), lines, max_len, limit=None)


def _calibrate(finetuned: Path, batches: list[dict], max_rows: int) -> tuple[dict, set[str]]:
    """Linear-layer input statistics of the fine-tuned model, keyed by its tensor names,
    and the names of its embedding tables (never measured: their input is a token id)."""
    import transformers

    from pruning.calib import capture
    from storage.errors import BadCheckpoint

    cfg = json.loads((finetuned / "config.json").read_text())
    cls_name = (cfg.get("architectures") or ["AutoModel"])[0]
    cls = getattr(transformers, str(cls_name), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    model, info = cls.from_pretrained(finetuned, dtype=torch.float32, output_loading_info=True)
    missing, total = len(info.get("missing_keys") or ()), len(model.state_dict())
    if total and missing > total // 2:
        # a model class the weights are not for: calibrating its random weights would
        # measure nothing of the fine-tune (and WANDA would fall back to magnitude)
        raise BadCheckpoint(
            f"{finetuned / 'config.json'} names {cls_name}, but {missing} of its {total} "
            "weights are not in the checkpoint: the config does not describe these weights"
        )
    tables = {
        f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)
    }
    stats = capture(model.eval(), tqdm(batches, desc="calibrate", unit="batch"), max_rows=max_rows)
    return stats, tables


def _copy_side_files(folders: list[Path], out: Path) -> None:
    """config, tokenizer and other non-weight files, in order, a later folder's winning
    (and a replaced prune's own going)."""
    for src in folders:
        if not src.is_dir():
            continue
        for item in src.iterdir():
            skip = item.name.endswith(WEIGHT_SUFFIXES) or item.name.endswith("index.json")
            if item.is_file() and not skip:
                shutil.copy(item, out / item.name)


def _layer_q(m, q_mode, d, p, st, name, seed, per, axis, eta, bias=None) -> float | None:
    """q of one tensor: the given number, or per layer from calibration inputs (``bias``:
    the layer's bias delta, an extra column of the analytical q)."""
    from pruning.methods import Method, prune_tensor
    from pruning.q import analytical_q, lsq_q

    if not isinstance(q_mode, str):
        return q_mode
    random = m in (Method.darex_q, Method.structural)
    if st is None or d.dim() != 2:  # no calibration inputs (embeddings, norms, biases)
        return 1.0 - p if random else None
    if q_mode == "analytical":
        return analytical_q(d, st.xbar, p, eta, bias_delta=bias, name=name)
    cn = st.col_norm
    mask = prune_tensor(m, d, p, name=name, seed=seed, q=1.0, col_norm=cn, per=per, axis=axis)
    try:
        return lsq_q(d, mask, st.x, name=name)
    except ValueError as e:
        log.warning("%s; keeping the default rescale", e)
        return 1.0 - p if random else None


def _pruned_deltas(b, f, ft_to_base, sel) -> dict[str, torch.Tensor]:
    """The deltas of every tensor that is pruned, keyed by the base's names."""
    from pruning.delta import compute_delta

    deltas = {}
    for fname in f.names():
        w_ft, bname = f.get(fname), ft_to_base.get(fname)
        if bname and w_ft.is_floating_point() and sel.selects(bname, w_ft):
            deltas[bname] = compute_delta(b.get(bname), w_ft, fname)
    return deltas


def _outchange_q(calib, n, base_dir, arch, deltas, p, seed) -> float:
    """One global q for every pruned tensor by ``storage.qsearch.outchange_q``."""
    from storage.qsearch import outchange_q, read_calib_texts

    texts = read_calib_texts(calib.read_text())[:n]
    if not texts:
        raise typer.BadParameter(f"{calib} holds no calibration text")
    with tqdm(desc="q search (output change)", unit="q") as bar:
        q = outchange_q(base_dir, arch, deltas, texts, p, seed=seed, on_step=bar.update)
    console.print(f"q by output change on {len(texts)} calibration texts: {q:g}")
    return q


def _labeled_q(val: Path, finetuned: Path, base_dir, arch, deltas, p, seed) -> Any:
    """One global q for every pruned tensor by ``storage.labeled.labeled_q``."""
    from storage.labeled import labeled_q, read_labeled

    rows = read_labeled(val.read_text(), source=str(val))
    with tqdm(desc="q search (labeled)", unit="q") as bar:
        found = labeled_q(
            finetuned,
            base_dir,
            arch,
            deltas,
            rows,
            p,
            seed=seed,
            source=str(val),
            on_step=bar.update,
        )
    console.print(found.summary())
    return found


@app.command()
def prune(
    base: Annotated[str, typer.Argument(help="Catalog name (minilm-l6, ...) or HF folder.")],
    finetuned: Annotated[Path, typer.Argument(help="Fine-tuned HF folder (safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pruned checkpoint.")],
    method: Annotated[
        str, typer.Option(help="dare, darex_q, magnitude, wanda, structural.")
    ] = "dare",
    rate: Annotated[float, typer.Option(help="Pruning rate p, 0 <= p <= 0.999999.")] = 0.99,
    q: Annotated[
        str | None,
        typer.Option(
            help="FLOAT; labeled (one global q, best metric on the --val examples); or "
            "from --calib texts: outchange (one global q, output change), auto (per-layer "
            "least squares) or analytical (per layer)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random mask.")] = 0,
    calib: Annotated[Path | None, typer.Option(help="Text file (or .jsonl with 'text').")] = None,
    val: Annotated[
        Path | None,
        typer.Option(
            help="Labeled examples for --q labeled: JSON lines with 'text' and "
            "'label' (classification) or 'target' (generation)."
        ),
    ] = None,
    per: Annotated[str, typer.Option(help="WANDA: top-k per 'row' or 'tensor'.")] = "row",
    axis: Annotated[str, typer.Option(help="structural: drop 'row's or 'col's.")] = "row",
    eta: Annotated[float, typer.Option(help="Knob of the analytical q.")] = 0.45,
    include: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Tensors to prune (replaces the defaults): {PATTERN_HELP}. Names are the base's."
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help=f"Tensors to keep exact (added to the defaults): {PATTERN_HELP}."),
    ] = None,
    calib_samples: Annotated[int, typer.Option(min=1, help="Calibration lines used.")] = 64,
    data_dir: Annotated[
        Path, typer.Option(envvar="DAREX_DATA_DIR", help=DATA_DIR_HELP)
    ] = DEFAULT_DATA_DIR,
) -> None:
    """Prune the delta FINETUNED - BASE and write the merged checkpoint to --out."""
    from pruning.delta import compute_delta
    from pruning.errors import PruningError
    from pruning.methods import Method, method_for, prune_tensor
    from pruning.select import make_selector

    writer: SafetensorsWriter | None = None
    created = False  # whether this run made the --out folder
    try:
        p = _check_rate(rate)
        m = Method(method) if method in {x.value for x in Method} else None
        if m is None:
            known = ", ".join(x.value for x in Method)
            raise typer.BadParameter(f"unknown method {method!r}; methods: {known}")
        q_mode = _parse_q(q)
        if per not in ("row", "tensor"):
            raise typer.BadParameter(f"--per must be 'row' or 'tensor', got {per!r}")
        if axis not in ("row", "col"):
            raise typer.BadParameter(f"--axis must be 'row' or 'col', got {axis!r}")
        _check_file(calib, "--calib")
        _check_file(val, "--val")
        _check_patterns(include, exclude)
        if m is Method.darex_q and q_mode is None:
            raise typer.BadParameter(
                "darex_q needs --q FLOAT, labeled, outchange, auto or analytical"
            )
        if m is Method.dare and q_mode is not None:
            raise typer.BadParameter("dare rescales by 1/(1-p); use --method darex_q for a q")
        if q_mode == "labeled" and m is not Method.darex_q:
            raise typer.BadParameter("--q labeled searches DAREx-q's q: use --method darex_q")
        if q_mode in ("outchange", "analytical") and m is not Method.darex_q:
            raise typer.BadParameter(
                f"--q {q_mode} finds q for DAREx-q's random mask, not {method}'s: use "
                f"--method darex_q, or --q auto (least squares on {method}'s own mask)"
            )
        if q_mode == "labeled" and val is None:
            raise typer.BadParameter("--q labeled needs --val FILE (labeled examples)")
        if val is not None and q_mode != "labeled":
            raise typer.BadParameter("--val is read by --q labeled only")
        needs_calib = m is Method.wanda or (isinstance(q_mode, str) and q_mode != "labeled")
        which = f"--method {method}" if q is None else f"--method {method} --q {q}"
        if needs_calib and calib is None:
            raise typer.BadParameter(f"{which} needs --calib FILE")
        # the calibration below runs the fine-tune itself (WANDA's norms, per-layer q)
        calibrates = val is None and calib is not None and q_mode != "outchange"
        if calibrates and not (Path(finetuned) / "config.json").is_file():
            raise typer.BadParameter(
                f"{which} with --calib measures the fine-tune's own layer inputs: give its "
                "folder with config.json, not a bare weights file"
            )
        if not (math.isfinite(eta) and eta > 0):
            raise typer.BadParameter(f"--eta must be a finite number > 0, got {eta}")
        base_dir, arch, b, f, plan = _open_pair(base, finetuned, data_dir)
        _check_out(out, Path(finetuned), Path(base_dir))
        sel = make_selector(arch, include, exclude)
        stats, tables = {}, set()  # calibration statistics, embedding tables
        ft_to_base = {fn: bn for bn, fn in plan.pairs.items()}
        if (include or exclude) and not any(
            f.meta[fn].dtype.is_floating_point and sel.matches(bn) for fn, bn in ft_to_base.items()
        ):
            given = [f"--include {x!r}" for x in include or ()]
            given += [f"--exclude {x!r}" for x in exclude or ()]
            raise typer.BadParameter(
                f"no tensor left to prune with {' '.join(given)} (tensor names are the "
                f"base's, e.g. {next(iter(plan.pairs), '-')!r})"
            )
        found = None
        if val is not None:
            deltas = _pruned_deltas(b, f, ft_to_base, sel)
            found = _labeled_q(val, Path(finetuned), base_dir, arch, deltas, p, seed)
            q_mode = found.q
            del deltas
        elif calib is not None and q_mode == "outchange":
            deltas = _pruned_deltas(b, f, ft_to_base, sel)
            q_mode = _outchange_q(calib, calib_samples, base_dir, arch, deltas, p, seed)
            del deltas
        elif calibrates:
            batches = _calib_batches(calib, [Path(finetuned), base_dir], calib_samples, 128)
            stats, tables = _calibrate(Path(finetuned), batches, 512 if q_mode == "auto" else 0)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        names = f.names()
        metas = [(n, f.meta[n].dtype, f.meta[n].shape) for n in names]
        q_info = f"{q}={q_mode:g}" if q in ("outchange", "labeled") else str(q)
        info = {"method": m.value, "p": str(p), "q": q_info, "seed": str(seed), "format": "pt"}
        writer = SafetensorsWriter(out / "model.safetensors", metas, info)
        report: dict[str, dict] = {}
        kept = total = 0
        layer_qs: dict[str, float | None] = {}  # per-layer q by the weight's name

        def q_of(fname: str, bname: str, d: torch.Tensor) -> float | None:
            """The tensor's q; a linear's bias takes its layer's q (the weight's, computed
            with the bias delta as the analytical q's extra column), as the paper does."""
            if not isinstance(q_mode, str) or q_mode not in ("auto", "analytical"):
                return _layer_q(m, q_mode, d, p, stats.get(fname), bname, seed, per, axis, eta)
            stem, _, kind = fname.rpartition(".")
            weight = f"{stem}.weight"
            if kind == "bias" and weight in stats and weight in ft_to_base:
                fname, bname = weight, ft_to_base[weight]
                d = compute_delta(b.get(bname), f.get(fname), fname)
            if fname not in layer_qs:
                bias, bf = None, f"{stem}.bias"
                if q_mode == "analytical" and fname == weight and bf in ft_to_base:
                    bias = compute_delta(b.get(ft_to_base[bf]), f.get(bf), bf)
                layer_qs[fname] = _layer_q(
                    m, q_mode, d, p, stats.get(fname), bname, seed, per, axis, eta, bias
                )
            return layer_qs[fname]

        # matrices the calibration did not measure (an input that is not an nn.Linear's,
        # such as GPT-2's Conv1D): WANDA prunes them by magnitude, their per-layer q is 1-p
        uses_stats = m is Method.wanda or q_mode in ("auto", "analytical")
        unmeasured: list[str] = []
        for fname in tqdm(names, desc="prune", unit="tensor"):
            w_ft = f.get(fname)
            bname = ft_to_base.get(fname)
            if bname is None or not w_ft.is_floating_point() or not sel.selects(bname, w_ft):
                writer.write(fname, w_ft)
                continue
            w_base = b.get(bname)
            d = compute_delta(w_base, w_ft, fname)
            tq = q_of(fname, bname, d)
            st = stats.get(fname)
            if st is None and uses_stats and d.dim() == 2 and fname not in tables:
                unmeasured.append(fname)
            cn = None if st is None else st.col_norm
            mt = method_for(m, d, cn)  # WANDA without input norms: magnitude
            sd = prune_tensor(
                mt, d, p, name=bname, seed=seed, q=tq, col_norm=cn, per=per, axis=axis
            )
            w = w_base.to(w_ft.dtype).clone().reshape(-1)
            w[sd.indices] = (w_base.reshape(-1)[sd.indices].float() + sd.values.float()).to(w.dtype)
            if not bool(torch.isfinite(w[sd.indices]).all()):
                raise PruningError(
                    f"tensor {fname!r}: base + pruned delta is past the range of {w.dtype} "
                    "(the rescaled delta is too large to be written in the checkpoint's dtype); "
                    "use a smaller --rate or --q"
                )
            writer.write(fname, w.view(w_ft.shape))
            report[bname] = {"nnz": sd.nnz, "numel": sd.numel, "scale": sd.scale}
            kept, total = kept + sd.nnz, total + sd.numel
        writer.close()
        _copy_side_files([base_dir, Path(finetuned)], out)
        summary = {
            "base": base,
            "finetuned": str(finetuned),
            "arch": arch,
            **info,
            "tensors": report,
        }
        if found is not None:  # the metric on the --val examples: at q, DARE, unpruned
            summary["val"] = {
                "metric": found.metric,
                "n": found.n,
                "q": found.score,
                "dare": found.dare,
                "unpruned": found.unpruned,
                "tried": [list(t) for t in found.tried],
            }
        if unmeasured:
            summary["unmeasured"] = unmeasured
        (out / PRUNE_RECORD).write_text(json.dumps(summary, indent=1))
        created = False  # complete: kept whatever happens next
        if unmeasured:
            if m is Method.wanda:
                how = "pruned by magnitude"
            elif m in (Method.darex_q, Method.structural):
                how = "given q = 1-p"
            else:
                how = "left unscaled (no q)"
            typer.echo(
                f"warning: {len(unmeasured)} matrices had no calibration inputs (only "
                f"nn.Linear layers are measured), so they were {how}: "
                f"{', '.join(unmeasured[:3])}{', ...' if len(unmeasured) > 3 else ''} "
                f'(listed under "unmeasured" in {PRUNE_RECORD})',
                err=True,
            )
        console.print(
            f"pruned {len(report)} tensors ({m.value}, p={p}): kept {kept:,} of {total:,} "
            f"entries ({kept / max(total, 1):.2%}); wrote {out}"
        )
    except BaseException as e:  # no partial model.tmp, no folder left by this run
        if writer is not None:
            writer.abort()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, (*_errors(), ValueError)):
            raise _fail(e) from e
        raise
