"""Deciding what is signal: rank choice from the singular values of one matrix.

:func:`choose_rank` is the entry point; it returns a :class:`RankChoice`, a plain value that
prints and saves as JSON. The rules (``method``), all on the singular values s of an m×n
matrix, N = max(m, n), p = min(m, n), β = p/N:

``"mp"``
    keep s > σ̂(√N + √p), the Marchenko–Pastur edge (Marchenko & Pastur 1967). It is the edge of
    the limiting law, not a test: the top value of finite pure noise lies above it in 13–16 %
    of draws with σ known and 18–22 % with σ̂ from median matching (30×90 to 2048×2048;
    :func:`laserrmt.rmt.null.edge_false_positive_rate` gives the rate for any shape). Use
    ``"tw"`` for a rule whose false-positive rate is a chosen α.
``"tw"``
    keep s > σ̂·sqrt(L), the Tracy–Widom edge at level α (Johnstone 2001): pure Gaussian noise
    keeps a direction with probability α. With σ known L = μ + t_{1−α}σ_TW; with σ̂ estimated L
    also carries the spread of σ̂ (:func:`laserrmt.rmt.null.tracy_widom_level`), without which
    the rate is about 2α (10.5 % at α = 0.05 on 100×100 noise).
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

Every :class:`RankChoice` carries a ``status`` (:data:`RANK_STATUSES`) that says whether the
rule could speak at all; when it could not, the rank is the full rank (nothing is removed):

``"ok"``
    the rule applied.
``"too_short"``
    fewer than :data:`MIN_SPECTRUM` = 5 values: too few for any statement about a noise bulk
    (Johnstone 2001 finds the Tracy–Widom approximation informative from n, p = 5 on). Every
    rule but ``"fixed"`` says so; ``"fixed"`` keeps its fraction, since it makes no claim about
    noise.
``"no_bulk"``
    σ was estimated (``"mp"``, ``"tw"``, ``"gd"``) and the spectrum has no noise bulk under
    its median: more than :data:`MAX_SHARE_BELOW_BULK` of it lies far below the MP bulk of the
    median-matching σ̂ (:func:`laserrmt.rmt.marchenko_pastur.mp_share_below_bulk`), or some
    values are exactly zero while most are not. Every σ estimator assumes that most values are
    noise; a matrix of rank ≥ p/2 with little or no noise breaks that, and median matching then
    cut a noise-free rank-150 200×200 matrix to rank 48. A bulk that is noise but not exactly
    MP-shaped (heteroscedastic rows, anisotropic activations, heavy tails) stays ``"ok"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from laserrmt.errors import InvalidOptionError
from laserrmt.rmt._checks import check_scale, check_spectrum
from laserrmt.rmt.marchenko_pastur import marchenko_pastur_edge, mp_median, mp_share_below_bulk
from laserrmt.rmt.noise import (
    SIGMA_ESTIMATORS,
    estimate_sigma,
    sigma_laserrmt_iqr,
    sigma_median_matching,
)
from laserrmt.rmt.null import tracy_widom_level
from laserrmt.rmt.tracy_widom import tracy_widom_edge, tracy_widom_quantile

__all__ = [
    "MAX_SHARE_BELOW_BULK",
    "MIN_SPECTRUM",
    "RANK_STATUSES",
    "THRESHOLD_METHODS",
    "RankChoice",
    "choose_rank",
    "gavish_donoho_lambda",
    "gavish_donoho_omega",
    "gavish_donoho_threshold",
    "laserrmt_threshold",
]

THRESHOLD_METHODS: tuple[str, ...] = ("mp", "tw", "gd", "laserrmt", "fixed")
RANK_STATUSES: tuple[str, ...] = ("ok", "too_short", "no_bulk")
#: Fewest singular values a noise rule speaks about (Johnstone, Ann. Statist. 2001: the TW
#: approximation is informative for n and p as small as 5).
MIN_SPECTRUM = 5
#: Largest :func:`~laserrmt.rmt.marchenko_pastur.mp_share_below_bulk` still read as a noise
#: bulk: noise of many kinds stays at or below 0.05 (0.13 for p = 8), a noise-free matrix of rank
#: r ≥ p/2 is at (p − r)/p, so this flags rank up to 80 % of p.
MAX_SHARE_BELOW_BULK = 0.2


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
        status: one of :data:`RANK_STATUSES`; when not ``"ok"`` the rule could not tell signal
            from noise, ``rank`` is the full rank and ``edge`` is 0 (see the module docstring).
    """

    rank: int
    sigma: float
    edge: float
    method: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    status: str = "ok"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain ints, floats and strings)."""
        return {
            "rank": int(self.rank),
            "sigma": float(self.sigma),
            "edge": float(self.edge),
            "method": self.method,
            "options": dict(self.options),
            "status": self.status,
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
    eps: float = float(np.finfo(np.float64).eps),
) -> RankChoice:
    """Choose how many singular values of an m×n matrix are signal.

    Args:
        singular_values: all min(m, n) singular values, any order (sorted here): a numpy
            array, a sequence, or a torch tensor of any dtype (bfloat16 included).
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
        eps: the relative precision of the numbers the spectrum was computed from
            (``numpy.finfo(dtype).eps`` of the weights or activations, float64 by default):
            values below ``s_max · max(shape) · eps`` are exact zeros at that precision
            (numpy's matrix-rank tolerance), never noise.

    Returns:
        A :class:`RankChoice`; its ``status`` says whether the rule could judge the spectrum
        (``"too_short"``, ``"no_bulk"``: full rank, nothing removed; see the module docstring).

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
        laser_options = {"estimator": "iqr", "reproduction": True}
        if small < MIN_SPECTRUM:
            return RankChoice(small, sigma_hat, 0.0, method, laser_options, "too_short")
        rank = int(np.count_nonzero(s > edge))
        return RankChoice(rank, sigma_hat, edge, method, laser_options)

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

    if method == "tw":
        options = {**options, "alpha": alpha, "tw_quantile": tracy_widom_quantile(1.0 - alpha)}
    if small < MIN_SPECTRUM:
        return RankChoice(small, float(sigma_hat), 0.0, method, options, "too_short")
    if sigma is None and not _has_noise_bulk(s, shape, eps):
        return RankChoice(small, float(sigma_hat), 0.0, method, options, "no_bulk")

    if method == "mp":
        edge = marchenko_pastur_edge(shape, sigma_hat)
    elif method == "tw":
        if sigma is None:
            level = tracy_widom_level(shape, alpha, estimator, **estimator_options)
            edge = sigma_hat * math.sqrt(level)
        else:
            edge = tracy_widom_edge(shape, sigma_hat, alpha)
    else:  # gd
        if sigma is None and estimator == "median":
            edge = gavish_donoho_omega(beta) * float(np.median(s))
        else:
            edge = gavish_donoho_lambda(beta) * math.sqrt(big) * sigma_hat
    rank = int(np.count_nonzero(s > edge))
    return RankChoice(rank, float(sigma_hat), float(edge), method, options)


def _has_noise_bulk(s: np.ndarray, shape: tuple[int, int], eps: float) -> bool:
    """Whether the descending spectrum ``s`` has the noise bulk that an estimated σ̂ presumes.

    The bulk is read at the median-matching scale whatever the rule's estimator: the question
    is whether the lower half of the spectrum is a noise bulk at all, and the median is where
    every estimator's premise (most values are noise) puts noise. Another estimator's σ̂ can sit
    off the median on a bulk that is noise but not exactly MP-shaped (anisotropic activations),
    which is not what this check is about.
    """
    small = s.size
    # Exact zeros (numpy's matrix-rank tolerance) are no noise value. As the majority they are
    # the bulk (σ̂ ≈ 0 and the rule keeps the non-zero values, the exact rank); as a minority
    # the median, hence σ̂, is read off signal values.
    nonzero = int(np.count_nonzero(s > s[0] * max(shape) * eps))
    if nonzero < small:
        return nonzero <= small / 2
    return mp_share_below_bulk(s, shape, sigma_median_matching(s, shape)) <= MAX_SHARE_BELOW_BULK
