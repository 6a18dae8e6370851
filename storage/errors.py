"""Exceptions raised by storage/. The HTTP layer maps them to status codes."""


class StorageError(Exception):
    """Base class for store and registry failures."""


class UnknownModel(StorageError, KeyError):
    """No model is registered under this model_id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown model"


class UnknownBase(StorageError, KeyError):
    """The base model name is neither in the catalog nor a local folder."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown base"


class UnknownTask(StorageError, KeyError):
    """No task loader has this name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown task"


class InvalidModelId(StorageError, ValueError):
    """A model_id with path separators, '..', odd characters or too long."""


class BadCheckpoint(StorageError, ValueError):
    """A checkpoint that cannot be read or is refused (pickle, truncated header, ...)."""


class BaseMismatch(BadCheckpoint):
    """A checkpoint whose tensors do not match the base (names, shapes, dtypes)."""


class CorruptBlob(StorageError):
    """A blob whose bytes no longer hash to its key."""


class UnsupportedFormat(StorageError, ValueError):
    """A blob or manifest written by an unknown format version."""


class RegistryMismatch(StorageError):
    """The registry is not the one this store's models were registered in."""


class RegistryUnavailable(StorageError):
    """The registry backend (SQLite file or Redis) cannot be reached."""


class RegistryCorrupt(RegistryUnavailable):
    """The registry holds data this version cannot read (a Redis key of another type or
    value, a job record with bad fields): retrying does not help, someone must look."""


class RegistryFull(RegistryUnavailable):
    """The SQLite registry's disk is full: a write was refused (and rolled back)."""


class UnknownJob(StorageError, KeyError):
    """No ingest job has this id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown job"


class ModelExists(StorageError, ValueError):
    """A model is already registered under this model_id (and replacing was not asked for)."""


class IngestInProgress(StorageError, ValueError):
    """Another upload of this model_id is still being ingested."""

    def __init__(self, model_id: str, job_id: str | None) -> None:
        job = f"job {job_id} (GET /admin/jobs/{job_id})" if job_id else "a job being created"
        super().__init__(
            f"model {model_id!r} is being uploaded by {job}; wait for it to end, then upload "
            "again (with replace=true to overwrite its result)"
        )
        self.model_id, self.job_id = model_id, job_id
