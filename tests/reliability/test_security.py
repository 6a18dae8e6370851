"""Security: bearer tokens (admin always, inference optional, constant-time compare), no pickle
ever loaded anywhere in the code base, no client-named path ever read.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reliability.live import AUTH, serve_in_thread

ROOT = Path(__file__).resolve().parents[2]
CODE = [p for d in ("pruning", "storage", "server", "bench") for p in (ROOT / d).rglob("*.py")]
API_KEY = "inference-key-0123456789abcdef"

ADMIN_CALLS = [
    ("POST", "/admin/models"),
    ("GET", "/admin/jobs/0123456789abcdef"),
    ("GET", "/admin/models/anything"),
    ("DELETE", "/admin/models/anything"),
]
BAD_AUTH = {
    "missing": {},
    "wrong": {"Authorization": "Bearer not-the-token"},
    "prefix-of-token": {"Authorization": AUTH["Authorization"][:-1]},
    "token-plus-char": {"Authorization": AUTH["Authorization"] + "x"},
    "basic-scheme": {"Authorization": "Basic " + AUTH["Authorization"].split()[1]},
    "empty-bearer": {"Authorization": "Bearer"},
    "api-key-as-admin": {"Authorization": f"Bearer {API_KEY}"},
}


@pytest.fixture(scope="module")
def url(tmp_path_factory, tiny_llama_dir: Path) -> Iterator[str]:
    with serve_in_thread(tmp_path_factory.mktemp("sec"), tiny_llama_dir, api_key=API_KEY) as (u, _):
        yield u


@pytest.mark.parametrize("how", list(BAD_AUTH))
@pytest.mark.parametrize("method,path", ADMIN_CALLS)
def test_admin_refuses_bad_tokens(url: str, method: str, path: str, how: str, category) -> None:
    category("security/admin-token")
    r = httpx.request(method, url + path, headers=BAD_AUTH[how], timeout=30)
    assert r.status_code == 401, r.text
    assert r.headers.get("www-authenticate") == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_inference_api_key_when_set(url: str, category) -> None:
    category("security/api-key")
    body = {"model": "x", "prompt": "hi"}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 401
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert httpx.get(f"{url}/v1/models", headers=bad, timeout=30).status_code == 401
    assert (
        httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30).status_code == 401
    )  # admin != key
    ok = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{url}/v1/models", headers=ok, timeout=30).status_code == 200
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200  # operations stay open


def test_an_empty_api_key_leaves_inference_open(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch, category
) -> None:
    """``DAREX_API_KEY=`` (a blank line of an .env) is no key, not a demand for an empty
    bearer token that no client can send."""
    category("security/api-key")
    from server.settings import Settings

    monkeypatch.setenv("DAREX_API_KEY", "")
    assert Settings().api_key is None
    assert Settings(api_key="  ").api_key is None
    assert Settings(api_key=API_KEY).api_key.get_secret_value() == API_KEY
    with serve_in_thread(tmp_path, tiny_llama_dir, api_key="") as (u, _):
        assert httpx.get(f"{u}/v1/models", timeout=30).status_code == 200


def test_default_admin_token_refused_in_production(
    tmp_path: Path, tiny_llama_dir, category
) -> None:
    category("security/admin-token")
    from server.settings import Settings

    s = Settings(env="production", data_dir=tmp_path, base=str(tiny_llama_dir))
    with pytest.raises(ValueError, match="DAREX_ADMIN_TOKEN"):
        s.check_serving()
    # a blank token (the .env.example line left empty) is refused too; it would otherwise
    # start a server whose /admin no bearer can open
    for blank in ("", "  "):
        s = Settings(env="production", data_dir=tmp_path, admin_token=blank)
        with pytest.raises(ValueError, match="DAREX_ADMIN_TOKEN is unset, blank or the default"):
            s.check_serving()
    Settings(env="production", data_dir=tmp_path, admin_token="s3cret").check_serving()


def test_tokens_compared_in_constant_time(category) -> None:
    """Every comparison of a secret goes through hmac.compare_digest, never ``==``."""
    category("security/admin-token")
    src = (ROOT / "server/api/auth.py").read_text()
    assert "hmac.compare_digest" in src
    for p in (ROOT / "server").rglob("*.py"):
        text = p.read_text()
        bad = re.findall(
            r"(?:token|api_key|secret)\w*\s*[!=]=|[!=]=\s*\w*(?:token|api_key)\b", text
        )
        bad = [b for b in bad if "None" not in b]
        assert not bad, f"{p.relative_to(ROOT)} compares a secret with ==: {bad}"


def _calls(tree: ast.AST) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(call: ast.Call) -> str:
    f = call.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def test_no_pickle_is_ever_loaded(category) -> None:
    """torch.load only with weights_only=True; no pickle/joblib/dill/np.load(allow_pickle)."""
    category("security/no-pickle")
    problems = []
    for p in CODE:
        tree = ast.parse(p.read_text(), str(p))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(
                    m.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "shelve", "marshal")
                    for m in mods
                ):
                    problems.append(f"{p.relative_to(ROOT)}:{node.lineno} imports a pickle module")
        for call in _calls(tree):
            name, kw = _name(call), {k.arg: k.value for k in call.keywords}
            if name.endswith("torch.load") or (name == "load" and "weights_only" in kw):
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(
                        f"{p.relative_to(ROOT)}:{call.lineno} torch.load without weights_only=True"
                    )
            if name.endswith(("np.load", "numpy.load")):
                ap = kw.get("allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    problems.append(
                        f"{p.relative_to(ROOT)}:{call.lineno} np.load(allow_pickle=True)"
                    )
            if name.endswith(("pickle.load", "pickle.loads", "Unpickler")):
                problems.append(f"{p.relative_to(ROOT)}:{call.lineno} {name}")
    assert not problems, "\n".join(problems)


def test_routes_never_open_a_client_named_path(category) -> None:
    """The HTTP layer opens files only under its own upload folder, named by the server."""
    category("security/paths")
    api = ROOT / "server/api"
    for p in api.rglob("*.py"):
        tree = ast.parse(p.read_text())
        for call in _calls(tree):
            name = _name(call)
            opens = name in ("open", "os.open") or name.endswith(
                (".open", ".read_text", ".read_bytes", "safe_open", "from_pretrained")
            )
            # upload.py writes parts into a folder it made, under names it sanitised
            assert not opens or p.name == "upload.py", f"{p.relative_to(ROOT)}:{call.lineno} {name}"


def test_upload_ignores_client_paths(url: str, tmp_path: Path, category) -> None:
    """Form fields that look like paths (base, path, data_dir) are not options: no file is read."""
    category("security/paths")
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not for the server")
    data = {"model_id": "p", "path": str(secret), "base": str(secret.parent), "data_dir": "/"}
    r = httpx.post(
        f"{url}/admin/models",
        headers=AUTH,
        data=data,
        files=[("files", ("config.json", b"{}"))],
        timeout=30,
    )
    assert r.status_code == 422 and "safetensors" in r.json()["error"]["message"], r.text
