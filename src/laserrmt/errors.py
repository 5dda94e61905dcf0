"""Errors a user can act on.

Every exception raised for a user's input is a :class:`LaserRMTError` whose message is one line
that says what is wrong and what to do. The CLI prints that line and exits non-zero; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LaserRMTError(Exception):
    """Base class: the message is shown to the user as it is."""

    exit_code = 2


class ModelLoadError(LaserRMTError):
    """A model path, file or hub id that cannot be loaded safely."""


class TargetSelectionError(LaserRMTError):
    """A target pattern that matches nothing, or a module that cannot be a target."""


class InvalidOptionError(LaserRMTError):
    """An option value outside what the method accepts (unknown threshold, bad fraction...)."""


class NumericalError(LaserRMTError):
    """Weights or statistics with NaN/Inf, or a factorization that failed."""


class PlanError(LaserRMTError):
    """A compression plan that does not fit the model it is applied to."""


class BudgetError(LaserRMTError):
    """A parameter or size budget that cannot be met."""


class OutputExistsError(LaserRMTError):
    """An output folder that exists already and was not allowed to be replaced."""


class DataError(LaserRMTError):
    """A data set or text file that is missing or unusable."""


class DeviceError(LaserRMTError):
    """A device or dtype that this machine or this computation cannot use."""
