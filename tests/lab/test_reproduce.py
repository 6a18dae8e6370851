"""The reproduction bench on the tiny BERT: exact weights, cached parts, report; and the
real quick reproduction (slow), which asserts the paper's headline."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import server.cli.lab  # noqa: F401  (registers the commands)
from server import reproduce as rp
from server import reproduce_report as rr
from server import training
from server.cli import app
from server.reproduce_lab import by_length, open_lab
from server.training import RESULT_FILE, changed_settings, stale_reason
from storage.bases import resolve_base
from storage.tasks import load_task

TINY = {"lr": 1e-3, "max_steps": 4, "max_train": 64}
BUDGET = rp.Budget(test=24, val=16, calib=8, max_length=32, seeds=(0, 1))


@pytest.fixture(scope="module")
def work(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    w = tmp_path_factory.mktemp("work")
    base = resolve_base(tiny_bert_dir, w)
    task = load_task("rt-sentiment")
    rows = rp.run_part(w, base, task, "tiny", TINY, BUDGET, (0.9,), ("dare", "darex_q/labeled"))
    return w, base, task, rows


def test_lab_apply_is_base_plus_scaled_sparse_delta_and_restores_exactly(work) -> None:
    w, base, task, _ = work
    lab = open_lab(base, w / rp.slug(base.name) / task.name / "tiny", task)
    name = lab.pruned_names[3]
    before = {n: p.detach().clone() for n, p in lab.params.items()}
    masks = lab.dare_masks(0.9, seed=0)
    lab.apply(masks, factor=0.5)
    want = lab.base_w[name].clone().view(-1)
    want.index_add_(0, masks[name].indices, 0.5 * masks[name].values.float())
    assert torch.equal(lab.params[name].detach().view(-1), want)
    lab.restore()
    assert all(torch.equal(p, before[n]) for n, p in lab.params.items())
    # p = 0 keeps every entry with scale 1: the fine-tune itself, same predictions
    exs = by_length(task.test[:24])
    assert lab.metric_with(lab.dare_masks(0.0, seed=0), exs) == lab.metric(exs)


def test_run_part_rows_are_cached_and_reported(work, tmp_path: Path) -> None:
    w, base, task, rows = work
    cells = {(r.method, r.p): r for r in rows}
    assert {("unpruned", 0.0), ("base", 0.0), ("dare", 0.9), ("darex_q/labeled", 0.9)} <= set(cells)
    dx = cells[("darex_q/labeled", 0.9)]
    assert len(dx.values) == 2 and 0.1 - 1e-9 <= dx.q <= 1.0  # q searched in [1-p, 10(1-p)]
    assert cells[("dare", 0.9)].q == pytest.approx(0.1)
    assert cells[("dare", 0.9)].stored_bytes > 0
    ft = w / rp.slug(base.name) / task.name / "tiny" / RESULT_FILE
    stamp = ft.stat().st_mtime
    rp.run_part(w, base, task, "tiny", TINY, BUDGET, (0.99,), ("dare",))
    assert ft.stat().st_mtime == stamp  # the cached fine-tune was reused
    got = {(r.method, r.p) for r in rp.read_rows(w)}
    assert ("dare", 0.99) in got and ("darex_q/labeled", 0.9) in got
    pngs = rr.write_plots(rp.read_rows(w), tmp_path)
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    md = "\n".join(rr.tables_markdown(rp.read_rows(w)))
    assert "| darex_q/labeled |" in md and "| q labeled | 0.1 |" in md


@pytest.mark.slow
@pytest.mark.repro
def test_quick_reproduction_asserts_the_headline(tmp_path: Path) -> None:
    """MiniLM-L6 on rt-sentiment, large-delta fine-tune: at p = 0.99 DAREx-q beats DARE by
    >= 10 points and stays within 5 points of the unpruned fine-tune (else exit code 1)."""
    t0 = time.perf_counter()
    res = CliRunner().invoke(
        app, ["reproduce", "--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]
    )
    print(*(line for line in res.output.splitlines() if "DAREx-q - DARE" in line))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "headline reproduced" in res.output
    assert (tmp_path / "reproduce-quick.md").is_file()
    print(f"quick reproduction: {time.perf_counter() - t0:.0f} s")


@pytest.mark.parametrize(
    ("arch", "spec", "opts"),
    [
        ("encoder", "adamr", {**TINY, "optimizer": "adamr-l2", "reg": 0.1}),
        ("encoder", "lora", {"lora": True, "rank": 4, "lr": 1e-3, "max_steps": 4, "max_train": 64}),
        ("decoder", "adam", {**TINY, "max_train": 32}),
    ],
)
def test_every_method_gives_a_row(
    arch: str, spec: str, opts: dict, tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Each method of the full grid runs on each kind of fine-tune: a metric per mask seed,
    a q in DAREx-q's range, stored bytes, and a recommendation naming a method of the grid."""
    folder, task = (
        (tiny_bert_dir, "rt-sentiment") if arch == "encoder" else (tiny_llama_dir, "arith")
    )
    base = resolve_base(folder, tmp_path)
    budget = rp.Budget(test=8, val=8, calib=4, max_length=32, seeds=(0, 1))
    rows = rp.run_part(tmp_path / "w", base, load_task(task), spec, opts, budget, (0.9,))
    cells = {r.method: r for r in rows if r.p == 0.9}
    assert set(rp.METHODS) | {"recommend"} == set(cells)
    for m in rp.METHODS:
        r = cells[m]
        assert all(0.0 <= v <= 1.0 for v in r.values) and r.stored_bytes > 0, r
        assert len(r.values) == (2 if m in rp.SEEDED else 1), r
        if m.startswith("darex_q"):
            assert 0.1 - 1e-9 <= r.q <= 1.0, r
    assert cells["recommend"].extra["pick"] in rp.METHODS
    # the report scores the rule from the unpruned row's statistics: the same pick
    ref = next(r for r in rows if r.method == "unpruned")
    assert rp.pick_from_reference(ref, spec, 0.9) == cells["recommend"].extra["pick"]
    lab = open_lab(base, tmp_path / "w" / rp.slug(base.name) / task / spec, load_task(task))
    for p in (0.5, 0.99, 0.999):
        assert rp.pick_from_reference(ref, spec, p) == rp._pick(lab.stats(), spec, p)[0]
    # the candidates a labeled ingest compares record their validation metric; rows that
    # ran without it get the same value from the backfill
    val = {m: cells[m].extra["val"] for m in rp.VAL_SCORED}
    assert all(0.0 <= v <= 1.0 for v in val.values()) and "val" not in cells["dare"].extra
    results = tmp_path / "w" / "results.jsonl"
    lines = [json.loads(ln) for ln in results.read_text().splitlines()]
    for ln in lines:
        ln["extra"].pop("val", None)
    results.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    done = rp.backfill_val(tmp_path / "w", base, load_task(task), spec, budget)
    assert {r.method: r.extra["val"] for r in done} == val
    assert rp.backfill_val(tmp_path / "w", base, load_task(task), spec, budget) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_the_grid_on_cuda_draws_the_cpu_masks_and_agrees_with_the_cpu(
    arch: str, tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """``device="cuda"``: the fine-tune and the evaluations run on the GPU, the masks are
    the CPU's (the stored ones), the evaluated weights are the CPU's bit for bit, and each
    method's metric is the CPU's (one example of slack per seed for float noise; the
    searched q's can land elsewhere on a tie, so those are only range-checked)."""
    encoder = arch == "encoder"
    folder, name = (tiny_bert_dir, "rt-sentiment") if encoder else (tiny_llama_dir, "arith")
    base, task = resolve_base(folder, tmp_path), load_task(name)
    budget = rp.Budget(test=16, val=8, calib=4, max_length=32, seeds=(0, 1))
    opts = {**TINY, "max_train": 32}
    rows = rp.run_part(tmp_path / "w", base, task, "adam", opts, budget, (0.9,), device="cuda")
    gpu = {r.method: r for r in rows if r.p == 0.9}
    assert {r.extra.get("device") for r in rows} == {torch.cuda.get_device_name(0)}
    ft = tmp_path / "w" / rp.slug(base.name) / name / "adam"
    assert json.loads((ft / RESULT_FILE).read_text())["settings"]["device"].startswith("cuda")
    cpu = rp.open_setting(base, ft, task, "adam", budget, "cpu")
    for m in rp.METHODS:
        want, got = rp.run_method(cpu, m, 0.9), gpu[m]
        assert "device" not in want.extra and got.stored_bytes == want.stored_bytes, m
        if m in ("darex_q/labeled", "darex_q/outchange"):
            assert 0.1 - 1e-9 <= got.q <= 1.0, got
        else:
            assert (got.q is None) == (want.q is None), m
            if want.q is not None:
                assert got.q == pytest.approx(want.q, rel=1e-4), m
            pairs = zip(got.values, want.values, strict=True)
            assert all(abs(a - b) <= 1 / 16 + 1e-9 for a, b in pairs), m
    on_gpu = open_lab(base, ft, task, device="cuda")
    masks = on_gpu.dare_masks(0.9, seed=0)
    on_gpu.apply(masks, factor=0.5)
    cpu.lab.apply(masks, factor=0.5)
    for n in cpu.lab.pruned_names:
        assert torch.equal(on_gpu.params[n].detach().cpu(), cpu.lab.params[n].detach()), n


def test_a_tokenizer_without_a_pad_token_pads_with_eos(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A conversion can leave a tokenizer without a pad token (transformers 5.17's GGUF
    reader does for SmolLM2): the grid's calibration batches pad with EOS, not fail."""
    from transformers import AutoTokenizer

    base, task = resolve_base(tiny_llama_dir, tmp_path), load_task("arith")
    opts = {**TINY, "max_train": 32}
    ft, _ = rp.ensure_finetune(tmp_path / "w", base, task, "adam", opts, max_length=32)
    tok = AutoTokenizer.from_pretrained(ft)
    tok.pad_token, tok.eos_token = None, "[SEP]"
    tok.save_pretrained(ft)
    assert AutoTokenizer.from_pretrained(ft).pad_token is None
    budget = rp.Budget(test=4, val=4, calib=4, max_length=32, seeds=(0,))
    st = rp.open_setting(base, ft, task, "adam", budget, "cpu")
    assert st.lab.tokenizer.pad_token == "[SEP]"
    for m in ("wanda", "darex_q/outchange"):
        row = rp.run_method(st, m, 0.9)
        assert len(row.values) == 1 and row.stored_bytes > 0, row


def test_grid_budgets_are_the_ones_the_report_ran_and_options_override_them() -> None:
    b = rp.grid_budget("minilm-l6", "convention-party")
    assert (b.test, b.val, b.max_length) == (500, 200, 64)
    assert rp.grid_budget("smollm2-135m", "arith").test == 200
    b = rp.grid_budget("minilm-l6", "rt-sentiment", test=100, max_length=16)
    assert (b.test, b.val, b.max_length) == (100, 200, 16)
    assert rp.grid_budget("some-base", "rt-sentiment") == rp.Budget()
    every = {(base, t) for base, tasks in rp.TASKS.items() for t in tasks}
    assert every == set(rp.GRID_BUDGETS)


def test_parts_run_side_by_side_and_a_failing_part_does_not_stop_the_others(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """``--jobs 2``: two worker processes, every row of both good parts lands whole in
    results.jsonl, and a part that fails is returned as its error without rows."""
    base = resolve_base(tiny_bert_dir, tmp_path)
    budget = rp.Budget(test=8, val=8, calib=4, max_length=32, seeds=(0,))
    bad_opts = {**TINY, "lora": True, "optimizer": "adamr-l2"}  # refused before training
    parts = [
        rp.Part("rt-sentiment", "a", TINY, budget),
        rp.Part("rt-subjectivity", "b", TINY, budget),
        rp.Part("rt-sentiment", "bad", bad_opts, budget),
    ]
    seen: list[str] = []
    res = rp.run_parts(
        tmp_path / "w",
        base,
        parts,
        (0.9,),
        ("dare", "magnitude"),
        jobs=2,
        on_done=lambda part, _: seen.append(part.spec),
    )
    assert sorted(seen) == ["a", "b", "bad"]
    assert isinstance(res[parts[2]], Exception) and "AdamR" in str(res[parts[2]])
    rows = [json.loads(line) for line in (tmp_path / "w" / "results.jsonl").open()]
    cells = {(r["task"], r["spec"], r["method"], r["p"]) for r in rows}
    for task, spec in (("rt-sentiment", "a"), ("rt-subjectivity", "b")):
        want = {("unpruned", 0.0), ("base", 0.0), ("dare", 0.9), ("magnitude", 0.9)}
        assert {(task, spec, m, p) for m, p in want} <= cells
        assert res[parts[0 if spec == "a" else 1]][-1].method == "recommend"
    assert not any(r["spec"] == "bad" for r in rows)


@pytest.mark.parametrize(
    ("args", "hint", "says"),
    [
        (["--part", "adam-huge"], "--part", "adam-large"),
        (["--methods", "dare,random"], "--methods", "darex_q/labeled"),
        (["--only", "imdb"], "--only", "rt-subjectivity"),
        (["--device", "gpu"], "--device", "use auto, cpu or cuda"),
        pytest.param(
            ["--device", "cuda"],
            "--device",
            "no CUDA device here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here"),
        ),
    ],
)
def test_reproduce_refuses_unknown_names_before_any_work(
    args: list[str], hint: str, says: str, tmp_path: Path
) -> None:
    res = CliRunner().invoke(app, ["reproduce", "--work", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert hint in res.output and says in res.output
    assert not (tmp_path / "full").exists()


def test_outchange_q_is_scored_on_the_masks_the_grid_evaluates(work, monkeypatch) -> None:
    """The unlabeled q search draws each mask by the checkpoint's tensor name, so the mask
    it scores is the one ``Lab.dare_masks`` applies for the same seed."""
    from pruning.methods import darex_q

    w, base, task, _ = work
    st = rp.open_setting(base, w / rp.slug(base.name) / task.name / "tiny", task, "tiny", BUDGET)
    seen: dict = {}
    real = rp.output_change_score

    def spy(model, deltas, p, batches, **kw):
        seen.update(deltas=deltas, names=kw["mask_names"])
        return real(model, deltas, p, batches, **kw)

    monkeypatch.setattr(rp, "output_change_score", spy)
    q = rp._outchange_q(st, 0.9, seed=1)
    assert 0.1 - 1e-9 <= q <= 1.0
    masks = st.lab.dare_masks(0.9, seed=1)
    assert len(seen["deltas"]) == len(st.lab.pruned_names)
    for n in st.lab.pruned_names:
        short = next(k for k, d in seen["deltas"].items() if torch.equal(d, st.lab.delta(n)))
        drawn = darex_q(st.lab.delta(n), 0.9, q, seed=1, name=seen["names"][short])
        assert torch.equal(drawn.indices, masks[n].indices), n


def test_a_searched_q_of_1_minus_p_reuses_dares_evaluations_and_gets_its_values(
    work, monkeypatch
) -> None:
    """DAREx-q with q = 1-p applies DARE's weights bit for bit: its test metrics are DARE's,
    looked up rather than evaluated again; any other q is evaluated."""
    from pruning.q import QSearch

    w, base, task, _ = work
    st = rp.open_setting(base, w / rp.slug(base.name) / task.name / "tiny", task, "tiny", BUDGET)
    calls: list[float] = []
    real = st.lab.metric_with

    def counted(pruned, exs, factor=1.0):
        if exs is st.test:
            calls.append(factor)
        return real(pruned, exs, factor)

    monkeypatch.setattr(st.lab, "metric_with", counted)
    dare = rp.run_method(st, "dare", 0.9)
    assert calls == [1.0, 1.0]  # one test evaluation per seed
    q = 1.0 - 0.9
    monkeypatch.setattr(rp, "search_q_global", lambda *a, **k: QSearch(q, 0.5, ((q, 0.5),)))
    calls.clear()
    dx = rp.run_method(st, "darex_q/labeled", 0.9)
    assert calls == [] and dx.values == dare.values and dx.q == q
    fresh = [real(st.lab.dare_masks(0.9, s), st.test, (1.0 - 0.9) / q) for s in BUDGET.seeds]
    assert fresh == dare.values
    monkeypatch.setattr(rp, "search_q_global", lambda *a, **k: QSearch(0.3, 0.5, ((0.3, 0.5),)))
    rp.run_method(st, "darex_q/labeled", 0.9)
    assert calls == [pytest.approx(1 / 3)] * 2  # another q: evaluated, per seed


def test_recommend_hit_rate_counts_only_the_fitted_cells_in_sample() -> None:
    """The SmolLM2/arith adam-large cells at 0.9 and 0.99 set the threshold; the same
    setting at a rate run later (0.5) is a held-out cell, and so is any other setting.
    Both policies are scored from the unpruned row's statistics: with labels the labeled
    search, with texts only the rule (a small delta here: DARE)."""

    def cells(p: float, dare: float, mag: float, lab: float) -> list[rp.Row]:
        def mk(m: str, mean: float) -> rp.Row:
            return rp.Row("smollm2-135m", "arith", "adam-large", m, p, mean, 0.0, [0], [mean])

        return [
            mk("dare", dare),
            mk("magnitude", mag),
            mk("darex_q/labeled", lab),
            mk("recommend", float("nan")),
        ]

    ref = rp.Row("smollm2-135m", "arith", "adam-large", "unpruned", 0.0, 0.9, 0.0, [], [0.9])
    ref.extra = {"rms": 1e-4, "spread": 0.76, "base_rms": 0.05}  # noise ratio 0.02 at 0.99
    rows = [ref, *cells(0.9, 0.8, 0.5, 0.795), *cells(0.5, 0.8, 0.85, 0.82)]
    hits = rr.recommend_hits(rows)
    texts, labels = hits.policies["texts"], hits.policies["labels"]
    assert texts.fit == (1, 1)  # p = 0.9: dare picked and best
    assert texts.held_out == (0, 1)  # p = 0.5: magnitude beat the pick by 5 points
    assert labels.fit == (1, 1) and labels.held_out == (0, 1)  # 0.5 below, then 3 below
    assert labels.shortfall == pytest.approx((0.5 + 3.0) / 2)
    assert texts.shortfall == pytest.approx((0.0 + 5.0) / 2)
    assert any(
        "| arith/adam-large | 0.5 | magnitude 85.0 | darex_q/labeled 82.0 | no |" in ln
        for ln in hits.lines
    )


def test_comparing_on_validation_picks_the_best_validation_metric() -> None:
    """The report's third policy: the searched DAREx-q, magnitude and WANDA compared on
    their recorded validation metric (ties to DAREx-q), scored against the labeled policy
    on the same cells; a cell lacking a validation metric is left out of both."""

    def mk(p: float, m: str, mean: float, val: float | None = None) -> rp.Row:
        extra = {} if val is None else {"val": val}
        return rp.Row("minilm-l6", "rt-sentiment", "x", m, p, mean, 0.0, [0], [mean], extra=extra)

    ref = mk(0.0, "unpruned", 0.9)
    ref.extra = {"rms": 3e-3, "spread": 1.0, "base_rms": 0.05}
    rows = [ref]
    for p, lab, mag, wanda in (
        (0.9, (0.795, 0.7), (0.5, 0.6), (0.6, 0.7)),  # tie on validation: DAREx-q
        (0.5, (0.82, 0.8), (0.85, 0.9), (0.7, 0.85)),  # magnitude best on both
    ):
        rows += [
            mk(p, "dare", 0.8),
            mk(p, "darex_q/labeled", *lab),
            mk(p, "magnitude", *mag),
            mk(p, "wanda", *wanda),
            mk(p, "recommend", float("nan")),
        ]
    rows += [mk(0.99, "dare", 0.6), mk(0.99, "darex_q/labeled", 0.7), mk(0.99, "magnitude", 0.5)]
    rows += [mk(0.99, "wanda", 0.4, 0.3), mk(0.99, "darex_q/outchange", 0.65)]
    rows.append(mk(0.99, "recommend", float("nan")))
    hits = rr.recommend_hits(rows)
    assert hits.compared == (2, 2, pytest.approx((0.5 + 0.0) / 2))
    assert hits.labels_there == (1, 2, pytest.approx((0.5 + 3.0) / 2))
    assert hits.policies["labels"].total == (2, 3)  # the 0.99 cell counts there
    assert any(
        "| rt-sentiment/x | 0.5 |" in ln and "| magnitude 85.0 | yes |" in ln for ln in hits.lines
    )
    assert any("| rt-sentiment/x | 0.99 |" in ln and ln.endswith(" - | |") for ln in hits.lines)
    md = "\n".join(rr.tables_markdown(rows))
    assert "compared with magnitude and WANDA on the same examples" in md and ": 2/2," in md


def test_the_report_names_the_device_a_setting_ran_on() -> None:
    """Rows of a GPU run carry the device; the setting's line says where its seconds went."""
    rec = {
        "settings": {"optimizer": "adam", "lr": 1e-3, "batch_size": 16, "max_length": 64},
        "steps": 150,
        "train_examples": 1200,
        "seconds": 112,
    }

    def rows(device: str | None) -> list[rp.Row]:
        extra = {"device": device} if device else {}
        return [
            rp.Row("b", "t", "s", m, p, 0.5, 0.0, [0], [0.5], seconds=10, extra=dict(extra))
            for m, p in (("unpruned", 0.0), ("dare", 0.9))
        ]

    on_gpu, on_cpu = rr.table(rows("NVIDIA H200"), rec)[0], rr.table(rows(None), rec)[0]
    assert on_gpu.endswith(": 112 s; evaluations 20 s (on NVIDIA H200)"), on_gpu
    assert on_cpu.endswith(": 112 s; evaluations 20 s"), on_cpu


def _setting(w: Path, spec: str, rec: dict, cells: dict[tuple[str, float], float]) -> None:
    """A setting in work folder ``w``: its fine-tune record and one row per cell."""
    d = w / "b" / "t" / spec
    d.mkdir(parents=True, exist_ok=True)
    (d / RESULT_FILE).write_text(json.dumps(rec))
    rp.append_rows(
        w, [rp.Row("b", "t", spec, m, p, v, 0.0, [0], [v]) for (m, p), v in cells.items()]
    )


def test_records_kept_beside_the_report_merge_runs_and_never_mix_two_fine_tunes(
    tmp_path: Path,
) -> None:
    """``OUT/records`` keeps every run's rows and fine-tune records: the same fine-tune's
    cells merge (the newer wins), another fine-tune replaces its setting whole, other
    settings stay, and the report is rebuilt from the records alone."""
    one, two, records = tmp_path / "one", tmp_path / "two", tmp_path / "out" / rr.RECORDS
    _setting(one, "x", {"seconds": 1}, {("unpruned", 0.0): 0.8, ("dare", 0.9): 0.7})
    _setting(one, "y", {"seconds": 2}, {("unpruned", 0.0): 0.6, ("dare", 0.9): 0.5})
    rr.merge_records(records, one)
    # a second run: x again from its fine-tune (one cell redone, one added), y retrained
    _setting(two, "x", {"seconds": 1}, {("dare", 0.9): 0.75, ("dare", 0.99): 0.4})
    _setting(two, "y", {"seconds": 3}, {("dare", 0.99): 0.3})
    rows = rr.merge_records(records, two)
    got = {(r.spec, r.method, r.p): r.mean for r in rows}
    assert got == {
        ("x", "unpruned", 0.0): 0.8,
        ("x", "dare", 0.9): 0.75,
        ("x", "dare", 0.99): 0.4,
        ("y", "dare", 0.99): 0.3,  # y's cells of the earlier fine-tune are gone
    }
    assert json.loads((records / "b" / "t" / "y" / RESULT_FILE).read_text()) == {"seconds": 3}
    assert {f.name for f in records.rglob("*") if f.is_file()} == {"results.jsonl", RESULT_FILE}
    assert {(r.spec, r.method, r.p): r.mean for r in rp.read_rows(records)} == got
    # the CLI: a report from the records alone (an empty work folder adds nothing)
    res = CliRunner().invoke(
        app,
        [
            "reproduce",
            "--report-only",
            "--work",
            str(tmp_path / "none"),
            "--out",
            str(records.parent),
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    md = (records.parent / "reproduce-full.md").read_text()
    assert "### b / t / x" in md and "| dare | 75.0 | 40.0 |" in md
    assert {(r.spec, r.method, r.p): r.mean for r in rp.read_rows(records)} == got


@pytest.mark.parametrize("per_mask", [False, True])
def test_labeled_q_is_searched_per_mask_when_the_budget_asks(work, monkeypatch, per_mask) -> None:
    """``q_per_mask`` searches the labeled q with each seed's own mask (as a labeled ingest
    does for the mask it stores) and evaluates each seed at its own q; otherwise the first
    seed's q serves every seed."""
    from pruning.q import QSearch

    st = _tiny_setting(work, per_mask)
    budget = st.budget
    searched: list[int] = []  # the seed of the mask each search scores
    by_seed = {0: 0.2, 1: 0.5}
    real_scorer = st.lab.q_scorer

    def scorer(masks, p, exs):
        searched.append(next(s for s in budget.seeds if _same(masks, st.lab.dare_masks(p, s))))
        return real_scorer(masks, p, exs)

    def fake_search(score_fn, p, **kw):
        q = by_seed[searched[-1]]
        return QSearch(q, 0.5 + searched[-1], ((q, 0.5 + searched[-1]),))

    monkeypatch.setattr(st.lab, "q_scorer", scorer)
    monkeypatch.setattr(rp, "search_q_global", fake_search)
    row = rp.run_method(st, "darex_q/labeled", 0.9)
    want = [by_seed[s] for s in budget.seeds] if per_mask else [0.2, 0.2]
    assert searched == (list(budget.seeds) if per_mask else [0])
    assert row.extra["qs"] == want and row.extra["val"] == 0.5  # the first seed's score
    assert row.values == _dare_metrics_at(st, 0.9, want)


@pytest.mark.parametrize("per_mask", [False, True])
def test_output_change_q_is_searched_per_mask_when_the_budget_asks(
    work, monkeypatch, per_mask
) -> None:
    """The unlabeled global q follows ``q_per_mask`` as the labeled one does."""
    st = _tiny_setting(work, per_mask)
    budget = st.budget
    searched: list[int] = []
    by_seed = {0: 0.2, 1: 0.5}

    def fake_outchange(st, p, seed):
        searched.append(seed)
        return by_seed[seed]

    monkeypatch.setattr(rp, "_outchange_q", fake_outchange)
    row = rp.run_method(st, "darex_q/outchange", 0.9)
    want = [by_seed[s] for s in budget.seeds] if per_mask else [0.2, 0.2]
    assert searched == (list(budget.seeds) if per_mask else [0])
    assert row.extra["qs"] == want
    assert row.values == _dare_metrics_at(st, 0.9, want)


def _tiny_setting(work, per_mask: bool) -> rp.Setting:
    """The module's tiny fine-tune opened with BUDGET, ``q_per_mask`` as given."""
    w, base, task, _ = work
    budget = rp.Budget(**{**vars(BUDGET), "q_per_mask": per_mask})
    return rp.open_setting(base, w / rp.slug(base.name) / task.name / "tiny", task, "tiny", budget)


def _dare_metrics_at(st: rp.Setting, p: float, qs: list[float]) -> list[float]:
    """Test metric of each seed's DARE mask rescaled to its q, evaluated afresh."""
    return [
        st.lab.metric_with(st.lab.dare_masks(p, s), st.test, (1.0 - p) / q)
        for s, q in zip(st.budget.seeds, qs, strict=True)
    ]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n].indices, b[n].indices) for n in a)


def test_finetune_line_says_when_the_word_embeddings_were_frozen_and_the_warm_up() -> None:
    rec = {"settings": {"lr": 3e-4, "batch_size": 16, "max_length": 32}, "steps": 450}
    rec |= {"train_examples": 4000, "seconds": 300.0}
    assert "frozen" not in rr.finetune_line(rec, 60.0)  # None: the base kind's default
    rec["settings"]["train_embeddings"] = False
    line = rr.finetune_line(rec, 60.0)
    assert line.startswith("fine-tune: adam (word embeddings frozen), lr 0.0003, 450 steps")
    assert "warm-up" not in line  # the default, as every setting of the grid ran
    rec["settings"]["warmup"] = 0.3
    assert "450 steps of 16 (30 % warm-up) on 4000 examples" in rr.finetune_line(rec, 60.0)


def test_a_rerun_keeps_the_cells_of_the_same_fine_tune_and_budget_and_runs_the_rest(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """An interrupted part resumes: the cells ``results.jsonl`` holds from this fine-tune
    and budget are returned as recorded, only the missing ones are evaluated; another
    budget or a fine-tune trained again under the same name runs everything."""
    w = tmp_path / "w"
    base, task = resolve_base(tiny_bert_dir, w), load_task("rt-sentiment")
    first = rp.run_part(w, base, task, "tiny", TINY, BUDGET, (0.9,), ("dare",))
    evaluated: list[tuple[str, float]] = []
    run_method = rp.run_method

    def spy(st, method: str, p: float):
        evaluated.append((method, p))
        return run_method(st, method, p)

    opened: list[rp.Setting] = []
    open_setting = rp.open_setting

    def capture(*a, **k):
        opened.append(open_setting(*a, **k))
        return opened[-1]

    monkeypatch.setattr(rp, "run_method", spy)
    monkeypatch.setattr(rp, "open_setting", capture)
    monkeypatch.setattr(rp, "reference_rows", lambda st: pytest.fail("references rerun"))
    again = rp.run_part(w, base, task, "tiny", TINY, BUDGET, (0.9, 0.99), ("dare", "magnitude"))
    assert sorted(evaluated) == [("dare", 0.99), ("magnitude", 0.9), ("magnitude", 0.99)]
    # a DAREx-q whose q is 1-p takes the kept DARE cell's metrics, as it takes run ones
    dare = next(r for r in first if (r.method, r.p) == ("dare", 0.9))
    assert {k: v for k, v in opened[0].dare_test.items() if k[0] == 0.9} == {
        (0.9, s): v for s, v in zip(dare.seeds, dare.values, strict=True)
    }
    old = {(r.method, r.p): r for r in first}
    kept = {(r.method, r.p): r for r in again if (r.method, r.p) in old}
    assert set(kept) == {("unpruned", 0.0), ("base", 0.0), ("dare", 0.9), ("recommend", 0.9)}
    assert all(kept[k] == old[k] for k in kept if k[0] != "recommend")  # as recorded
    assert {(r.method, r.p) for r in again} == set(old) | {
        ("dare", 0.99),
        ("magnitude", 0.9),
        ("magnitude", 0.99),
        ("recommend", 0.99),
    }
    assert all(len(r.extra["finetune"]) == 16 for r in again)
    monkeypatch.undo()
    # another budget: every cell again
    evaluated.clear()
    monkeypatch.setattr(rp, "run_method", spy)
    rp.run_part(w, base, task, "tiny", TINY, replace(BUDGET, test=16), (0.9,), ("dare",))
    assert evaluated == [("dare", 0.9)]
    # the fine-tune trained again (its record, hence its id, differs): every cell again
    evaluated.clear()
    ft = w / rp.slug(base.name) / task.name / "tiny"
    rec = json.loads((ft / RESULT_FILE).read_text())
    (ft / RESULT_FILE).write_text(json.dumps({**rec, "seconds": rec["seconds"] + 1.0}))
    rp.run_part(w, base, task, "tiny", TINY, BUDGET, (0.9,), ("dare",))
    assert evaluated == [("dare", 0.9)]


def test_a_cached_fine_tune_is_trained_again_when_its_weights_settings_changed(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    """``ensure_finetune`` reuses a spec's fine-tune only while it was trained with the
    settings asked for; where it ran and how much validation scored it do not count, so a
    fine-tune made on a GPU (or with ``device: auto``) serves a CPU rerun."""
    w = tmp_path / "w"
    base, task = resolve_base(tiny_bert_dir, w), load_task("rt-sentiment")
    trained: list[dict] = []
    finetune = training.finetune

    def spy(*a, **k):
        trained.append(k)
        return finetune(*a, **k)

    monkeypatch.setattr(training, "finetune", spy)
    ft, rec = rp.ensure_finetune(w, base, task, "tiny", TINY, max_length=32, max_eval=8)
    assert len(trained) == 1 and rec["settings"]["device"] == "cpu"
    # the same weights' settings: reused, however the device and validation are asked
    for opts, max_eval in ((TINY, 8), ({**TINY, "device": "cpu"}, 16), ({**TINY}, None)):
        again, rec2 = rp.ensure_finetune(w, base, task, "tiny", opts, 32, max_eval)
        assert again == ft and rec2 == rec
    # 0 and None both mean "no limit" for max_train and max_steps
    whole = {**rec["settings"], "max_train": None}
    assert changed_settings(whole, {**TINY, "max_train": 0, "max_length": 32}) == {}
    assert changed_settings(whole, {**TINY, "max_length": 32}) == {"max_train": (None, 64)}
    assert len(trained) == 1
    # a setting the record lacks counts as its default, so records made before it reuse
    old = {k: v for k, v in rec["settings"].items() if k != "warmup"}
    assert changed_settings(old, {**TINY, "max_length": 32}) == {}
    assert changed_settings(old, {**TINY, "max_length": 32, "warmup": 0.2}) == {
        "warmup": (0.1, 0.2)
    }
    # a changed learning rate or token length: trained again, the record says so, and the
    # log names the spec and what changed
    with caplog.at_level("WARNING", logger=training.log.name):
        _, rec3 = rp.ensure_finetune(w, base, task, "tiny", {**TINY, "lr": 2e-3}, 32, 8)
    assert len(trained) == 2 and rec3["settings"]["lr"] == 2e-3
    assert "tiny" in caplog.text and "lr: 0.001 -> 0.002" in caplog.text
    _, rec4 = rp.ensure_finetune(w, base, task, "tiny", {**TINY, "lr": 2e-3}, 24, 8)
    assert len(trained) == 3 and rec4["settings"]["max_length"] == 24
    assert rp.ensure_finetune(w, base, task, "tiny", {**TINY, "lr": 2e-3}, 24, 8)[1] == rec4
    assert len(trained) == 3
    # another checkpoint under the base's name: trained again on it
    other = replace(base, sha256="0" * 64)
    assert "another checkpoint" in stale_reason(ft, other, {**TINY, "lr": 2e-3, "max_length": 24})
    with caplog.at_level("WARNING", logger=training.log.name):
        rp.ensure_finetune(w, other, task, "tiny", {**TINY, "lr": 2e-3}, 24, 8)
    assert len(trained) == 4 and "another checkpoint" in caplog.text


def test_quick_reports_the_fine_tunes_loss_and_names_one_that_did_not_learn(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The check's result carries the fine-tune's training loss from its record; a failed
    check on a fine-tune that did not learn says so, besides exiting 1."""
    monkeypatch.setattr(rp, "QUICK_SPEC", TINY)
    base, task = resolve_base(tiny_bert_dir, tmp_path), load_task("rt-sentiment")
    res = rp.quick(tmp_path / "w", base, task, BUDGET)
    rec = json.loads(
        (
            tmp_path / "w" / rp.slug(base.name) / task.name / "quick" / "darex_finetune.json"
        ).read_text()
    )
    assert res.loss == (rec["loss_before"], rec["loss_after"])
    assert res.stalled == (rec["loss_after"] > rp.STALLED * rec["loss_before"])

    for loss, says in (((0.696, 0.684), True), ((0.693, 0.34), False)):
        stuck = rp.QuickResult(res.rows, 1.0, gain=0.0, gap=0.0, loss=loss)
        monkeypatch.setattr(rp, "quick", lambda *a, r=stuck, **k: r)
        out = CliRunner().invoke(app, ["reproduce", "--quick", "--work", str(tmp_path / "q")])
        assert out.exit_code == 1 and "NOT reproduced" in out.output, out.output
        assert ("did not learn the task" in out.output) is says, out.output
        assert ("0.696 -> 0.684" in out.output) is says
