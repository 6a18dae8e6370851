"""`darex add / ls / rm / gc / verify` refuse bad settings and options in one line.

Usage errors (a bad option, a bad ``DAREX_*`` value, options that conflict) exit 2 and
runtime failures exit 1, each with one ``error:`` line, no traceback, before any work.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import server.cli.store  # noqa: F401  (registers the commands)
from tests.cli_util import one_line, run

STORE_COMMANDS = (["ls"], ["rm", "x"], ["gc"], ["verify"])


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("DAREX_PORT", "abc", "valid integer"),
        ("DAREX_PORT", "99999", "65535"),
        ("DAREX_ENV", "prod", "'production' or 'development'"),
        ("DAREX_DEFAULT_RATE", "abc", "number"),
        ("DAREX_DEFAULT_RATE", "1.5", "less than or equal to 0.999999"),
        ("DAREX_REGISTRY_URL", "bogus", "sqlite:///"),
    ],
)
@pytest.mark.parametrize("cmd", [*STORE_COMMANDS, ["add", "m", "/nonexistent"]])
def test_a_bad_darex_value_exits_2_in_one_line_naming_it(
    env: Path, monkeypatch: pytest.MonkeyPatch, cmd: list[str], var: str, value: str, says: str
) -> None:
    monkeypatch.setenv(var, value)
    r = run(*cmd)
    assert r.exit_code == 2, r.output
    line = one_line(r.output)
    assert var in line and repr(value) in line and says in line
    assert not env.exists()


@pytest.mark.parametrize("cmd", [*STORE_COMMANDS, ["add", "m", "/nonexistent"]])
def test_a_data_dir_that_is_a_file_exits_2(
    env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cmd: list[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    monkeypatch.setenv("DAREX_DATA_DIR", str(afile))
    r = run(*cmd)
    assert r.exit_code == 2, r.output
    assert "DAREX_DATA_DIR" in one_line(r.output) and "not a directory" in r.output
    monkeypatch.setenv("DAREX_DATA_DIR", str(afile / "sub"))  # below a file: cannot be made
    r = run(*cmd)
    assert r.exit_code == 2, r.output
    assert "DAREX_DATA_DIR" in one_line(r.output)


@pytest.mark.parametrize("cmd", STORE_COMMANDS)
def test_read_only_commands_refuse_a_missing_data_dir_without_creating_it(
    env: Path, cmd: list[str]
) -> None:
    r = run(*cmd)
    assert r.exit_code == 2, r.output
    assert "does not exist" in one_line(r.output) and str(env) in r.output
    assert not env.exists()


@pytest.mark.parametrize("cmd", [*STORE_COMMANDS, ["rebind", "--yes"]])
def test_read_only_commands_leave_a_folder_without_a_store_as_it_is(
    env: Path, cmd: list[str]
) -> None:
    """A DAREX_DATA_DIR that names some other folder (a typo, a mount not yet there) is
    refused; no objects/, tmp/ or registry file is made in it."""
    env.mkdir()
    (env / "notes.txt").write_text("someone else's folder")
    r = run(*cmd)
    assert r.exit_code == 2, r.output
    assert "holds no store" in one_line(r.output) and str(env) in r.output
    assert sorted(p.name for p in env.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("grace", ["-5", "-0.5", "nan"])
def test_gc_refuses_a_negative_or_nan_grace(env: Path, ft: Path, grace: str) -> None:
    assert run("add", "m", str(ft), "--method", "dare", "--rate", "0.9").exit_code == 0
    assert run("rm", "m").exit_code == 0
    blobs = sorted(p for p in (env / "objects").rglob("*") if p.is_file())
    r = run("gc", "--grace-s", grace)
    assert r.exit_code == 2, r.output
    assert "--grace-s" in r.output
    assert sorted(p for p in (env / "objects").rglob("*") if p.is_file()) == blobs


@pytest.mark.parametrize(
    ("args", "option", "says"),
    [
        (["--method", "foo"], "--method", "'foo' is not one of dare, darex_q"),
        (["--q", "0"], "--q", ">= 1e-06"),
        (["--q", "1e-9"], "--q", ">= 1e-06"),
        (["--q", "-1"], "--q", ">= 1e-06"),
        (["--q", "nan"], "--q", ">= 1e-06"),
        (["--values", "int4"], "--values", "'int4' is not one of float16"),
        (["--encoding", "foo"], "--encoding", "'foo' is not one of auto, seed"),
        (["--method", "dare", "--q", "0.5"], "--q", "use --method darex_q"),
        (["--method", "structural", "--encoding", "seed"], "--encoding", "explicit"),
        (["--method", "magnitude", "--encoding", "seed"], "--encoding", "explicit"),
        (["--rate", "1.5"], "--rate", "[0, 1)"),
        (["--rate", "-0.1"], "--rate", "[0, 1)"),
        (["--rate", "nan"], "--rate", "[0, 1)"),
        (["--method", "wanda"], "--method", "--calib"),
        (["--method", "darex_q"], "--method", "--calib or --val"),
        (["--method", "dare", "--val", "v.jsonl"], "--val", "method dare takes no q"),
        (["--q", "0.5", "--val", "v.jsonl"], "--val", "either q or val"),
    ],
)
def test_add_refuses_bad_options_up_front_naming_the_option(
    env: Path, ft: Path, args: list[str], option: str, says: str
) -> None:
    r = run("add", "m", str(ft), *args)
    assert r.exit_code == 2, r.output
    line = one_line(r.output)
    assert line.startswith(f"error: {option}: ") and says in line, line
    assert "tensor" not in line and "ingest" not in r.output  # no tensor was looked at
    assert not env.exists()  # before any work: not even the store was opened


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["../evil", "FT", "--method", "dare"], "error: MODEL_ID: model_id"),
        (["m", "NOPE", "--method", "dare"], "error: PATH: "),
        (["m", "FT", "--method", "darex_q", "--calib", "EMPTY"], "holds no calibration text"),
        (["m", "FT", "--method", "darex_q", "--val", "EMPTY"], "error: --val: "),
        (["m", "FT", "--method", "darex_q", "--val", "NOTJSON"], "line 1: not a JSON object"),
        (["m", "FT", "--method", "dare", "--base", "NOPE"], "error: --base: UnknownBase"),
        (["minilm-l6", "FT", "--method", "dare", "--base", "minilm-l6"], "the base's own id"),
    ],
)
def test_a_refused_first_add_leaves_no_store_behind(
    env: Path, ft: Path, tmp_path: Path, args: list[str], says: str
) -> None:
    """Every refusal that needs no tensor comes before the store is opened: a first
    `darex add` that is refused creates no data folder, registry or registry.id."""
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "notjson.jsonl").write_text("not json\n")
    names = {
        "FT": str(ft),
        "NOPE": str(tmp_path / "nope"),
        "EMPTY": str(tmp_path / "empty.txt"),
        "NOTJSON": str(tmp_path / "notjson.jsonl"),
    }
    r = run("add", *[names.get(a, a) for a in args])
    assert r.exit_code == 2, r.output
    assert says in one_line(r.output), r.output
    assert not env.exists()


def test_add_q_without_method_means_darex_q(env: Path, ft: Path) -> None:
    from storage.store import DeltaStore

    r = run("add", "m", str(ft), "--q", "0.5", "--rate", "0.9")
    assert r.exit_code == 0, r.output
    assert "darex_q p=0.9 q=0.5" in r.output
    store = DeltaStore(env, f"sqlite:///{env / 'registry.sqlite3'}")
    try:
        m = store.manifest("m")
        assert (m.method, m.q) == ("darex_q", 0.5)
    finally:
        store.close()


def test_add_of_an_existing_id_points_at_replace(env: Path, ft: Path) -> None:
    args = ("add", "m", str(ft), "--method", "dare", "--rate", "0.9")
    assert run(*args).exit_code == 0
    r = run(*args)
    assert r.exit_code == 1, r.output
    line = one_line(r.output)
    assert "already registered" in line and "(use --replace to overwrite)" in line
    assert run(*args, "--replace").exit_code == 0


def test_add_of_an_unknown_base_exits_2_naming_where_it_came_from(
    env: Path, ft: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    r = run("add", "m", str(ft), "--method", "dare", "--base", str(tmp_path / "nope"))
    assert r.exit_code == 2, r.output
    assert one_line(r.output).startswith("error: --base: UnknownBase: unknown base")
    monkeypatch.setenv("DAREX_BASE", str(tmp_path / "nope"))
    r = run("add", "m", str(ft), "--method", "dare")
    assert r.exit_code == 2, r.output
    assert one_line(r.output).startswith("error: DAREX_BASE: UnknownBase: unknown base")
