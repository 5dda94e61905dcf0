"""How many directions of an activation covariance stand above the Marchenko–Pastur bulk.

RMT-KD (arXiv 2509.15724, method.md §6) reads a hidden width's covariance ``C`` (d × d,
estimated from n activation rows) as a sample covariance: signal directions are the eigenvalues
above the edge of the MP law that the noise part follows. Two facts of real activations break
the textbook sample, and both are corrected here (issue 10, defect 13):

**The mean.** The MP law is that of a *centred* sample covariance. An uncentred second moment
``E[h hᵀ] = Σ + μμᵀ`` has one extra spike of size ``‖μ‖²`` (a mean of 0.5 per unit over 256
units puts it at 64 times the noise level), so the rule is given the covariance
``Σ = E[h hᵀ] − μμᵀ``.

**Correlated samples.** The rows are tokens of a sequence (or positions of an image); neighbours
are correlated, so n rows carry less information than n independent ones. For two units whose
noise has autocorrelation ρ_x(k), ρ_y(k) along the sequence, the variance of their sample
covariance is ``(1/n) Σ_k ρ_x(k) ρ_y(k)`` times that of independent rows (Bartlett 1946);
averaged over pairs of units with a common mean autocorrelation ρ̄(k) this is ``Σ_k ρ̄(k)²``.
The spread of the noise eigenvalues, which sets the MP edge, is that of the entries, so the
rule uses the *effective sample size* ``n_eff = n / Σ_{|k|≤K} ρ̄(k)²``
(:func:`effective_sample_size`). Assumed: the noise correlation along the sequence is the same
for every unit up to scale (separable: ``Cov(h_t, h_s) = Σ ρ̄(t − s)``), and on an image it is
the product of the row and column autocorrelations. For AR(1) noise with ρ = 0.6,
``Σ ρ^{2|k|} = (1 + ρ²)/(1 − ρ²) = 2.125``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.rmt.thresholds import RankChoice, choose_rank

__all__ = ["activation_rank", "correlation_factor", "effective_sample_size"]


def correlation_factor(
    autocorrelation: Sequence[float] | np.ndarray, n_pairs: Sequence[int]
) -> float:
    """``1 + 2 Σ_{k=1}^{K} ρ̄(k)²``: how many correlated rows are worth one independent row.

    ``autocorrelation[k-1]`` is the unit-averaged lag-``k`` autocorrelation estimated from
    ``n_pairs[k-1]`` pairs of rows. The sum stops before the first lag whose ``|ρ̄(k)|`` is
    within two standard errors of zero (``2 / sqrt(n_pairs)``, the standard error of one
    autocorrelation estimate of independent rows): beyond it the estimates are noise, and adding
    their squares would only bias the factor upwards (Geyer's initial-sequence truncation).
    """
    rho = np.asarray(autocorrelation, dtype=np.float64).reshape(-1)
    pairs = np.asarray(n_pairs, dtype=np.float64).reshape(-1)
    if rho.shape != pairs.shape:
        raise InvalidOptionError("one pair count per autocorrelation lag is needed")
    if not np.isfinite(rho).all():
        raise NumericalError("the activation autocorrelations contain NaN or Inf")
    factor = 1.0
    for value, count in zip(rho, pairs, strict=True):
        if count < 1 or abs(value) <= 2.0 / np.sqrt(count):
            break
        factor += 2.0 * min(float(value) ** 2, 1.0)
    return factor


def effective_sample_size(n_samples: int, factors: Sequence[float] = ()) -> float:
    """``n / Π_axes factor``: the number of independent rows ``n`` correlated rows are worth.

    ``factors`` are :func:`correlation_factor` of each axis the rows run along (one for tokens,
    two for the rows and columns of an image; none for independent rows).
    """
    total = float(np.prod([float(f) for f in factors])) if len(factors) else 1.0
    if not total >= 1.0:
        raise InvalidOptionError(f"a correlation factor is at least 1; got {total}")
    return max(float(n_samples) / total, 1.0)


def activation_rank(
    second_moment: Any,
    n_samples: float,
    *,
    tau: float = 0.5,
    estimator: str = "mp_fit",
) -> RankChoice:
    """The number of directions of an activation covariance above the Marchenko–Pastur bulk.

    ``second_moment`` is the *centred* second moment (the covariance ``Σ h̃ h̃ᵀ / n`` of rows
    ``h̃ = h − μ``; see the module docstring for why not the uncentred one), as a numpy array or
    anything ``numpy.asarray`` reads (a CPU tensor); ``n_samples`` the number of independent
    rows it was estimated from (pass :func:`effective_sample_size` for correlated rows; it is
    rounded down). The singular values of the ``d × n`` centred activation matrix are
    ``sqrt(n · λ)``, so this is :func:`~laserrmt.rmt.thresholds.choose_rank` with the MP rule on
    shape ``(d, n)``; ``tau`` is the quantile the bulk fit starts from (RMT-KD's compression
    knob) and ``estimator`` the noise estimator (``"mp_fit"`` or ``"veraart"``).
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
        np.sqrt(n * eigenvalues[: min(d, n)]), (d, n), "mp", estimator=estimator, quantile=tau
    )
