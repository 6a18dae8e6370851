"""Exceptions raised by pruning/. Messages name the tensor and say expected vs actual."""


class PruningError(ValueError):
    """Base class: bad input to a pruning routine."""


class ShapeMismatch(PruningError):
    """Base and fine-tuned tensors differ in name set, shape or dtype."""


class NonFiniteDelta(PruningError):
    """A tensor holds NaN or Inf."""
