"""Exceptions raised by server/. One handler in ``server.api.errors`` maps them (and storage's)."""


class ServerError(Exception):
    """Base class for serving failures."""


class ModelRetired(ServerError):
    """The model is being deleted: it finishes its in-flight requests and accepts no new ones."""


class SchedulerClosed(ServerError):
    """The scheduler is shutting down and takes no more requests."""


class Overloaded(ServerError):
    """As many requests wait for the engine as ``DAREX_MAX_QUEUE`` allows: a new one is
    refused at once (503) rather than queued behind them."""


class ModelBusy(ServerError):
    """A delete waited for the model's requests and they did not finish in time; the model
    stays registered and served."""


class WrongTask(ServerError, ValueError):
    """The model exists but does not do what the endpoint asks (e.g. classify with a causal LM)."""


class InvalidRequest(ServerError, ValueError):
    """A request that is well-formed JSON but cannot be served (prompt too long, bad file set)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unauthorized(ServerError):
    """Missing or wrong bearer token."""


class PayloadTooLarge(ServerError):
    """An upload over the configured size limit."""


class NotReady(ServerError):
    """The base model is not loaded yet or the registry cannot be reached."""


class WeightsCorrupt(ServerError):
    """A swap kernel failed part-way and the base could not be restored and verified: the
    resident weights are neither the base nor a fine-tune, so nothing is served."""
