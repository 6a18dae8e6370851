"""Prometheus metrics, one registry per app (so several apps can live in one test process).

Counted as they happen: requests and latency by model and endpoint, swaps and
swap seconds, generated tokens. Read at scrape time from the engine and the
scheduler: cache hits/misses/bytes per tier, queue depth per model.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.logging import model_id_var, request_id_var

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SWAP_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class _LiveCollector(Collector):
    """Engine cache and scheduler queue, read when Prometheus scrapes."""

    def __init__(self, state: Callable[[], Any]) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        st = self.state()
        engine = getattr(st, "engine", None)
        sched = getattr(st, "scheduler", None)
        hits = CounterMetricFamily("darex_cache_hits", "Delta cache hits", labels=["tier"])
        misses = CounterMetricFamily("darex_cache_misses", "Delta cache misses", labels=["tier"])
        resident = GaugeMetricFamily(
            "darex_cache_bytes", "Bytes of decoded deltas resident", labels=["tier"]
        )
        if engine is not None:
            stats = engine.cache_stats()
            for tier in ("device", "host"):
                t = stats.get(tier) or {}
                hits.add_metric([tier], float(t.get("hits", 0)))
                misses.add_metric([tier], float(t.get("misses", 0)))
                resident.add_metric([tier], float(t.get("bytes", 0)))
        yield hits
        yield misses
        yield resident
        depth = GaugeMetricFamily(
            "darex_queue_depth", "Requests queued per model", labels=["model"]
        )
        if sched is not None:
            for model, n in sched.queue_depth().items():
                depth.add_metric([model or "base"], float(n))
        yield depth


class Metrics:
    def __init__(self, state: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "darex_requests", "HTTP requests", ["model", "endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "darex_request_seconds",
            "HTTP request latency, to the last byte",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.swaps = Counter("darex_swaps", "Engine swaps", ["model"], registry=r)
        self.swap_seconds = Histogram(
            "darex_swap_seconds", "Time of one swap", buckets=SWAP_BUCKETS, registry=r
        )
        self.tokens = Counter("darex_generated_tokens", "Tokens generated", ["model"], registry=r)
        r.register(_LiveCollector(state))

    def on_swap(self, model_id: str | None, seconds: float) -> None:
        self.swaps.labels(model_id or "base").inc()
        self.swap_seconds.observe(seconds)


class RequestContextMiddleware:
    """Pure ASGI: request id in and out (``X-Request-ID``), latency and count by model."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:64]
        rid = rid or uuid.uuid4().hex
        request_id_var.set(rid)
        model_id_var.set(None)
        scope.setdefault("state", {})
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if status == 500 and scope["state"].get("client_left"):  # hung up mid-body
                status = 499
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            if endpoint != "/metrics":
                model = scope["state"].get("model_label", "-")
                seconds = time.perf_counter() - t0
                self.metrics.requests.labels(model, endpoint, str(status)).inc()
                self.metrics.latency.labels(model, endpoint).observe(seconds)
                if scope.get("path", "").startswith(("/v1/", "/admin/")):  # not the probes
                    extra = {
                        "model_id": (
                            scope.get("path_params", {}).get("model_id")  # /admin/models/{id}
                            if model == "-"
                            else model
                        ),
                        "endpoint": endpoint,
                        "method": scope.get("method"),
                        "status": status,
                        "seconds": round(seconds, 4),
                    }
                    log.info("%s %s %d", extra["method"], endpoint, status, extra=extra)
