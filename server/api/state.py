"""What the app holds while it runs: settings, engine, scheduler, store, metrics, ingest pool."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from server.api.metrics import Metrics
from server.scheduler import Scheduler
from server.settings import Settings


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine: Any = None
    scheduler: Scheduler | None = None
    store: Any = None
    base: Any = None  # storage.bases.BaseInfo of the resident base
    jobs: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="darex-ingest")
    )
    started: float = field(default_factory=time.time)
    heartbeat: Any = None  # server.api.jobs.JobHeartbeat while serving
    # model_id -> id of its upload's job, while that job is queued or running here
    ingesting: dict[str, str] = field(default_factory=dict)
    ingesting_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_id(self) -> str:
        return getattr(self.engine, "base_name", None) or self.settings.base

    def target(self, model: str) -> str | None:
        """The scheduler key for a request's ``model``: None for the base's own id."""
        return None if model == self.base_id else model
