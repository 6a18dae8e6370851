"""The Redis registry backend (``redis://``), shared by replicas.

Keys (``prefix`` defaults to ``darex``)::

    <prefix>:models           hash  model_id -> manifest key
    <prefix>:models:version   int   INCR on every model change
    <prefix>:models:changed   pubsub channel, publishes the new version
    <prefix>:job:<id>         hash  job fields, expires after a week
    <prefix>:registry:id      str   the registry's id (``Registry.registry_id``)

Notifications are best effort: a change is committed before it is published, and a
lost message is caught by the replicas' poll of the version counter, so a failed
publish is logged, not raised (the caller would retry a change already made).
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import redis
from pydantic import ValidationError

from storage.errors import (
    ModelExists,
    RegistryCorrupt,
    RegistryUnavailable,
    UnknownJob,
    UnknownModel,
)
from storage.registry import JOB_TTL_S, Job, JobState, Registry, _job_fields

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _redis_errors(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except redis.ResponseError as e:
            if "WRONGTYPE" not in str(e):
                raise RegistryUnavailable(f"Redis registry failed in {fn.__name__}: {e}") from e
            prefix = getattr(args[0], "prefix", "darex") if args else "darex"
            raise RegistryCorrupt(
                f"Redis registry failed in {fn.__name__}: {e}; a {prefix}: key holds another "
                f"type than this version writes: does another program use the {prefix}: "
                "keys of this Redis database?"
            ) from e
        except redis.RedisError as e:
            raise RegistryUnavailable(f"Redis registry failed in {fn.__name__}: {e}") from e

    return wrapper


class RedisRegistry(Registry):
    def __init__(self, url: str, *, prefix: str = "darex", timeout_s: float = 2.0) -> None:
        self.url = url
        self.prefix = prefix
        self._r = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
        )
        self._models = f"{prefix}:models"
        self._version = f"{prefix}:models:version"
        self.channel = f"{prefix}:models:changed"
        # HSET only if the job's hash still exists, in one step: a check then a write could
        # recreate an expired job as a partial hash with no TTL
        self._update_job = self._r.register_script(
            "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end "
            "redis.call('HSET', KEYS[1], unpack(ARGV)) return 1"
        )
        # the version grows (and replicas are told) only when the models hash changed, as
        # in SQLite: a refused registration or a delete that found nothing changes nothing
        self._insert = self._r.register_script(
            "if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end "
            "return redis.call('INCR', KEYS[2])"
        )
        # ARGV[2]: the manifest key the id must still point at ('' for any)
        self._delete = self._r.register_script(
            "local cur = redis.call('HGET', KEYS[1], ARGV[1]) "
            "if not cur or (ARGV[2] ~= '' and cur ~= ARGV[2]) then return 0 end "
            "redis.call('HDEL', KEYS[1], ARGV[1]) "
            "return redis.call('INCR', KEYS[2])"
        )

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @_redis_errors
    def set_model(self, model_id: str, manifest_key: str, *, replace: bool = False) -> None:
        if replace:
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(self._models, model_id, manifest_key)
            pipe.incr(self._version)
            _, version = pipe.execute()
        else:
            version = int(
                self._insert(keys=[self._models, self._version], args=[model_id, manifest_key])
            )
            if not version:
                raise ModelExists(f"model {model_id!r} is already registered")
        self._publish(version, model_id)

    def _publish(self, version: int, model_id: str) -> None:
        try:
            self._r.publish(self.channel, version)
        except redis.RedisError as e:
            log.warning(
                "registry change %d committed but not published (%s); replicas see it at "
                "their next poll",
                version,
                e,
                extra={"model_id": model_id},
            )

    @_redis_errors
    def get_model(self, model_id: str) -> str:
        key = self._r.hget(self._models, model_id)
        if key is None:
            raise UnknownModel(f"model {model_id!r} is not registered")
        return str(key)

    @_redis_errors
    def delete_model(self, model_id: str, *, expected: str | None = None) -> bool:
        keys, args = [self._models, self._version], [model_id, expected or ""]
        version = int(self._delete(keys=keys, args=args))
        if version:
            self._publish(version, model_id)
        return bool(version)

    @_redis_errors
    def list_models(self) -> dict[str, str]:
        return dict(sorted(self._r.hgetall(self._models).items()))

    @_redis_errors
    def version(self) -> int:
        raw = self._r.get(self._version)
        try:
            return int(raw or 0)
        except ValueError:
            raise RegistryCorrupt(
                f"Redis key {self._version} holds {raw!r}, not a counter: does another "
                f"program use the {self.prefix}: keys of this Redis database?"
            ) from None

    @_redis_errors
    def registry_id(self, *, create: bool = False) -> str | None:
        key = f"{self.prefix}:registry:id"
        rid = self._r.get(key)
        if rid is None and create:
            pipe = self._r.pipeline(transaction=True)
            pipe.set(key, uuid.uuid4().hex, nx=True)
            pipe.get(key)
            _, rid = pipe.execute()
        return None if rid is None else str(rid)

    @_redis_errors
    def create_job(self, model_id: str, message: str = "") -> Job:
        now = time.time()
        job = Job(id=uuid.uuid4().hex, model_id=model_id, message=message, created=now, updated=now)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._job(job.id), mapping=_to_redis(job.model_dump()))
        pipe.expire(self._job(job.id), JOB_TTL_S)
        pipe.execute()
        return job

    @_redis_errors
    def update_job(
        self,
        job_id: str,
        *,
        state: JobState | None = None,
        progress: float | None = None,
        message: str | None = None,
        error: str | None = None,
    ) -> Job:
        fields = _to_redis(_job_fields(state, progress, message, error))
        args = [x for kv in fields.items() for x in kv]
        if not self._update_job(keys=[self._job(job_id)], args=args):
            raise UnknownJob(f"job {job_id!r} does not exist")
        return self.get_job(job_id)

    @_redis_errors
    def get_job(self, job_id: str) -> Job:
        raw = self._r.hgetall(self._job(job_id))
        if not raw:
            raise UnknownJob(f"job {job_id!r} does not exist")
        if raw.get("error") == "":
            raw["error"] = None
        try:
            return Job.model_validate(raw)
        except ValidationError as e:
            raise RegistryCorrupt(
                f"job {job_id!r}: its record in Redis is not one this version reads "
                f"({e.error_count()} bad field(s), e.g. {e.errors()[0]['loc']})"
            ) from None

    @_redis_errors
    def ping(self) -> bool:
        return bool(self._r.ping())

    def close(self) -> None:
        self._r.close()


def _to_redis(fields: dict[str, object]) -> dict[str, str | float]:
    return {k: ("" if v is None else v) for k, v in fields.items()}  # type: ignore[misc]
