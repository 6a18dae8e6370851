"""``darex inspect`` / ``darex prune`` refuse what they cannot use with exit 2 and one message
before any work, never write over their inputs, and leave no partial output behind."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import server.cli.prune
from server.cli import app
from storage import bases
from tests.pruning.test_cli import _finetune

runner = CliRunner()


def _flat(text: str) -> str:
    """The output with rich's box drawing and line wrapping taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _invoke(*args: object) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, _flat(res.output)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def bert_ft(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _finetune(tiny_bert_dir, tmp_path_factory.mktemp("ft") / "bert-ft", 5e-3)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(f"sample sentence number {i} about movies" for i in range(8)))
    return path


@pytest.fixture()
def no_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening the checkpoints is the first piece of work: a refusal must come before it."""

    def fail(*_a: object, **_k: object) -> None:
        raise AssertionError("the checkpoints were opened: the check came too late")

    monkeypatch.setattr(server.cli.prune, "_open_pair", fail)


@pytest.mark.parametrize("rate", ["1.5", "-1", "1", "nan"])
def test_inspect_checks_the_rate_before_the_scan(
    tiny_bert_dir: Path, bert_ft: Path, no_scan: None, rate: str
) -> None:
    code, text = _invoke("inspect", tiny_bert_dir, bert_ft, "--rate", rate)
    assert code == 2, text
    assert "--rate: the pruning rate p must be in [0, 1)" in text


def test_inspect_refuses_a_negative_limit(tiny_bert_dir: Path, bert_ft: Path, no_scan) -> None:
    code, text = _invoke("inspect", tiny_bert_dir, bert_ft, "--limit", "-1")
    assert code == 2 and "--limit" in text, text


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--rate", "1.5"], "--rate: the pruning rate p must be in [0, 1), got 1.5"),
        (["--rate", "nan"], "--rate: the pruning rate p must be in [0, 1), got nan"),
        (["--method", "darex_q", "--q", "abc"], "outchange, labeled, auto, analytical; got 'abc'"),
        (["--method", "darex_q", "--q", "0"], "--q must be a number >= 1e-06"),
        (["--method", "darex_q", "--q", "-1"], "--q must be a number >= 1e-06"),
        (["--method", "darex_q", "--q", "inf"], "--q must be a number >= 1e-06"),
        (["--method", "darex_q", "--q", "1e-9"], "--q must be a number >= 1e-06"),
        (["--method", "wanda", "--per", "foo", "--calib", "CALIB"], "--per must be 'row'"),
        (["--method", "structural", "--axis", "diag"], "--axis must be 'row' or 'col'"),
        (["--method", "wanda", "--calib", "MISSING"], "--calib MISSING: no such file"),
        (["--method", "wanda", "--calib", "TMP"], "--calib TMP is a folder"),
        (["--method", "wanda", "--calib", "CALIB", "--calib-samples", "0"], "--calib-samples"),
        (["--method", "darex_q", "--q", "labeled", "--val", "MISSING"], "--val MISSING"),
        (["--include", "re:("], "bad tensor pattern 're:('"),
        (["--method", "nope"], "unknown method 'nope'; methods: dare, darex_q"),
        (["--method", "darex_q", "--q", "analytical", "--calib", "CALIB", "--eta", "nan"], "--eta"),
        (["--method", "darex_q", "--q", "analytical", "--calib", "CALIB", "--eta", "0"], "--eta"),
        # q fitted to DARE's mask would be applied to another method's (and WANDA's input
        # norms were not measured with outchange: it ran as magnitude)
        (
            ["--method", "wanda", "--q", "outchange", "--calib", "CALIB"],
            "--q outchange finds q for DAREx-q's random mask, not wanda's",
        ),
        (
            ["--method", "magnitude", "--q", "analytical", "--calib", "CALIB"],
            "--q analytical finds q for DAREx-q's random mask, not magnitude's",
        ),
        (["--method", "structural", "--q", "outchange", "--calib", "CALIB"], "--q auto"),
    ],
)
def test_prune_bad_values_exit_2_before_any_work(
    tiny_bert_dir: Path,
    bert_ft: Path,
    calib_file: Path,
    tmp_path: Path,
    no_scan: None,
    args: list[str],
    expect: str,
) -> None:
    paths = {"CALIB": calib_file, "MISSING": tmp_path / "missing.txt", "TMP": tmp_path}
    args = [str(paths.get(a, a)) for a in args]
    expect = re.sub("CALIB|MISSING|TMP", lambda m: str(paths[m.group()]), expect)
    code, text = _invoke("prune", tiny_bert_dir, bert_ft, *args, "--out", tmp_path / "o")
    assert code == 2, text
    assert expect in text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "how",
    [
        ["--method", "wanda"],
        ["--method", "darex_q", "--q", "auto"],
        ["--method", "darex_q", "--q", "0.1"],
        ["--method", "magnitude"],
    ],
)
def test_calibration_of_a_bare_weights_file_is_refused_up_front(
    tiny_bert_dir: Path, bert_ft: Path, calib_file: Path, tmp_path: Path, no_scan, how: list
) -> None:
    """WANDA and the per-layer q run the fine-tune itself: a lone .safetensors file has no
    config to build it from (this was a NotADirectoryError after the scan)."""
    ft = bert_ft / "model.safetensors"
    code, text = _invoke(
        "prune", tiny_bert_dir, ft, *how, "--calib", calib_file, "-o", tmp_path / "o"
    )
    assert code == 2 and "give its folder with config.json" in text, text
    assert not (tmp_path / "o").exists()


def test_a_config_that_does_not_describe_the_weights_is_refused(
    tiny_bert_dir: Path, bert_ft: Path, calib_file: Path, tmp_path: Path
) -> None:
    """WANDA on a model class the weights are not for measured a random model and fell back
    to magnitude everywhere, exit 0; now the mismatch is named, and nothing is written."""
    import json

    ft = tmp_path / "ft"
    shutil.copytree(bert_ft, ft)
    cfg = json.loads((ft / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertLMHeadModel"]}))
    sd = load_file(ft / "model.safetensors")
    save_file({f"x.{k}": v for k, v in sd.items()}, ft / "model.safetensors")  # other names
    out = tmp_path / "o"
    code, text = _invoke(
        "prune", tiny_bert_dir, ft, "--method", "wanda", "--calib", calib_file, "-o", out
    )
    assert code == 1 and "BadCheckpoint" in text and "names BertLMHeadModel" in text, text
    assert not out.exists()


def test_wanda_without_calib_names_no_q(tiny_bert_dir: Path, bert_ft: Path, tmp_path) -> None:
    code, text = _invoke("prune", tiny_bert_dir, bert_ft, "--method", "wanda", "-o", tmp_path)
    assert code == 2 and "--method wanda needs --calib FILE" in text, text
    assert "None" not in text


@pytest.mark.parametrize("which", ["finetuned", "base", "finetuned-file", "catalog-base"])
def test_prune_never_writes_over_its_inputs(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, base)
    ft = _finetune(base, tmp_path / "ft", 5e-3)
    base_arg, ft_arg, out = {
        "finetuned": (base, ft, ft),
        "base": (base, ft, base),
        "finetuned-file": (base, ft / "model.safetensors", ft),
        "catalog-base": ("tiny-cat", ft, base),
    }[which]
    monkeypatch.setitem(bases.CATALOG, "tiny-cat", bases._Entry("encoder", "t", lambda _d: base))
    before = _tree(tmp_path)
    code, text = _invoke("prune", base_arg, ft_arg, "--rate", "0.9", "--out", out)
    assert code == 2, text
    assert "--out must not be the fine-tune's or the base's folder" in text
    after = _tree(tmp_path)
    for tree in (before, after):  # the base's hash cache, written when it is resolved
        tree.pop(f"base/{bases.HASH_CACHE}", None)
    assert after == before


def test_prune_refuses_a_foreign_out_folder_and_replaces_a_previous_prune(
    tiny_bert_dir: Path, bert_ft: Path, tmp_path: Path
) -> None:
    """Another model's config left beside the pruned weights would be loaded with them: a
    folder that holds other files is refused untouched; a previous prune's is replaced, its
    side files by the fine-tune's."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "gpt2"}')
    before = _tree(out)
    code, text = _invoke("prune", tiny_bert_dir, bert_ft, "--rate", "0.9", "--out", out)
    assert code == 2, text
    assert f"--out {out} holds other files" in text and "darex_prune.json" in text
    assert _tree(out) == before
    (out / "config.json").unlink()
    code, text = _invoke("prune", tiny_bert_dir, bert_ft, "--rate", "0.9", "--out", out)
    assert code == 0, text
    (out / "config.json").write_text('{"model_type": "gpt2"}')  # a stale side file
    code, text = _invoke("prune", tiny_bert_dir, bert_ft, "--rate", "0.5", "--out", out)
    assert code == 0, text
    assert (out / "config.json").read_bytes() == (bert_ft / "config.json").read_bytes()
    assert '"p": "0.5"' in (out / "darex_prune.json").read_text()


