"""`darex serve` and `darex config` refuse bad settings, ports and bases before loading.

uvicorn.run and create_app are replaced by recorders: nothing is served or loaded here.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import server.cli.serve  # noqa: F401  (registers the commands)
from server.settings import Settings, describe_error, get_settings
from tests.cli_util import one_line, run


@pytest.fixture
def calls(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, list[Any]]:
    monkeypatch.setenv("DAREX_ENV", "development")
    monkeypatch.setenv("DAREX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DAREX_BASE", str(tiny_bert_dir))
    monkeypatch.setenv("DAREX_LOG_JSON", "false")
    for var in ("DAREX_REGISTRY_URL", "DAREX_PORT", "DAREX_HOST"):
        monkeypatch.delenv(var, raising=False)
    seen: dict[str, list[Any]] = {"create_app": [], "run": []}

    def create_app(settings: Settings, **kw: Any) -> str:
        seen["create_app"].append((settings, kw))
        return "app"

    monkeypatch.setattr("server.api.create_app", create_app)
    monkeypatch.setattr("server.logging.setup_logging", lambda *a, **k: None)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen["run"].append(kw))
    get_settings.cache_clear()
    yield seen
    get_settings.cache_clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("DAREX_PORT", "abc", "valid integer"),
        ("DAREX_PORT", "99999", "65535"),
        ("DAREX_PORT", "-1", "greater than or equal to 0"),
        ("DAREX_ENV", "prod", "'production' or 'development'"),
        ("DAREX_REGISTRY_URL", "bogus", "sqlite:///"),
        ("DAREX_DEFAULT_RATE", "nan", "finite"),
        # each of these passed `darex config` and crashed `darex serve` after the base loaded
        ("DAREX_LOG_LEVEL", "BOGUS", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("DAREX_MAX_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("DAREX_REGISTRY_TTL_S", "nan", "finite"),
        ("DAREX_REGISTRY_TTL_S", "0", "greater than 0"),
        ("DAREX_REGISTRY_URL", "redis://:notaport/0", "Port could not be cast"),
        ("DAREX_MAX_TENSORS", "-5", "greater than or equal to 1"),
        ("DAREX_HOST_CACHE_BYTES", "-1", "greater than or equal to 0"),
        ("DAREX_DATA_DIR", "", "not empty"),
        ("DAREX_BASE", "", "not empty"),
        ("DAREX_REGISTRY_URL", "sqlite:///", "should name the SQLite file"),
    ],
)
@pytest.mark.parametrize("cmd", ["config", "serve"])
def test_a_bad_darex_value_is_one_line_naming_the_variable(
    calls: dict, monkeypatch: pytest.MonkeyPatch, cmd: str, var: str, value: str, says: str
) -> None:
    monkeypatch.setenv(var, value)
    r = run(cmd)
    assert r.exit_code == 2, r.output
    line = one_line(r.output)
    assert var in line and repr(value) in line and says in line, line
    assert not calls["create_app"] and not calls["run"]


def test_settings_port_and_registry_url_are_checked() -> None:
    for bad in ({"port": 65536}, {"port": -1}, {"registry_url": "postgres://x"}):
        with pytest.raises(ValidationError) as e:
            Settings(**bad)
        assert "\n" not in describe_error(e.value)
    assert Settings(port=0).port == 0 and Settings(port=65535).port == 65535
    for url in ("", "sqlite:////tmp/r.sqlite3", "redis://h:6379/0", "rediss://h/0"):
        assert Settings(registry_url=url).registry_url == url


def test_describe_error_hides_secret_values() -> None:
    with pytest.raises(ValidationError) as e:
        Settings(admin_token=["s3cret"], port="x")  # type: ignore[arg-type]
    line = describe_error(e.value)
    assert "DAREX_ADMIN_TOKEN" in line and "s3cret" not in line and "'x'" in line


def test_serve_refuses_a_port_out_of_range(calls: dict) -> None:
    r = run("serve", "--port", "99999")
    assert r.exit_code == 2 and "--port" in r.output, r.output
    assert not calls["run"]


def test_serve_port_0_is_kept(calls: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAREX_PORT", "8123")
    r = run("serve", "--port", "0")
    assert r.exit_code == 0, r.output
    assert calls["run"][0]["port"] == 0
    r = run("serve")
    assert r.exit_code == 0, r.output
    assert calls["run"][1]["port"] == 8123


def test_serve_refuses_a_port_in_use_before_loading(calls: dict, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("serve", "--host", "127.0.0.1", "--port", str(port))
    assert r.exit_code == 1, r.output
    assert one_line(r.output) == f"error: port {port} on 127.0.0.1 is in use"
    assert not calls["create_app"] and not calls["run"]
    assert not (tmp_path / "data").exists()  # refused before the store is made


def test_serve_refuses_an_unknown_base_before_uvicorn(
    calls: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DAREX_BASE", str(tmp_path / "no-such-base"))
    r = run("serve", "--port", str(free_port()))
    assert r.exit_code == 2, r.output
    line = one_line(r.output)
    assert (
        line.startswith("error: DAREX_BASE: UnknownBase: unknown base") and "no-such-base" in line
    )
    assert not calls["create_app"] and not calls["run"]
    assert not (tmp_path / "data").exists()  # refused before the store is made


def test_serve_refuses_a_data_dir_that_is_a_file(
    calls: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("DAREX_DATA_DIR", str(tmp_path / "afile"))
    r = run("serve", "--port", str(free_port()))
    assert r.exit_code == 2, r.output
    assert "not a directory" in one_line(r.output)
    assert not calls["create_app"] and not calls["run"]


def test_serve_hands_the_resolved_base_to_the_app(calls: dict, tiny_bert_dir: Path) -> None:
    port = free_port()
    r = run("serve", "--port", str(port))
    assert r.exit_code == 0, r.output
    ((settings, kw),) = calls["create_app"]
    assert settings.port == port and kw["base"].path == tiny_bert_dir
    assert calls["run"] == [
        {"host": "127.0.0.1", "port": port, "log_config": None, "access_log": False}
    ]


def test_serve_refuses_a_registry_file_that_is_not_a_database(calls: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "registry.sqlite3").write_text("not a database " * 20)
    r = run("serve")
    assert r.exit_code == 1, r.output
    line = one_line(r.output)
    assert "registry in DAREX_DATA_DIR" in line and "file is not a database" in line, line
    assert not calls["create_app"] and not calls["run"]


def test_serve_refuses_cuda_where_there_is_none(calls: dict, monkeypatch) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("DAREX_DEVICE", "cuda")
    r = run("serve")
    assert r.exit_code == 2 and "DAREX_DEVICE is cuda" in one_line(r.output), r.output
    assert not calls["create_app"]


def test_log_level_is_taken_in_any_case() -> None:
    assert Settings(log_level="debug").log_level == "DEBUG"


def test_a_dot_env_that_is_not_utf8_is_named(
    calls: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_bytes(b"DAREX_PORT=80\xff\n")
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    r = run("config")
    assert r.exit_code == 2, r.output
    assert one_line(r.output) == "error: .env: not UTF-8 text (byte 13: invalid start byte)"
