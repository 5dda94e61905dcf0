"""How many directions of an activation covariance stand above the Marchenko–Pastur bulk.

RMT-KD (arXiv 2509.15724, method.md §6) reads a hidden width's covariance ``C`` (d × d,
estimated from n activation rows) as a sample covariance: signal directions are the eigenvalues
above the edge of the MP law that the noise part follows. Two facts of real activations break
the textbook sample, and both are corrected here (issue 10, defect 13):

**The mean.** The MP law is that of a *centred* sample covariance. An uncentred second moment
``E[h hᵀ] = Σ + μμᵀ`` has one extra spike of size ``‖μ‖²`` (a mean of 0.5 per unit over 256
units puts it at 64 times the noise level), so the rule is given the covariance
``Σ = E[h hᵀ] − μμᵀ``.

**Correlated samples.** The rows are tokens of a sequence (or positions of an image);
neighbours are correlated, so n rows carry less information than n independent ones. Let the
noise of every unit have the same autocorrelation ρ(k) along the sequence up to scale
(separable: ``Cov(h_t, h_s) = Σ ρ(t − s)``; on an image the product of a row and a column
autocorrelation). Then the covariance of n correlated rows has the spectrum of a sample
covariance whose *rows* have population covariance ``A`` (the Toeplitz matrix of ρ), and its
upper edge follows from the Silverstein–Bai equation (Bai & Silverstein, *Spectral Analysis of
Large Dimensional Random Matrices*, 2010, §6): with y = n/d and ``f(ω) = Σ_k ρ(k) e^{ikω}`` the
spectral density of the sequence (the eigenvalue distribution of ``A``),

    ``edge = (d/n) · min_{−1/max f < m < 0} ( −1/m + y · E_ω[ f / (1 + f m) ] )``.

The rule is run with the *effective sample size* ``n_eff`` for which the MP law has that very
edge, ``(1 + sqrt(d/n_eff))² = edge`` (:func:`effective_sample_size`); the MP law of ``n_eff``
rows also keeps the mean eigenvalue (the noise variance), only the shape of the bulk between
is approximate. For small d/n this is Bartlett's (1946) ``n / Σ_k ρ(k)²`` (by Parseval
``E[f²] = Σ ρ(k)²``, the variance factor of a sample covariance of correlated series); for
AR(1) noise with ρ = 0.6 that factor is ``(1 + ρ²)/(1 − ρ²) = 2.125``.

ρ is the unit-averaged autocorrelation: for two units with autocorrelations ρ_x, ρ_y the
variance of their sample covariance scales with ``Σ ρ_x(k) ρ_y(k)``, whose average over pairs
of units is ``Σ ρ̄(k)²``. It is truncated at the first lag whose estimate is within two
standard errors of zero (:func:`truncated_autocorrelation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.rmt.thresholds import RankChoice, choose_rank

__all__ = ["activation_rank", "effective_sample_size", "truncated_autocorrelation"]

# Frequencies at which a spectral density is sampled (per axis).
_GRID = 512


def truncated_autocorrelation(
    autocorrelation: Sequence[float] | np.ndarray, n_pairs: Sequence[float] | np.ndarray
) -> np.ndarray:
    """ρ(1..K): the lags before the first one indistinguishable from zero.

    ``autocorrelation[k-1]`` is the unit-averaged lag-``k`` autocorrelation estimated from
    ``n_pairs[k-1]`` pairs of rows. The sequence stops before the first lag whose ``|ρ(k)|`` is
    within two standard errors of zero (``2 / sqrt(n_pairs)``, that of one autocorrelation
    estimate of independent rows): beyond it the estimates are noise, and keeping them would
    only add spurious correlation (Geyer's initial-sequence truncation for MCMC).
    """
    rho = np.asarray(autocorrelation, dtype=np.float64).reshape(-1)
    pairs = np.asarray(n_pairs, dtype=np.float64).reshape(-1)
    if rho.shape != pairs.shape:
        raise InvalidOptionError("one pair count per autocorrelation lag is needed")
    if not np.isfinite(rho).all():
        raise NumericalError("the activation autocorrelations contain NaN or Inf")
    keep = 0
    while keep < rho.size and pairs[keep] >= 1 and abs(rho[keep]) > 2.0 / np.sqrt(pairs[keep]):
        keep += 1
    return np.clip(rho[:keep], -1.0, 1.0)


def _spectral_density(rho: np.ndarray) -> np.ndarray:
    """``f(ω) = 1 + 2 Σ_k ρ(k) cos kω`` at the midpoints of a grid on (0, π), clipped at 0 and
    rescaled to mean 1 (a truncated sum can dip below zero; the mean is the variance)."""
    omega = (np.arange(_GRID) + 0.5) * np.pi / _GRID
    lags = np.arange(1, rho.size + 1)
    f = 1.0 + 2.0 * np.cos(np.outer(omega, lags)) @ rho
    f = np.clip(f, 0.0, None)
    return f / f.mean()


def _upper_edge(density: np.ndarray, ratio: float) -> float:
    """The upper edge of the spectrum of ``(1/n) X Xᵀ`` (unit variance) for rows whose
    correlation has eigenvalue distribution ``density``; ``ratio`` = d/n."""
    y = 1.0 / ratio
    top = float(density.max())

    def x(m: float) -> float:
        return -1.0 / m + y * float(np.mean(density / (1.0 + density * m)))

    # x is convex on (−1/top, 0) and tends to +∞ at both ends: golden-section search.
    lo, hi = -1.0 / top * (1 - 1e-12), -1e-12
    golden = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    for _ in range(200):
        if x(a) < x(b):
            hi = b
        else:
            lo = a
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    return ratio * x((lo + hi) / 2.0)


def effective_sample_size(
    n_samples: int, dimension: int, autocorrelations: Sequence[np.ndarray] = ()
) -> float:
    """The number of independent rows whose MP edge equals that of ``n_samples`` correlated ones.

    ``autocorrelations`` are the truncated autocorrelations (:func:`truncated_autocorrelation`)
    of each axis the rows run along (one for tokens, two for the rows and columns of an image;
    none, or all empty, for independent rows, which gives ``n_samples``). See the module
    docstring for the edge equation. At most ``n_samples``.
    """
    n, d = float(n_samples), int(dimension)
    if n < 1 or d < 1:
        raise InvalidOptionError(f"need at least one sample and one unit; got n={n}, d={d}")
    axes = [np.asarray(r, dtype=np.float64) for r in autocorrelations if len(r)]
    if not axes:
        return n
    density = np.ones(1)
    for rho in axes:
        density = np.multiply.outer(density, _spectral_density(rho)).reshape(-1)
    edge = _upper_edge(density, d / n)
    root = np.sqrt(max(edge, 1.0)) - 1.0
    if root <= 0:
        return n
    return float(min(n, d / root**2))


def activation_rank(
    second_moment: Any,
    n_samples: float,
    *,
    tau: float = 0.5,
    estimator: str = "mp_fit",
    eps: float = float(np.finfo(np.float32).eps),
) -> RankChoice:
    """The number of directions of an activation covariance above the Marchenko–Pastur bulk.

    ``second_moment`` is the *centred* second moment (the covariance ``Σ h̃ h̃ᵀ / n`` of rows
    ``h̃ = h − μ``; see the module docstring for why not the uncentred one), as a numpy array or
    anything ``numpy.asarray`` reads (a CPU tensor); ``n_samples`` the number of independent
    rows it was estimated from (pass :func:`effective_sample_size` for correlated rows; it is
    rounded down). The singular values of the ``d × n`` centred activation matrix are
    ``sqrt(n · λ)``, so this is :func:`~laserrmt.rmt.thresholds.choose_rank` with the MP rule on
    shape ``(d, n)``; ``tau`` is the quantile the bulk fit starts from (RMT-KD's compression
    knob) and ``estimator`` the noise estimator (``"mp_fit"`` or ``"veraart"``). ``eps`` is the
    relative precision of the activations (float32 by default; a bfloat16 model's are
    coarser): directions below it are exact zeros, the bulk of a noise-free low-rank site.
    """
    c = np.asarray(second_moment, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise InvalidOptionError(f"a second moment must be square; got shape {c.shape}")
    if not np.isfinite(c).all():
        raise NumericalError("the activation second moment contains NaN or Inf")
    # Rounding makes the smallest eigenvalues of a PSD matrix slightly negative.
    eigenvalues = np.clip(np.linalg.eigvalsh((c + c.T) / 2)[::-1], 0.0, None)
    d, n = c.shape[0], max(int(n_samples), 1)
    # With fewer (effective) samples than features MP has only n non-zero eigenvalues.
    return choose_rank(
        np.sqrt(n * eigenvalues[: min(d, n)]),
        (d, n),
        "mp",
        estimator=estimator,
        quantile=tau,
        eps=eps,
    )
