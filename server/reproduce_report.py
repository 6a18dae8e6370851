"""Tables (markdown) and plots (PNG, matplotlib) from the reproduction's result rows.

Plots: one per (base, task, spec) with the metric against the pruning rate per method
(the unpruned fine-tune and the base as horizontal lines), and one scatter of the q
each DAREx-q choice picked against the best q found by the labeled search.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from server.reproduce import METHODS, RATES, VAL_SCORED, Row, pick_from_reference, read_rows
from server.training import DEFAULT_WARMUP, RESULT_FILE
from storage.bases import atomic_write

RECORDS = "records"  # beside a full report: its rows and fine-tune records, no weights


def _key(r: Row) -> tuple[str, str, str]:
    return (r.base, r.task, r.spec)


def _fmt(r: Row | None) -> str:
    if r is None:
        return "-"
    if len(r.values) > 1:
        return f"{100 * r.mean:.1f} ± {100 * r.std:.1f}"
    return f"{100 * r.mean:.1f}"


def groups(rows: Sequence[Row]) -> dict[tuple[str, str, str], list[Row]]:
    out: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for r in rows:
        out[_key(r)].append(r)
    return dict(sorted(out.items()))


def best_method(cells: dict[tuple[str, float], Row], p: float) -> tuple[str, float] | None:
    scored = [(r.mean, m) for (m, q), r in cells.items() if q == p and m in METHODS]
    if not scored:
        return None
    mean, m = max(scored)
    return m, mean


def finetune_line(rec: dict, eval_s: float, device: str | None = None) -> str:
    """How the fine-tune was made (from its ``darex_finetune.json``) and what it cost
    (on ``device`` when it names one: the rows of a GPU run do)."""
    s = rec.get("settings", {})
    how = "LoRA r={}".format(s.get("rank")) if s.get("lora") else s.get("optimizer", "adam")
    if s.get("reg"):
        how += f" lambda={s['reg']:g}"
    if s.get("train_embeddings") is False and not s.get("lora"):
        how += " (word embeddings frozen)"
    # the warm-up is named where it is not FinetuneOptions' default (the grid's 10 %)
    warmup = s.get("warmup", DEFAULT_WARMUP)
    warm = f" ({100 * warmup:g} % warm-up)" if warmup != DEFAULT_WARMUP else ""
    return (
        f"fine-tune: {how}, lr {s.get('lr', 0):g}, {rec.get('steps')} steps of "
        f"{s.get('batch_size')}{warm} on {rec.get('train_examples')} examples, "
        f"{s.get('max_length')} tokens: {rec.get('seconds', 0):.0f} s; "
        f"evaluations {eval_s:.0f} s" + (f" (on {device})" if device else "")
    )


def table(rows: list[Row], finetune: dict | None = None) -> list[str]:
    """One markdown table: methods as rows, rates as columns (metric x100, mean ± std)."""
    cells = {(r.method, r.p): r for r in rows}
    rates = sorted({r.p for r in rows if r.method in METHODS})
    ref = cells.get(("unpruned", 0.0))
    base = cells.get(("base", 0.0))
    lines = []
    if finetune:
        # the reference pair shares one timing; count it once
        eval_s = sum(r.seconds for r in rows if r.method != "base")
        device = next((r.extra["device"] for r in rows if "device" in r.extra), None)
        lines += [finetune_line(finetune, eval_s, device), ""]
    if ref:
        x = ref.extra
        lines.append(
            f"unpruned {_fmt(ref)}, base {_fmt(base)}; delta rms {x.get('rms', 0):.2e}, "
            f"mean {x.get('mean', 0):+.1e}, spread std/mean(|d|) {x.get('spread', 0):.2f}, "
            f"base rms {x.get('base_rms') or 0:.3f}"
        )
        lines.append("")
    lines.append("| method | " + " | ".join(f"p={p:g}" for p in rates) + " |")
    lines.append("|---|" + "---|" * len(rates))
    for m in METHODS:
        if not any((m, p) in cells for p in rates):
            continue
        lines.append(f"| {m} | " + " | ".join(_fmt(cells.get((m, p))) for p in rates) + " |")
    qline = []
    for m in METHODS:
        if m.startswith("darex_q") and any((m, p) in cells for p in rates):
            qs = [cells.get((m, p)) for p in rates]
            qline.append(
                f"| q {m.partition('/')[2]} | "
                + " | ".join("-" if r is None or r.q is None else f"{r.q:.4g}" for r in qs)
                + " |"
            )
    lines += qline
    sizes = [cells.get(("dare", p)) for p in rates]
    if any(sizes):
        lines.append(
            "| stored KiB (dare, fp16) | "
            + " | ".join("-" if r is None else f"{r.stored_bytes / 1024:.0f}" for r in sizes)
            + " |"
        )
    return lines


# The 51 cells ``pruning.recommend.SMALL_NR`` (0.2) was read from, as (base, task, spec)
# -> rates: a hit rate over them is in-sample; over every other cell (other settings, and
# rates the SmolLM2 settings ran later) it is a held-out check.
THRESHOLD_FIT: dict[tuple[str, str, str], tuple[float, ...]] = {
    **{
        ("minilm-l6", "rt-sentiment", s): RATES
        for s in (
            "adam-small",
            "adam-large",
            "adamr-l2-0.01",
            "adamr-l2-0.1",
            "adamr-l2-1",
            "adamr-l1-0.1",
            "lora",
        )
    },
    **{("minilm-l6", t, "adam-large"): RATES for t in ("rt-subjectivity", "convention-party")},
    **{("smollm2-135m", "arith", s): (0.9, 0.99) for s in ("adam-small", "adam-large")},
    ("smollm2-135m", "rt-sentiment-gen", "adam-large"): (0.9, 0.99),
}


POLICIES = {"labels": True, "texts": False}  # has_labels; calibration texts in both


def compare_pick(cells: dict[tuple[str, float], Row], p: float, labeled_pick: str) -> str | None:
    """What a labeled ingest picks by comparing the candidates on the labeled examples
    (``storage.labeled.labeled_choice``): the best validation metric of VAL_SCORED (the
    searched DAREx-q, magnitude, WANDA), ties to the earlier one. Where the rule names
    magnitude (the fine-tune changed at most 1-p of the entries) that stands. None where
    a candidate did not record its validation metric."""
    if labeled_pick != "darex_q/labeled":
        return labeled_pick
    cands = [cells.get((m, p)) for m in VAL_SCORED]
    if any(r is None or "val" not in r.extra for r in cands):
        return None
    best = max(cands, key=lambda r: r.extra["val"])  # type: ignore[union-attr]
    return best.method  # type: ignore[union-attr]


@dataclass
class PolicyHits:
    """One policy's score: (hits, cells) in the cells the thresholds were read off and in
    the others, and the mean shortfall below the best method (metric, all cells)."""

    fit: tuple[int, int]
    held_out: tuple[int, int]
    shortfall: float

    @property
    def total(self) -> tuple[int, int]:
        return self.fit[0] + self.held_out[0], self.fit[1] + self.held_out[1]


@dataclass
class Hits:
    lines: list[str]
    policies: dict[str, PolicyHits]
    # comparing on the labeled examples vs the labeled policy, on the cells where every
    # candidate recorded its validation metric: (hits, cells, mean shortfall) of each
    compared: tuple[int, int, float] = (0, 0, 0.0)
    labels_there: tuple[int, int, float] = (0, 0, 0.0)


def recommend_hits(rows: Sequence[Row], tol: float = 0.01) -> Hits:
    """Per (setting, p): ``recommend()``'s pick as the code is now (from the unpruned row's
    delta statistics), with labels and with calibration texts only, against the best
    method of the cell; a hit is within ``tol``. Cells whose pick did not run are skipped."""
    lines = [
        "| setting | p | best | with labels | hit | texts only | hit | held out "
        "| compared on labels | hit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    counts = {(k, held): [0, 0] for k in POLICIES for held in (False, True)}
    short = dict.fromkeys(POLICIES, 0.0)
    paired = {"compare": [0, 0, 0.0], "labels": [0, 0, 0.0]}
    for key, rs in groups(rows).items():
        cells = {(r.method, r.p): r for r in rs}
        ref = cells.get(("unpruned", 0.0))
        for r in rs:
            best = best_method(cells, r.p) if r.method == "recommend" else None
            if best is None:
                continue
            held = r.p not in THRESHOLD_FIT.get(key, ())
            got = {}
            for name, labels in POLICIES.items():
                pick = ref and pick_from_reference(ref, key[2], r.p, labels)
                got[name] = (pick, cells.get((pick, r.p)))
            if any(row is None for _, row in got.values()):
                continue
            row = f"| {'/'.join(key[1:])} | {r.p:g} | {best[0]} {100 * best[1]:.1f} |"
            for name, (pick, cell) in got.items():
                hit = cell.mean >= best[1] - tol
                counts[(name, held)][0] += hit
                counts[(name, held)][1] += 1
                short[name] += best[1] - cell.mean
                row += f" {pick} {100 * cell.mean:.1f} | {'yes' if hit else 'no'} |"
            row += f" {'yes' if held else ''} |"
            lab_pick, lab_cell = got["labels"]
            cmp = compare_pick(cells, r.p, lab_pick)  # type: ignore[arg-type]
            if cmp is None:
                lines.append(row + " - | |")
                continue
            cmp_cell = cells[(cmp, r.p)]
            for name, cell in (("compare", cmp_cell), ("labels", lab_cell)):
                paired[name][0] += cell.mean >= best[1] - tol
                paired[name][1] += 1
                paired[name][2] += best[1] - cell.mean
            hit = cmp_cell.mean >= best[1] - tol
            lines.append(row + f" {cmp} {100 * cmp_cell.mean:.1f} | {'yes' if hit else 'no'} |")
    policies = {}
    for name in POLICIES:
        fit, held = tuple(counts[(name, False)]), tuple(counts[(name, True)])
        n = fit[1] + held[1]
        policies[name] = PolicyHits(fit, held, 100 * short[name] / n if n else 0.0)  # type: ignore[arg-type]
    compared, labels_there = (
        (int(h), int(n), 100 * sh / n if n else 0.0)
        for h, n, sh in (paired["compare"], paired["labels"])
    )
    return Hits(lines, policies, compared, labels_there)


def merge_records(records: Path, work: Path) -> list[Row]:
    """Keep a report's data beside it, so the report can be rebuilt from the repository:
    ``records`` takes the rows of ``work`` (``results.jsonl``) and its fine-tunes' records
    (``<base>/<task>/<spec>/darex_finetune.json``; the weights stay in ``work``).

    A setting that ``work`` holds and ``records`` holds from the same fine-tune (equal
    records) is merged cell by cell, ``work``'s cells winning; from another fine-tune it
    replaces the records' setting whole, so no table mixes two fine-tunes. Settings only in
    ``records`` stay as they are. Each file is replaced atomically. Returns the rows."""
    if records.resolve() == work.resolve():
        return read_rows(work)
    new = read_rows(work)
    old = read_rows(records)
    replaced = set()
    for key in {(r.base, r.task, r.spec) for r in new}:
        src, dst = (d.joinpath(*key, RESULT_FILE) for d in (work, records))
        rec = src.read_text() if src.is_file() else None
        if rec is None or not dst.is_file() or dst.read_text() != rec:
            replaced.add(key)
        if rec is not None:
            dst.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dst, rec)
        else:
            dst.unlink(missing_ok=True)
    cells = {
        (r.base, r.task, r.spec, r.method, r.p): r
        for r in old
        if (r.base, r.task, r.spec) not in replaced
    }
    cells.update({(r.base, r.task, r.spec, r.method, r.p): r for r in new})
    rows = list(cells.values())
    records.mkdir(parents=True, exist_ok=True)
    atomic_write(
        records / "results.jsonl",
        "".join(json.dumps(asdict(r)) + "\n" for r in sorted(rows, key=_cell_order)),
    )
    return rows


def _cell_order(r: Row) -> tuple:
    return (r.base, r.task, r.spec, r.method, r.p)


def plot_rates(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {(r.method, r.p): r for r in rows}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in METHODS:
        ps = sorted(p for (mm, p) in cells if mm == m)
        if not ps:
            continue
        ys = [100 * cells[(m, p)].mean for p in ps]
        es = [100 * cells[(m, p)].std for p in ps]
        ax.errorbar(ps, ys, yerr=es, marker="o", capsize=3, label=m)
    for m, style in (("unpruned", "--"), ("base", ":")):
        if (m, 0.0) in cells:
            ax.axhline(100 * cells[(m, 0.0)].mean, color="gray", linestyle=style, label=m)
    ax.set_xscale("logit")
    ax.set_xlabel("pruning rate p")
    ax.set_ylabel("test metric (x100)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_q(rows: Sequence[Row], path: Path) -> bool:
    """q picked by each choice vs the labeled search's q (the best on validation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(_key(r), r.method, r.p): r for r in rows}
    pts: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (k, m, p), r in by.items():
        best = by.get((k, "darex_q/labeled", p))
        if m.startswith("darex_q") and m != "darex_q/labeled" and best and r.q and best.q:
            pts[m].append((best.q, r.q))
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(5, 5))
    for m, xy in pts.items():
        ax.scatter([x for x, _ in xy], [y for _, y in xy], label=m)
    lim = [min(min(x, y) for xy in pts.values() for x, y in xy), 1.0]
    ax.plot(lim, lim, color="gray", linestyle="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("best q (labeled search on validation)")
    ax.set_ylabel("q chosen")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(rows: Sequence[Row], out: Path, prefix: str = "reproduce") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for (base, task, spec), rs in groups(rows).items():
        path = out / f"{prefix}-{base}-{task}-{spec}.png"
        plot_rates(rs, path, f"{base} / {task} / {spec}")
        paths.append(path)
    qpath = out / f"{prefix}-q.png"
    if plot_q(rows, qpath):
        paths.append(qpath)
    return paths


def tables_markdown(
    rows: Sequence[Row], plots_rel: str = "", work: Path | None = None
) -> list[str]:
    """Every setting's table (with its fine-tune's record when ``work`` holds it), then
    recommend()'s hit rate."""
    lines: list[str] = []
    for (base, task, spec), rs in groups(rows).items():
        rec_file = work / base / task / spec / RESULT_FILE if work else None
        rec = json.loads(rec_file.read_text()) if rec_file and rec_file.is_file() else None
        lines += [f"### {base} / {task} / {spec}", ""]
        lines += table(rs, rec)
        if plots_rel:
            lines += ["", f"![{task} {spec}]({plots_rel}reproduce-{base}-{task}-{spec}.png)"]
        lines.append("")
    hits = recommend_hits(rows)
    if hits.policies["labels"].total[1]:
        lines += ["### recommend() hit rate (within 1 point of the best method of the cell)", ""]
        for name, what in (
            ("labels", "With labels, the method `recommend()` names (DAREx-q, q searched on them)"),
            ("texts", "With calibration texts only (the rule on delta statistics)"),
        ):
            h = hits.policies[name]
            lines.append(
                f"- {what}: {h.total[0]}/{h.total[1]}; held out {h.held_out[0]}/"
                f"{h.held_out[1]}, in-sample {h.fit[0]}/{h.fit[1]}; "
                f"{h.shortfall:.1f} points below the best on average."
            )
        if hits.compared[1]:
            (ch, n, cs), (lh, _, ls) = hits.compared, hits.labels_there
            lines.append(
                f"- With labels, as ingest stores it (that DAREx-q compared with magnitude and "
                f"WANDA on the same examples, ties to DAREx-q): {ch}/{n}, {cs:.1f} points "
                f"below the best on average; the q search alone on the same {n} cells: "
                f"{lh}/{n}, {ls:.1f}."
            )
        lines += [
            "",
            "In-sample: the cells the small-delta threshold was read from. Held out: the "
            "cells run after it was set.",
            "",
            *hits.lines,
            "",
        ]
    return lines
