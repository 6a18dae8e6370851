"""`darex reproduce` and `darex demo` refuse bad arguments (exit 2) before any work."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

import server.cli.lab  # noqa: F401  (registers the commands)
from server.settings import get_settings
from tests.cli_util import run


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    monkeypatch.setenv("DAREX_DATA_DIR", str(data))
    monkeypatch.setenv("DAREX_ENV", "development")  # as `darex demo` would set it
    for var in ("DAREX_REGISTRY_URL", "DAREX_PORT", "DAREX_HOST", "DAREX_BASE"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    yield data
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--rates", "abc"], "comma-separated numbers"),
        (["--rates", "0.9,"], "comma-separated numbers"),
        (["--rates", "0.9,1.5"], "[0, 1), got 1.5"),
        (["--rates", "-0.1"], "[0, 1), got -0.1"),
        (["--rates", "nan"], "[0, 1), got nan"),
        (["--base", "nosuchbase"], "unknown base 'nosuchbase'"),
        (["--report-only"], "give --out DIR"),
        (["--out", "FILE", "--report-only"], "is a file; give a folder"),
        (["--report-only", "--out", "OUT", "--only", "arith"], "choose what a run runs"),
        (["--report-only", "--out", "OUT", "--methods", "foo"], "choose what a run runs"),
        (["--out", "UNDERFILE"], "is a file, not a folder"),
        (["--work", "UNDERFILE"], "is a file, not a folder"),
        (["--quick", "--only", "arith"], "are for the full grid"),
        (["--quick", "--rates", "0.9"], "are for the full grid"),
        (["--quick", "--out", "OUT", "--report-only"], "are for the full grid"),
        (["--test", "0"], "greater than or equal to 1"),
        (["--max-length", "-1"], "greater than or equal to 1"),
    ],
)
def test_reproduce_refuses_bad_rates_and_bases_before_any_work(
    args: list[str], says: str, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    (tmp_path / "file").write_text("a file")
    paths = {
        "FILE": str(tmp_path / "file"),
        "OUT": str(tmp_path / "out"),
        "UNDERFILE": str(tmp_path / "file" / "sub"),
    }
    r = run("reproduce", "--work", str(work), *[paths.get(a, a) for a in args])
    assert r.exit_code == 2, r.output
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())  # rich's box taken out
    assert args[0] in r.output and says in flat, r.output
    assert "Traceback" not in r.output
    assert not work.exists()


def test_reproduce_refuses_a_bad_darex_value_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DAREX_PORT", "abc")
    r = run("reproduce", "--work", str(tmp_path / "work"))
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        "error: DAREX_PORT should be a valid integer, unable to parse string as an integer "
        "(got 'abc')"
    ]


def demo(*args: str):
    return run("demo", "--no-serve", "--steps", "1", "--train", "8", "--eval", "8", *args)


def test_demo_refuses_an_unknown_base_in_one_line(data_dir: Path) -> None:
    r = demo("--base", "nosuchbase")
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --base: UnknownBase: unknown base")
    assert not (data_dir / "registry.sqlite3").exists()


def test_demo_refuses_an_unknown_task_before_the_store(data_dir: Path) -> None:
    r = demo("--task", "nosuch")
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --task: unknown task(s) ['nosuch']")
    assert "rt-sentiment" in lines[0]
    assert not data_dir.exists()


def test_demo_refuses_a_task_the_base_cannot_serve_before_training(data_dir: Path) -> None:
    """A classification task on the decoder base would train for minutes and then be
    refused at the store."""
    r = demo("--base", "smollm2-135m", "--task", "rt-sentiment")
    assert r.exit_code == 2, r.output
    line = " ".join(r.output.split())
    assert "--task: 'rt-sentiment' is a classification task" in line and "arith" in line, line
    assert not (data_dir / "demo").exists()


@pytest.mark.parametrize("rate", ["1.5", "-0.5", "nan"])
def test_demo_refuses_a_rate_out_of_range(rate: str, data_dir: Path) -> None:
    r = demo("--rate", rate)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        f"error: --rate: the pruning rate p must be in [0, 1), got {float(rate)}"
    ]
    assert not data_dir.exists()


def test_demo_refuses_a_port_out_of_range() -> None:
    r = demo("--port", "99999")
    assert r.exit_code == 2 and "--port" in r.output, r.output


def test_demo_refuses_a_port_in_use_before_the_fine_tunes(
    tiny_bert_dir: Path, data_dir: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("demo", "--base", str(tiny_bert_dir), "--host", "127.0.0.1", "--port", str(port))
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [f"error: port {port} on 127.0.0.1 is in use"]
    assert not (data_dir / "registry.sqlite3").exists()


@pytest.mark.parametrize("token", ["change-me", "  "])
def test_demo_refuses_the_default_admin_token_before_the_fine_tunes(
    tiny_bert_dir: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    """Serving with the default or a blank token outside development is refused up front,
    not after minutes of fine-tuning."""
    monkeypatch.setenv("DAREX_ENV", "production")
    monkeypatch.setenv("DAREX_ADMIN_TOKEN", token)
    r = run("demo", "--base", str(tiny_bert_dir), "--port", "0")
    assert r.exit_code == 2, r.output
    (line,) = r.output.strip().splitlines()
    assert line.startswith("error: DAREX_ADMIN_TOKEN is unset, blank or the default"), line
    assert not data_dir.exists()


def test_demo_refuses_a_data_dir_that_is_a_file_in_one_line(
    tiny_bert_dir: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "afile").write_text("")
    for where in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        monkeypatch.setenv("DAREX_DATA_DIR", str(where))
        get_settings.cache_clear()
        r = run("demo", "--base", str(tiny_bert_dir), "--no-serve")
        assert r.exit_code == 2, r.output
        (line,) = r.output.strip().splitlines()
        assert line.startswith(f"error: DAREX_DATA_DIR={where}") and "not a directory" in line


def test_demo_refuses_a_registry_that_is_not_a_database_in_one_line(
    tiny_bert_dir: Path, data_dir: Path
) -> None:
    data_dir.mkdir()
    (data_dir / "registry.sqlite3").write_text("not a database " * 20)
    r = run("demo", "--base", str(tiny_bert_dir), "--no-serve")
    assert r.exit_code == 1, r.output
    (line,) = r.output.strip().splitlines()
    assert "the store in DAREX_DATA_DIR" in line and "file is not a database" in line, line
    assert not (data_dir / "demo").exists()  # before any fine-tune


@pytest.mark.parametrize("args", [["--steps", "0"], ["--train", "0"], ["--eval", "0"]])
def test_demo_refuses_budgets_below_one(args: list[str], data_dir: Path) -> None:
    r = demo(*args)
    assert r.exit_code == 2 and args[0] in r.output, r.output
    assert not data_dir.exists()
