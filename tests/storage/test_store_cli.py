"""`darex add / ls / rm / gc / verify` through typer's CliRunner, on a real tiny fine-tune."""

from __future__ import annotations

from pathlib import Path

import server.cli.store  # noqa: F401  (registers the commands)
from tests.cli_util import run


def test_add_ls_verify_rm_gc(env: Path, ft: Path) -> None:
    r = run("add", "feat", str(ft), "--method", "dare", "--rate", "0.9")
    assert r.exit_code == 0, r.output
    assert "added feat" in r.output and "dare" in r.output
    r = run("add", "feat-q", str(ft), "--method", "darex_q", "--rate", "0.9", "--q", "0.2")
    assert r.exit_code == 0, r.output
    r = run("ls")
    assert r.exit_code == 0 and "feat" in r.output and "darex_q" in r.output and "1/" in r.output
    # piped (CliRunner, like a CI log), the table keeps whole cells, not 80 columns of "…"
    assert "…" not in r.output and "feature-extraction" in r.output, r.output
    r = run("verify")
    assert r.exit_code == 0 and "0 problem(s)" in r.output
    r = run("rm", "feat-q")
    assert r.exit_code == 0
    assert run("rm", "feat-q").exit_code == 1
    r = run("gc", "--grace-s", "0")
    assert r.exit_code == 0 and "deleted" in r.output
    assert "deleted 0 blob" not in r.output
    assert "feat-q" not in run("ls").output


def test_verify_fails_on_a_corrupted_blob(env: Path, ft: Path) -> None:
    assert run("add", "m", str(ft), "--method", "magnitude", "--rate", "0.99").exit_code == 0
    blob = max((env / "objects").rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else 0)
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    blob.write_bytes(bytes(raw))
    r = run("verify")
    assert r.exit_code == 1 and "corrupt" in r.output


def test_add_refuses_bad_input_with_a_message(env: Path, ft: Path) -> None:
    r = run("add", "../evil", str(ft), "--method", "dare")
    assert r.exit_code == 2 and "MODEL_ID: model_id" in r.output, r.output
    (ft.parent / "pickled.bin").write_bytes(b"\x80\x04")
    r = run("add", "ok", str(ft.parent / "pickled.bin"), "--method", "dare")
    assert r.exit_code == 1 and "pickle" in r.output
    r = run("add", "minilm-l6", str(ft), "--method", "dare", "--base", "minilm-l6")
    assert r.exit_code == 2 and "the base's own id" in r.output, r.output
    assert "minilm-l6" not in run("ls").output  # nothing stored


def test_gc_with_another_registry_refuses_until_rebind(
    env: Path, ft: Path, tmp_path: Path, monkeypatch
) -> None:
    """The mistake the record guards against: `darex gc` from a shell whose
    DAREX_REGISTRY_URL names another (empty) registry than the one the models live in."""
    from server.settings import get_settings

    assert run("add", "kept", str(ft), "--method", "dare", "--rate", "0.9").exit_code == 0
    blobs = sorted(p for p in (env / "objects").rglob("*") if p.is_file())
    from storage.registry import open_registry

    other = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    open_registry(other).close()  # another registry, empty
    monkeypatch.setenv("DAREX_REGISTRY_URL", other)
    get_settings.cache_clear()
    r = run("gc", "--grace-s", "0")
    assert r.exit_code == 1 and "RegistryMismatch" in r.output and "belongs to registry" in r.output
    assert sorted(p for p in (env / "objects").rglob("*") if p.is_file()) == blobs
    r = run("rebind")
    assert r.exit_code == 1 and "darex rebind --yes" in r.output
    r = run("rebind", "--yes")
    assert r.exit_code == 0 and "rebound" in r.output, r.output
    assert "nothing to do" in run("rebind").output
    r = run("gc", "--grace-s", "0")
    assert r.exit_code == 0 and "deleted 0 blob" not in r.output, r.output
    monkeypatch.delenv("DAREX_REGISTRY_URL")
    get_settings.cache_clear()
    # the data folder's own registry, no longer the store's: its model lost its blobs to
    # that gc, which `ls` says (exit 1) while it still lists the model
    r = run("ls")
    assert r.exit_code == 1 and "kept" in r.output and "unreadable" in r.output, r.output
    assert "manifest blob" in r.output and "missing" in r.output
    r = run("verify")
    assert r.exit_code == 1 and "belongs to registry" in r.output


def test_rebind_yes_rewrites_an_unreadable_registry_record(env: Path, ft: Path) -> None:
    """The fix an unreadable registry.id's message names works: `darex rebind --yes`
    rewrites it, and gc runs again; a folder in its place is named, not deleted."""
    assert run("add", "kept", str(ft), "--method", "dare", "--rate", "0.9").exit_code == 0
    record = env / "registry.id"
    good = record.read_text()
    record.write_bytes(b"\xff\xfe\x00")
    r = run("gc", "--grace-s", "0")
    assert r.exit_code == 1 and "darex rebind --yes" in r.output, r.output
    r = run("rebind")
    assert r.exit_code == 1 and "cannot be read" in r.output, r.output
    r = run("rebind", "--yes")
    assert r.exit_code == 0 and "was an unreadable record" in r.output, r.output
    assert record.read_text() == good  # the same registry: its id again
    assert run("gc", "--grace-s", "0").exit_code == 0
    assert "kept" in run("ls").output
    record.unlink()
    record.mkdir()
    for args in (("gc",), ("rebind", "--yes")):
        r = run(*args)
        assert r.exit_code == 1 and "is a folder" in r.output and "remove it" in r.output, r.output
    assert record.is_dir()


def test_read_only_commands_refuse_a_sqlite_registry_that_does_not_exist(
    env: Path, ft: Path, tmp_path: Path, monkeypatch
) -> None:
    """A mistyped DAREX_REGISTRY_URL would otherwise be made on the spot, empty, and `ls`
    would list no model; only `rebind --yes` makes a new registry the store's."""
    from server.settings import get_settings

    assert run("add", "kept", str(ft), "--method", "dare", "--rate", "0.9").exit_code == 0
    missing = tmp_path / "typo" / "reg.db"
    monkeypatch.setenv("DAREX_REGISTRY_URL", f"sqlite:///{missing}")
    get_settings.cache_clear()
    for args in (("ls",), ("verify",), ("rm", "kept"), ("gc",), ("rebind",)):
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert f"DAREX_REGISTRY_URL: no SQLite registry at {missing}" in r.output, r.output
        assert not missing.parent.exists()
    monkeypatch.delenv("DAREX_REGISTRY_URL")
    get_settings.cache_clear()
    (env / "registry.sqlite3").unlink()
    r = run("ls")
    assert r.exit_code == 2 and "DAREX_REGISTRY_URL is unset" in r.output, r.output
    assert not (env / "registry.sqlite3").exists()
    r = run("rebind", "--yes")  # the registry lost for good: a new one, bound
    assert r.exit_code == 0 and "rebound" in r.output, r.output
    assert run("ls").exit_code == 0
