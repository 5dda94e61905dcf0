"""Deciding what is signal: rank choice from the singular values of one matrix.

:func:`choose_rank` is the entry point; it returns a :class:`RankChoice`, a plain value that
prints and saves as JSON. The rules (``method``), all on the singular values s of an m×n
matrix, N = max(m, n), p = min(m, n), β = p/N:

``"mp"``
    keep s > σ̂(√N + √p), the Marchenko–Pastur edge (Marchenko & Pastur 1967).
``"tw"``
    keep s > σ̂·sqrt(μ + t_{1−α}σ_TW), the Tracy–Widom edge at level α (Johnstone 2001): pure
    noise passes it with probability α.
``"gd"``
    Gavish & Donoho's optimal hard threshold (IEEE T-IT 2014): τ = λ*(β)·√N·σ for known σ,
    τ = ω(β)·median(s) otherwise; optimal in mean squared error, so it sits above the edge.
``"laserrmt"``
    the original laserRMT project's rule, σ̂ = IQR(s)/1.349 and threshold σ̂(1 + √β).
    **Reproduction only**: it is not consistent (it keeps about 242 of 1024 values of pure
    1024×1024 noise and all 1024 of 1024×4096 noise, where the noise edge keeps none).
``"fixed"``
    keep a fraction of the rank regardless of the spectrum, as LASER (ICLR 2024) does.

The chosen rank does not change when the matrix is multiplied by c > 0 or transposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from laserrmt.errors import InvalidOptionError
from laserrmt.rmt._checks import check_scale, check_spectrum
from laserrmt.rmt.marchenko_pastur import marchenko_pastur_edge, mp_median
from laserrmt.rmt.noise import SIGMA_ESTIMATORS, estimate_sigma, sigma_laserrmt_iqr
from laserrmt.rmt.tracy_widom import tracy_widom_edge, tracy_widom_quantile

__all__ = [
    "THRESHOLD_METHODS",
    "RankChoice",
    "choose_rank",
    "gavish_donoho_lambda",
    "gavish_donoho_omega",
    "gavish_donoho_threshold",
    "laserrmt_threshold",
]

THRESHOLD_METHODS: tuple[str, ...] = ("mp", "tw", "gd", "laserrmt", "fixed")


@dataclass(frozen=True)
class RankChoice:
    """The outcome of a rank rule on one spectrum.

    Attributes:
        rank: number of singular values kept (the largest ones).
        sigma: noise entry scale σ used or reported (see :func:`choose_rank` per method).
        edge: the singular-value threshold: kept values are those above it, except for
            ``"fixed"``, where it is the smallest kept value.
        method: one of :data:`THRESHOLD_METHODS`.
        options: the effective options of the rule (estimator, alpha, fraction, …).
    """

    rank: int
    sigma: float
    edge: float
    method: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain ints, floats and strings)."""
        return {
            "rank": int(self.rank),
            "sigma": float(self.sigma),
            "edge": float(self.edge),
            "method": self.method,
            "options": dict(self.options),
        }


def gavish_donoho_lambda(beta: float) -> float:
    """λ*(β) = sqrt(2(β+1) + 8β / ((β+1) + sqrt(β² + 14β + 1))): the optimal threshold for
    known noise, in units of √N·σ (Gavish & Donoho, IEEE T-IT 2014, eq. (11)); 4/√3 at β = 1.
    """
    beta = _check_beta(beta)
    return math.sqrt(
        2.0 * (beta + 1.0)
        + 8.0 * beta / ((beta + 1.0) + math.sqrt(beta * beta + 14.0 * beta + 1.0))
    )


def gavish_donoho_omega(beta: float) -> float:
    """ω(β) = λ*(β) / sqrt(μ_β): the optimal threshold for unknown noise, in units of median(s).

    Gavish & Donoho (IEEE T-IT 2014), eq. (21); ω ≈ 0.56β³ − 0.95β² + 1.82β + 1.43.
    Values: 2.858 (β = 1), 2.171 (0.5), 1.837 (0.25).
    """
    return gavish_donoho_lambda(beta) / math.sqrt(mp_median(beta))


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not (0.0 < beta <= 1.0):
        raise InvalidOptionError(f"beta = min(m, n) / max(m, n) must lie in (0, 1]; got {beta!r}")
    return beta


def gavish_donoho_threshold(
    singular_values: Any, shape: tuple[int, int], sigma: float | None = None
) -> float:
    """Gavish–Donoho hard threshold τ: λ*(β)·√N·σ for known σ, else ω(β)·median(s).

    N is the larger dimension, as in the paper (code that uses the smaller one thresholds too
    low for non-square matrices).
    """
    s, big, _, beta = check_spectrum(singular_values, shape)
    if sigma is not None:
        return gavish_donoho_lambda(beta) * math.sqrt(big) * check_scale(sigma)
    return gavish_donoho_omega(beta) * float(np.median(s))


def laserrmt_threshold(singular_values: Any, shape: tuple[int, int]) -> tuple[float, float]:
    """The original laserRMT rule: ``(sigma, threshold)`` with σ̂ = IQR(s)/1.349 and σ̂(1 + √β).

    **Reproduction only** (see :func:`laserrmt.rmt.noise.sigma_laserrmt_iqr`): the threshold
    lacks the √N of the singular-value scale and σ̂ is not an MP estimate, so it over-keeps.
    """
    s, _, _, beta = check_spectrum(singular_values, shape)
    sigma = sigma_laserrmt_iqr(s)
    return sigma, sigma * (1.0 + math.sqrt(beta))


