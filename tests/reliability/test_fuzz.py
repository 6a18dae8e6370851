"""Property-based fuzzing of the live app's own OpenAPI schema with schemathesis.

Every operation gets generated requests (valid and invalid bodies, odd path parameters,
the admin token sent); the checks: never a 5xx, and a documented status returns a body
that matches its schema. Examples per operation are bounded so the run takes about a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from storage.bases import resolve_base
from storage.ingest import ingest
from storage.store import DeltaStore
from tests.reliability.live import AUTH, serve_in_thread

EXAMPLES = 60


@pytest.fixture(scope="module")
def fuzz_url(tmp_path_factory, tiny_llama_dir: Path, good_ft_dir: Path) -> Iterator[str]:
    data = tmp_path_factory.mktemp("fuzz")
    store = DeltaStore(data)
    ingest(
        store, "good", good_ft_dir, resolve_base(tiny_llama_dir, data), p=0.9, show_progress=False
    )
    store.close()
    with serve_in_thread(data, tiny_llama_dir, max_new_tokens=8) as (url, _app):
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzz_url: str):
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def not_a_server_error(ctx, response, case) -> bool:
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    )
    return True


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_fuzz(case, fuzz_url: str) -> None:
    case.call_and_validate(
        base_url=fuzz_url,
        headers=AUTH,
        timeout=60,
        checks=[not_a_server_error, response_schema_conformance, content_type_conformance],
    )
