"""Input checks shared by the RMT functions: one place that turns bad input into one-line errors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from laserrmt.errors import InvalidOptionError, NumericalError


def check_shape(shape: Any) -> tuple[int, int, float]:
    """Validate an ``(m, n)`` matrix shape and return ``(N, p, beta)``: larger, smaller, p/N."""
    try:
        m, n = (int(d) for d in shape)
    except (TypeError, ValueError):
        raise InvalidOptionError(
            f"shape must be a pair (rows, columns) of positive integers; got {shape!r}"
        ) from None
    if m < 1 or n < 1:
        raise InvalidOptionError(f"shape must be a pair of positive integers; got {shape!r}")
    big, small = max(m, n), min(m, n)
    return big, small, small / big


def check_ratio(q: float, name: str = "q") -> float:
    """Validate an aspect ratio in (0, 1]."""
    q = float(q)
    if not (0.0 < q <= 1.0):
        raise InvalidOptionError(
            f"{name} is an aspect ratio min/max and must lie in (0, 1]; got {q!r} "
            "(swap the dimensions if it is above 1)"
        )
    return q


def check_scale(sigma: float, name: str = "sigma") -> float:
    """Validate a noise scale: finite and non-negative."""
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0.0:
        raise InvalidOptionError(f"{name} must be a finite number >= 0; got {sigma!r}")
    return sigma


def check_values(values: Any, name: str = "singular values") -> np.ndarray:
    """A 1-D float64 copy of ``values``; NaN, Inf or negative entries raise :class:`NumericalError`.

    Torch tensors of any dtype are accepted without importing torch: numpy cannot convert
    bfloat16, so anything with ``detach`` is turned into float64 by its own methods first.
    """
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        kind = getattr(values, "dtype", type(values).__name__)
        raise InvalidOptionError(
            f"{name} must be real numbers (a float array or tensor); got {kind}"
        ) from None
    if arr.ndim != 1:
        raise InvalidOptionError(f"{name} must be a 1-D array; got an array of shape {arr.shape}")
    if arr.size == 0:
        raise InvalidOptionError(f"{name} are empty; pass at least one value")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise NumericalError(
            f"{name} contain {bad} NaN/Inf entries; check the weight or statistic for overflow"
        )
    if np.any(arr < 0.0):
        raise NumericalError(
            f"{name} contain negative entries (min {arr.min():.3g}); pass singular values "
            "(non-negative), not signed eigenvalues"
        )
    return arr


def check_spectrum(singular_values: Any, shape: Any) -> tuple[np.ndarray, int, int, float]:
    """Singular values sorted descending, checked against ``shape``; returns ``(s, N, p, beta)``."""
    s = check_values(singular_values)
    big, small, beta = check_shape(shape)
    if s.size != small:
        raise InvalidOptionError(
            f"got {s.size} singular values for a {shape[0]}x{shape[1]} matrix, which has "
            f"min(m, n) = {small}; pass the full spectrum (not a truncated one) and the matrix shape"
        )
    return np.sort(s)[::-1], big, small, beta
