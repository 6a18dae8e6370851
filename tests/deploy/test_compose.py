"""docker-compose.yml validated by `docker-compose config` (needs no Docker engine)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not installed: apt-get install -y docker-compose",
)


def _config(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker-compose", "config"], cwd=project, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    return tmp_path


@needs_compose
def test_refuses_to_start_without_admin_token(project: Path) -> None:
    out = _config(project)
    assert out.returncode != 0
    assert "DAREX_ADMIN_TOKEN" in out.stderr


@needs_compose
def test_config_is_valid_and_wired(project: Path) -> None:
    env = project / ".env"
    env.write_text(env.read_text().replace("DAREX_ADMIN_TOKEN=", "DAREX_ADMIN_TOKEN=s3cret-token"))
    out = _config(project)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    services = cfg["services"]
    assert set(services) == {"darex", "darex-2", "redis"}

    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])

    for name in ("darex", "darex-2"):
        s = services[name]
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
        e = s["environment"]
        assert e["DAREX_ADMIN_TOKEN"] == "s3cret-token"  # from the env file
        assert e["DAREX_REGISTRY_URL"] == "redis://redis:6379/0"
        assert e["DAREX_DATA_DIR"] == "/data"
        assert any(v.startswith("darex-data:/data") for v in s["volumes"])  # one shared store
        assert s["build"]["dockerfile"] == "docker/Dockerfile"
        assert s["mem_limit"]
    assert [p["published"] for p in services["darex"]["ports"]] == [8000]
    assert [p["published"] for p in services["darex-2"]["ports"]] == [8001]
    assert services["darex-2"]["profiles"] == ["replicas"]
    assert set(cfg["volumes"]) == {"darex-data", "redis-data"}


def test_env_example_names_are_settings_fields() -> None:
    from server.settings import Settings

    fields = {f"DAREX_{name.upper()}" for name in Settings.model_fields}
    compose_only = {"DAREX_PUBLISH_PORT", "DAREX_PUBLISH_PORT_2", "DAREX_MEM_LIMIT"}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.lstrip("# ").strip()
        if line.startswith("DAREX_") and "=" in line:
            name = line.split("=", 1)[0]
            assert name in fields | compose_only, f"{name} is not a Settings field"