def test_include_that_matches_nothing_is_refused(
    tiny_bert_dir: Path, bert_ft: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    args = ["--include", "nomatch.*", "--include", "re:^nope", "--exclude", "*.bias"]
    code, text = _invoke("prune", tiny_bert_dir, bert_ft, *args, "--out", out)
    assert code == 2, text
    assert "no tensor left to prune with --include 'nomatch.*' --include 're:^nope'" in text
    assert "--exclude '*.bias'" in text
    assert not out.exists()
    code, text = _invoke("prune", tiny_bert_dir, bert_ft, "--exclude", "*", "--out", out)
    assert code == 2 and "no tensor left to prune with --exclude '*'" in text, text


def test_pattern_syntax_and_data_dir_are_documented() -> None:
    for cmd in ("inspect", "prune"):
        code, text = _invoke(cmd, "--help")
        assert code == 0
        assert "--data-dir" in text and "Where converted catalog bases are cached" in text
    code, text = _invoke("prune", "--help")
    assert "fnmatch" in text and "re:REGEX" in text


@pytest.fixture()
def nan_ft(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    bad = _finetune(tiny_bert_dir, tmp_path / "nan-ft", 1e-3)
    sd = load_file(bad / "model.safetensors")
    sd["encoder.layer.1.output.dense.weight"][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def test_failed_prune_leaves_no_partial_output(
    tiny_bert_dir: Path, nan_ft: Path, tmp_path: Path
) -> None:
    new = tmp_path / "new" / "out"
    code, text = _invoke("prune", tiny_bert_dir, nan_ft, "--out", new)
    assert code == 1 and "encoder.layer.1.output.dense.weight" in text, text
    assert not new.exists()  # made by this run: removed
    kept = tmp_path / "kept"  # a previous prune's folder, to be replaced
    kept.mkdir()
    (kept / "darex_prune.json").write_text("{}")
    (kept / "notes.txt").write_text("mine")
    code, text = _invoke("prune", tiny_bert_dir, nan_ft, "--out", kept)
    assert code == 1, text
    assert sorted(p.name for p in kept.iterdir()) == ["darex_prune.json", "notes.txt"]


@pytest.mark.parametrize("cmd", ["inspect", "prune"])
def test_an_unknown_base_exits_2_as_for_add(cmd: str, bert_ft: Path, tmp_path: Path) -> None:
    extra = ["--out", str(tmp_path / "out")] if cmd == "prune" else []
    code, out = _invoke(cmd, "nosuchbase", bert_ft, *extra)
    assert code == 2, out
    assert out.strip().startswith("error: BASE: UnknownBase: unknown base 'nosuchbase'"), out
    assert not (tmp_path / "out").exists()