def _option_error(name: str, value: Any, valid: str) -> InvalidOptionError:
    return InvalidOptionError(f"{name} must be {valid}; got {value!r}")


def choose_rank(
    singular_values: Any,
    shape: tuple[int, int],
    method: str = "mp",
    *,
    sigma: float | None = None,
    estimator: str = "median",
    alpha: float = 0.05,
    fraction: float | None = None,
    quantile: float = 0.5,
    bins: int | None = None,
) -> RankChoice:
    """Choose how many singular values of an m×n matrix are signal.

    Args:
        singular_values: all min(m, n) singular values, any order (sorted here).
        shape: ``(m, n)`` of the matrix.
        method: one of :data:`THRESHOLD_METHODS` (see the module docstring).
        sigma: known noise entry scale; when ``None`` it is estimated with ``estimator``.
            Not accepted by ``"laserrmt"``, which reproduces a rule that estimates it itself.
        estimator: noise estimator for ``"mp"``, ``"tw"``, ``"gd"`` and the σ reported by
            ``"fixed"``: one of ``median``, ``mp_fit``, ``veraart``, ``iqr``
            (see :mod:`laserrmt.rmt.noise`). For ``"gd"`` with ``median`` the threshold is
            ω(β)·median(s), which equals λ*(β)·√N·σ̂ with the median-matching σ̂; another
            estimator plugs its σ̂ into the known-σ formula.
        alpha: significance level of ``"tw"``, in (0, 1).
        fraction: share of the rank kept by ``"fixed"``, in (0, 1]; the rank is
            fraction·p rounded half up, at least 1. Only ``"fixed"`` takes it.
        quantile, bins: options of the ``mp_fit`` estimator.

    Returns:
        A :class:`RankChoice`.

    Raises:
        InvalidOptionError: unknown method or estimator, an option out of range, or a spectrum
            whose length is not min(shape).
        NumericalError: NaN, Inf or negative singular values.
    """
    if method not in THRESHOLD_METHODS:
        raise InvalidOptionError(
            f"unknown threshold method {method!r}; choose one of {', '.join(THRESHOLD_METHODS)}"
        )
    if estimator not in SIGMA_ESTIMATORS:
        raise InvalidOptionError(
            f"unknown noise estimator {estimator!r}; choose one of {', '.join(SIGMA_ESTIMATORS)}"
        )
    alpha = float(alpha)
    if not (0.0 < alpha < 1.0):
        raise _option_error("alpha", alpha, "a significance level in (0, 1), e.g. 0.05")
    quantile = float(quantile)
    if not (0.0 < quantile < 1.0):
        raise _option_error("quantile", quantile, "in (0, 1) (RMT-KD uses 0.4-0.6)")
    if fraction is not None and method != "fixed":
        raise InvalidOptionError(
            f"fraction applies only to method='fixed' (got method={method!r}); drop it or "
            "use method='fixed'"
        )
    if bins is not None and estimator != "mp_fit":
        raise InvalidOptionError(
            f"bins applies only to estimator='mp_fit' (got estimator={estimator!r}); drop it"
        )
    if sigma is not None:
        if method == "laserrmt":
            raise InvalidOptionError(
                "method='laserrmt' reproduces a rule that estimates sigma itself; drop sigma "
                "or use method='mp'"
            )
        sigma = check_scale(sigma)

    s, big, small, beta = check_spectrum(singular_values, shape)

    if method == "laserrmt":
        sigma_hat, edge = laserrmt_threshold(s, shape)
        rank = int(np.count_nonzero(s > edge))
        return RankChoice(rank, sigma_hat, edge, method, {"estimator": "iqr", "reproduction": True})

    estimator_options: dict[str, Any] = {}
    if estimator == "mp_fit":
        estimator_options = {"quantile": quantile} | ({} if bins is None else {"bins": bins})
    options: dict[str, Any] = (
        {"sigma": "given"} if sigma is not None else {"estimator": estimator, **estimator_options}
    )
    sigma_hat = (
        sigma if sigma is not None else estimate_sigma(s, shape, estimator, **estimator_options)
    )

    if method == "fixed":
        if fraction is None:
            raise InvalidOptionError(
                "method='fixed' needs fraction, the share of the rank to keep in (0, 1], e.g. 0.2"
            )
        fraction = float(fraction)
        if not (0.0 < fraction <= 1.0):
            raise _option_error("fraction", fraction, "in (0, 1], the share of the rank to keep")
        # Half up (not Python's banker's rounding), and at least one direction: rank 0 would
        # delete the layer, which no fraction > 0 asks for.
        rank = max(1, math.floor(fraction * small + 0.5))
        return RankChoice(
            rank, sigma_hat, float(s[rank - 1]), method, {"fraction": fraction, **options}
        )

    if method == "mp":
        edge = marchenko_pastur_edge(shape, sigma_hat)
    elif method == "tw":
        edge = tracy_widom_edge(shape, sigma_hat, alpha)
        options = {**options, "alpha": alpha, "tw_quantile": tracy_widom_quantile(1.0 - alpha)}
    else:  # gd
        if sigma is None and estimator == "median":
            edge = gavish_donoho_omega(beta) * float(np.median(s))
        else:
            edge = gavish_donoho_lambda(beta) * math.sqrt(big) * sigma_hat
    rank = int(np.count_nonzero(s > edge))
    return RankChoice(rank, float(sigma_hat), float(edge), method, options)
