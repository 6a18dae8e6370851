"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import StateDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """Ready when the base is loaded, its weights are trusted (no swap kernel failed
    without the base being restored and verified), the scheduler runs and the registry
    answers."""
    eng = state.engine
    checks: dict[str, str] = {
        "base": "loaded" if eng is not None else "loading",
        "weights": "ok" if eng is None or eng.broken is None else f"corrupt: {eng.broken}",
        "scheduler": "running" if state.scheduler is not None else "stopped",
    }
    try:
        if state.store is None:
            raise RuntimeError("not open")
        await asyncio.to_thread(state.store.registry.ping)
        checks["registry"] = "ok"
    except Exception as e:
        checks["registry"] = f"unavailable: {e}"
    ok = (
        checks["base"] == "loaded"
        and checks["weights"] == "ok"
        and checks["scheduler"] == "running"
        and checks["registry"] == "ok"
    )
    body = {"status": "ready" if ok else "not ready", "base": state.base_id, "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
