"""The one configuration object. Every field reads ``DAREX_<NAME>`` from the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ADMIN_TOKEN = "change-me"
REGISTRY_SCHEMES = ("sqlite:///", "redis://", "rediss://", "unix://")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# pruning.sparse.MAX_RATE, the highest pruning rate, repeated for the server and the CLI:
# importing pruning loads torch, and settings and option checks come before anything
# heavy (tests/pruning/test_methods.py holds the two equal)
MAX_RATE = 0.999999


def rate_problem(*rates: float) -> str | None:
    """What is wrong with pruning rates outside [0, 1) (NaN too) or above ``MAX_RATE``, or
    None when all fit: the one wording of this check for every command and the upload."""
    bad = [r for r in rates if not 0.0 <= r < 1.0]
    if bad:
        return f"the pruning rate p must be in [0, 1), got {', '.join(map(str, bad))}"
    high = [r for r in rates if r > MAX_RATE]
    if high:
        return (
            f"the pruning rate p must be at most {MAX_RATE} (above it the 32-bit mask "
            f"cannot keep 1-p of the entries without bias), got {', '.join(map(str, high))}"
        )
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DAREX_", env_file=".env", extra="ignore")

    env: Literal["production", "development"] = Field(
        "production", description="'development' allows the default admin token."
    )
    data_dir: Path = Field(
        Path.home() / ".darex", description="Blob store, SQLite registry and converted bases."
    )
    base: str = Field(
        "minilm-l6", description="Resident base: a catalog name or a local HF folder."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when present.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Resident weights dtype; auto = float16 on cuda, float32 on cpu."
    )
    registry_url: str = Field(
        "", description="sqlite:///path or redis://host:port/db; empty = SQLite in data_dir."
    )
    registry_ttl_s: float = Field(
        2.0,
        gt=0,
        allow_inf_nan=False,
        description="How long a replica trusts its cached registry lookups.",
    )
    device_cache_bytes: int = Field(
        1 << 30, ge=0, description="Budget for decoded deltas kept on the device."
    )
    host_cache_bytes: int = Field(
        4 << 30, ge=0, description="Budget for decoded deltas in host memory."
    )
    admin_token: SecretStr = Field(
        SecretStr(DEFAULT_ADMIN_TOKEN), description="Bearer token for /admin."
    )
    api_key: SecretStr | None = Field(
        None, description="Optional bearer token for inference endpoints."
    )
    max_upload_bytes: int = Field(2 << 30, gt=0, description="Largest accepted upload.")
    max_tensors: int = Field(10_000, ge=1, description="Most tensors accepted in one checkpoint.")
    job_stale_s: float = Field(
        120.0,
        gt=0,
        allow_inf_nan=False,
        description="An ingest job silent this long was interrupted and reads as failed.",
    )
    max_batch_size: int = Field(8, ge=1, description="Requests of one model run together.")
    max_batches_per_turn: int = Field(
        4, ge=1, description="Batches of the active model before a waiting model gets the engine."
    )
    max_new_tokens: int = Field(512, ge=1, description="Upper bound on max_tokens per request.")
    max_queue: int = Field(
        256,
        ge=0,
        description="Requests waiting for the engine (all models together) before a new one "
        "is refused with 503 overloaded; 0 = no limit.",
    )
    default_rate: float = Field(
        0.99,
        ge=0.0,
        le=MAX_RATE,
        allow_inf_nan=False,
        description=f"Pruning rate used when an upload names none (0 <= p <= {MAX_RATE}).",
    )
    ray_models: int = Field(
        8, ge=1, description="Fine-tunes one Ray Serve replica keeps resident (model multiplexing)."
    )
    host: str = Field("127.0.0.1", description="Bind address of `darex serve`.")
    port: int = Field(8000, ge=0, le=65535, description="Port of `darex serve` (0 to 65535).")
    log_level: str = Field(
        "INFO", description="Python logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL."
    )
    log_json: bool = Field(True, description="One JSON object per log line.")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, v: object) -> object:
        """``DAREX_API_KEY=`` (as in an .env with the value left blank) means no key; else
        it would demand an empty bearer token, which no client can send."""
        if isinstance(v, SecretStr):
            v = v.get_secret_value()
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    @field_validator("admin_token", mode="before")
    @classmethod
    def _blank_token_is_the_default(cls, v: object) -> object:
        """``DAREX_ADMIN_TOKEN=`` (the blank line of .env.example) is no token: the default,
        which production refuses. Kept blank, no bearer could ever match it and every
        /admin call would be a 401 on a server that started normally."""
        if isinstance(v, SecretStr):
            v = v.get_secret_value()
        return DEFAULT_ADMIN_TOKEN if isinstance(v, str) and not v.strip() else v

    @field_validator("registry_url")
    @classmethod
    def _registry_scheme(cls, v: str) -> str:
        """Refused here, so that `darex config` reports it, not only the first store opened."""
        if v and not v.startswith(REGISTRY_SCHEMES):
            raise ValueError(
                "should be empty (SQLite in the data dir), sqlite:///path or "
                "redis://host:port/db (rediss://, unix:// too)"
            )
        if v.startswith("sqlite:///") and not v.removeprefix("sqlite:///").strip():
            raise ValueError("should name the SQLite file after sqlite:///, e.g. sqlite:///reg.db")
        if v.startswith(("redis://", "rediss://", "unix://")):
            from redis.connection import parse_url

            try:
                parse_url(v)
            except ValueError as e:  # a port that is not a number, a bad db, ...
                raise ValueError(f"is not a Redis URL redis-py can use: {e}") from None
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        level = v.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"should be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("base")
    @classmethod
    def _base_not_blank(cls, v: str) -> str:
        """``DAREX_BASE=`` would be read as the current folder, and refused as a checkpoint
        without config.json, which does not say that the variable was left blank."""
        if not v.strip():
            raise ValueError(
                "should be a catalog name or a model folder, not empty (unset it for minilm-l6)"
            )
        return v

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir_not_blank(cls, v: object) -> object:
        """``DAREX_DATA_DIR=`` would be the current folder: a store made wherever the
        command runs."""
        if isinstance(v, str) and not v.strip():
            raise ValueError("should be a folder path, not empty (unset it for ~/.darex)")
        return v

    def check_serving(self) -> None:
        """Refuse to serve with the default admin token outside development.

        Checked when a server starts, not on every CLI command: `darex ls` needs
        no token.
        """
        if self.env == "production" and self.admin_token.get_secret_value() == DEFAULT_ADMIN_TOKEN:
            raise ValueError(
                "DAREX_ADMIN_TOKEN is unset, blank or the default; set a secret token, "
                "or DAREX_ENV=development for local use"
            )

    @property
    def registry(self) -> str:
        return self.registry_url or f"sqlite:///{self.data_dir / 'registry.sqlite3'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


_SECRET_FIELDS = frozenset({"admin_token", "api_key"})


def describe_error(e: ValidationError) -> str:
    """A ``Settings`` validation error as one line, each bad field named by its variable:
    ``DAREX_PORT should be a valid integer, unable to parse string as an integer (got 'abc')``.
    """
    parts = []
    for err in e.errors(include_url=False):
        loc = err.get("loc") or ()
        field = str(loc[0]) if loc else ""
        name = f"DAREX_{field.upper()}" if field in Settings.model_fields else field or "settings"
        msg = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
        msg = "should " + msg.removeprefix("Input should ") if msg.startswith("Input ") else msg
        given = err.get("input")
        if field in _SECRET_FIELDS:
            got = ""
        else:
            shown = repr(str(given) if isinstance(given, Path) else given)
            got = f" (got {shown[:77] + '...' if len(shown) > 80 else shown})"
        parts.append(f"{name} {msg}{got}")
    return "; ".join(parts) or str(e).splitlines()[0]
