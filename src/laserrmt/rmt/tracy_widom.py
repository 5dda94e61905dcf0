"""The Tracy–Widom law TW₁: fluctuations of the largest eigenvalue of a real Gaussian matrix.

Tracy & Widom (Commun. Math. Phys. 1996) express the distribution through the Hastings–McLeod
solution of Painlevé II,

    q''(x) = x q(x) + 2 q(x)³,   q(x) ~ Ai(x) as x → +∞,

as F₂(x) = exp(−∫ₓ^∞ (t − x) q(t)² dt) and F₁(x) = sqrt(F₂(x)) · exp(−½ ∫ₓ^∞ q(t) dt).
The solution is integrated once from x = 8, where q is Ai to double precision, down to x = −9
(the backward integration is unstable much further down: any error in the Ai coefficient
grows into a pole; at −9 F₁ is below 1e-16 anyway), with tight tolerances, and kept as a dense
interpolant (Edelman & Persson, arXiv math/0501068, use the same formulation).

Johnstone (Ann. Statist. 2001) showed that for an n×p real Gaussian matrix X with unit entry
variance, the largest eigenvalue ℓ₁ of XᵀX satisfies (ℓ₁ − μ)/σ → TW₁ with
μ = (√(n−1) + √p)² and σ = (√(n−1) + √p)(1/√(n−1) + 1/√p)^{1/3}; the approximation is already
good for n, p of a few tens. A singular value is significant at level α when it exceeds
σ̂ · sqrt(μ + t_{1−α} σ_TW), t the TW₁ quantile.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import brentq
from scipy.special import airy

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.rmt._checks import check_scale, check_shape

__all__ = [
    "johnstone_centering",
    "tracy_widom_cdf",
    "tracy_widom_edge",
    "tracy_widom_pdf",
    "tracy_widom_quantile",
]

# Where q = Ai to double precision (Ai(8)² ≈ 2e-15 is the relative size of the cubic term).
_X_RIGHT = 8.0
# Below this the backward integration starts to feel the instability; F₁(−9) < 1e-16.
_X_LEFT = -9.0
# Past this F₁ rounds to 1 in double precision.
_X_FAR_RIGHT = 14.0
_GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(48)


def _airy_tail(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """q, I = ∫ₓ^∞ (t−x) q², I' = −∫ₓ^∞ q² and J = ∫ₓ^∞ q for q = Ai (valid for x ≥ 8).

    Closed forms from the Airy equation: ∫ₓ^∞ Ai² = Ai'² − x Ai², and
    ∫ₓ^∞ (t − x) Ai² = (2x² Ai² − 2x Ai'² − Ai Ai') / 3.
    """
    ai, aip, _, _ = airy(x)
    big_i = (2.0 * x * x * ai * ai - 2.0 * x * aip * aip - ai * aip) / 3.0
    big_ip = -(aip * aip - x * ai * ai)
    # Ai(x + 6) / Ai(x) < e^-27 for x ≥ 8, so ∫ₓ^{x+6} Ai is ∫ₓ^∞ Ai to double precision; Ai
    # is smooth there and Gauss–Legendre is exact to round-off. (scipy's itairy is inaccurate
    # at these arguments.)
    nodes, weights = _GAUSS_LEGENDRE
    t = x[:, None] + 3.0 * (nodes[None, :] + 1.0)
    j = 3.0 * (airy(t)[0] @ weights)
    return ai, big_i, big_ip, j


@lru_cache(maxsize=1)
def _hastings_mcleod() -> Any:
    """Dense solution of y = (q, q', I, I', J) on [−9, 8]."""

    def rhs(x: float, y: np.ndarray) -> list[float]:
        q, qp, _, big_ip, _ = y
        return [qp, x * q + 2.0 * q**3, big_ip, q * q, -q]

    x0 = np.array([_X_RIGHT])
    q0, i0, ip0, j0 = (float(v[0]) for v in _airy_tail(x0))
    qp0 = float(airy(x0)[1][0])
    sol = solve_ivp(
        rhs,
        (_X_RIGHT, _X_LEFT),
        [q0, qp0, i0, ip0, j0],
        method="DOP853",
        rtol=1e-13,
        atol=1e-22,
        dense_output=True,
    )
    if not sol.success:  # pragma: no cover - fixed problem, fixed tolerances
        raise NumericalError(f"the Painlevé II integration for Tracy–Widom failed: {sol.message}")
    return sol.sol


def _log_cdf_and_rate(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log F₁(x) and d log F₁ / dx for x in [−9, ∞)."""
    log_f = np.empty_like(x)
    rate = np.empty_like(x)
    right = x >= _X_RIGHT
    if np.any(right):
        q, big_i, big_ip, j = _airy_tail(x[right])
        log_f[right] = -0.5 * (big_i + j)
        rate[right] = 0.5 * (q - big_ip)
    mid = ~right
    if np.any(mid):
        q, _, big_i, big_ip, j = _hastings_mcleod()(x[mid])
        log_f[mid] = -0.5 * (big_i + j)
        rate[mid] = 0.5 * (q - big_ip)
    return log_f, rate


