"""Errors raised for bad input, before anything is compiled.

Every error names the offending field (``section.key`` for config values,
``data.<name>`` for data problems) and what would have been allowed, so the
CLI can print it as one line and exit with status 2.
"""

from __future__ import annotations


class FedKDError(ValueError):
    """Base class for user-facing input errors."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ConfigError(FedKDError):
    """A configuration value is unknown, mistyped or out of range."""


class DataError(FedKDError):
    """The data cannot be federated as requested (NaN, bad labels, empty clients...)."""


class CheckpointError(FedKDError):
    """Saved checkpoints cannot be used (all damaged, or they no longer match the code)."""


def concrete(value) -> bool:
    """Whether ``value`` is a plain number (not a traced hyperparameter of a batched sweep).

    Factories check ranges only on concrete values; a sweep's traced values
    were checked by the config before tracing.
    """
    import numbers

    import numpy as np

    return isinstance(value, (numbers.Number, np.number)) or (isinstance(value, np.ndarray) and value.ndim == 0)