def tracy_widom_cdf(x: Any) -> np.ndarray:
    """F₁(x), the TW₁ distribution function (β = 1, real matrices).

    From the dense Painlevé II solution on [−9, 8] and in closed form (Airy) above 8; it
    reproduces the published quantiles and moments to 4 digits (the tests check them).
    Below −9 it returns 0, an absolute error under 1e-16.
    """
    arr = np.asarray(x, dtype=np.float64)
    if np.any(np.isnan(arr)):
        raise NumericalError("tracy_widom_cdf got NaN input")
    flat = arr.reshape(-1)
    out = np.zeros_like(flat)
    ok = flat >= _X_LEFT
    if np.any(ok):
        log_f, _ = _log_cdf_and_rate(np.minimum(flat[ok], 2.0 * _X_FAR_RIGHT))
        out[ok] = np.exp(log_f)
    return out.reshape(arr.shape)


def tracy_widom_pdf(x: Any) -> np.ndarray:
    """The TW₁ density F₁'(x) = F₁(x) · ½ (q(x) + ∫ₓ^∞ q²) (0 below −9)."""
    arr = np.asarray(x, dtype=np.float64)
    if np.any(np.isnan(arr)):
        raise NumericalError("tracy_widom_pdf got NaN input")
    flat = arr.reshape(-1)
    out = np.zeros_like(flat)
    ok = flat >= _X_LEFT
    if np.any(ok):
        log_f, rate = _log_cdf_and_rate(np.minimum(flat[ok], 2.0 * _X_FAR_RIGHT))
        out[ok] = np.exp(log_f) * rate
    return out.reshape(arr.shape)


@lru_cache(maxsize=1)
def _quantile_table() -> tuple[np.ndarray, np.ndarray]:
    """F₁ on a grid, to bracket quantile roots without scanning."""
    grid = np.linspace(_X_LEFT, _X_FAR_RIGHT, 2301)
    return grid, tracy_widom_cdf(grid)


@lru_cache(maxsize=1024)
def _quantile(prob: float) -> float:
    grid, cdf = _quantile_table()
    # Above 1 − 1e-12 the upper tail 1 − F₁ is resolved to fewer than four digits in doubles.
    if not (cdf[0] < prob <= 1.0 - 1e-12):
        raise InvalidOptionError(
            f"TW₁ quantile level {prob!r} is outside the range computed in double precision "
            f"[{cdf[0]:.0e}, 1 - 1e-12]; use a significance level alpha in [1e-12, 1)"
        )
    k = int(np.searchsorted(cdf, prob))
    return float(
        brentq(
            lambda t: float(tracy_widom_cdf(t)) - prob,
            grid[k - 1],
            grid[k],
            xtol=1e-12,
            rtol=1e-12,
        )
    )


def tracy_widom_quantile(p: float) -> float:
    """The TW₁ quantile t with F₁(t) = p (root finding on a cached grid; results cached).

    Values: 0.90 → 0.4501, 0.95 → 0.9793, 0.99 → 2.0234. Mean −1.2065, sd 1.2680.
    """
    p = float(p)
    if not (0.0 < p < 1.0):
        raise InvalidOptionError(f"a quantile level must lie in (0, 1); got {p!r}")
    return _quantile(p)


def johnstone_centering(n: int, p: int) -> tuple[float, float]:
    """Johnstone's (2001) centring μ and scaling σ_TW for the largest eigenvalue of XᵀX.

    For an n×p real Gaussian matrix with unit-variance entries, (ℓ₁ − μ)/σ_TW → TW₁ with
    μ = (√(n−1) + √p)² and σ_TW = (√(n−1) + √p)(1/√(n−1) + 1/√p)^{1/3}. For a weight matrix pass
    n = N (the larger dimension) and p (the smaller), so that the result does not depend on
    the matrix orientation.

    Returns:
        ``(mu, sigma_tw)``.
    """
    n, p = int(n), int(p)
    if n < 2 or p < 1:
        raise InvalidOptionError(f"Johnstone's centring needs n >= 2 and p >= 1; got n={n}, p={p}")
    a, b = math.sqrt(n - 1), math.sqrt(p)
    return (a + b) ** 2, (a + b) * (1.0 / a + 1.0 / b) ** (1.0 / 3.0)


def tracy_widom_edge(shape: tuple[int, int], sigma: float = 1.0, alpha: float = 0.05) -> float:
    """Singular-value threshold σ·sqrt(μ + t_{1−α} σ_TW): noise of entry scale exactly σ exceeds
    it with probability α. With σ estimated from the same spectrum the rate is about 2α; use
    :func:`laserrmt.rmt.null.tracy_widom_level` then (``choose_rank(..., "tw")`` does).

    Args:
        shape: ``(m, n)`` of the matrix, either orientation (N = max, p = min are used).
        sigma: entry standard deviation of the noise.
        alpha: significance level in (0, 1).
    """
    big, small, _ = check_shape(shape)
    sigma = check_scale(sigma)
    alpha = float(alpha)
    if not (0.0 < alpha < 1.0):
        raise InvalidOptionError(f"alpha is a significance level in (0, 1); got {alpha!r}")
    if big < 2:
        raise InvalidOptionError(
            f"the Tracy–Widom edge needs a matrix with at least 2 rows or columns; got {shape!r}"
        )
    mu, scale = johnstone_centering(big, small)
    # With alpha near 1 on a tiny matrix the eigenvalue level can fall below 0: every
    # non-negative eigenvalue then exceeds it, which is an edge of 0.
    level = mu + tracy_widom_quantile(1.0 - alpha) * scale
    return sigma * math.sqrt(max(level, 0.0))
