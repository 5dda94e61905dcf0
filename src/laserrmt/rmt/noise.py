"""Estimators of the noise level σ (entry standard deviation) from the singular values of a matrix.

All take the singular values ``s`` of an m×n matrix and its ``shape``; they work on the
eigenvalues λ = s²/N (N = max(m, n), p = min(m, n), β = p/N), which follow the
Marchenko–Pastur law with ratio β and scale σ² for pure noise. Every estimator is
scale-equivariant (σ̂(c·s) = c·σ̂(s)) and does not depend on the orientation of the matrix.

* :func:`sigma_median_matching` (Gavish & Donoho 2014): match the median. Robust to a few spikes;
  biased upwards by about k/(2p) quantile levels when k of the p values are spikes.
* :func:`sigma_mp_fit` (WeightWatcher; RMT-KD, arXiv 2509.15724): quantile start, then a
  least-squares fit of the eigenvalue histogram to the MP law.
* :func:`sigma_veraart` (Veraart et al., NeuroImage 2016, MP-PCA): the largest set of small
  eigenvalues, at least half of them, whose spread matches the MP width of its own mean;
  self-consistent.
* :func:`sigma_laserrmt_iqr`: the original laserRMT project's IQR/1.349. Not consistent for
  MP spectra; a reproduction mode only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from laserrmt.errors import InvalidOptionError
from laserrmt.rmt._checks import check_spectrum, check_values
from laserrmt.rmt.marchenko_pastur import mp_cdf, mp_median, mp_quantile

__all__ = [
    "SIGMA_ESTIMATORS",
    "estimate_sigma",
    "sigma_laserrmt_iqr",
    "sigma_median_matching",
    "sigma_mp_fit",
    "sigma_veraart",
]

SIGMA_ESTIMATORS: tuple[str, ...] = ("median", "mp_fit", "veraart", "iqr")

# Normal-distribution IQR in units of its standard deviation, as used by laserRMT.
_NORMAL_IQR = 1.349


def sigma_median_matching(s: Any, shape: tuple[int, int]) -> float:
    """σ̂ = median(s) / sqrt(N · μ_β), μ_β the median of the MP law with σ = 1.

    Gavish & Donoho, "The optimal hard threshold for singular values is 4/√3", IEEE T-IT 2014,
    eq. (20). A matrix with more than half of its singular values exactly 0 gives σ̂ = 0.
    """
    values, big, _, beta = check_spectrum(s, shape)
    return float(np.median(values)) / math.sqrt(big * mp_median(beta))


def _check_quantile(quantile: float) -> float:
    quantile = float(quantile)
    if not (0.0 < quantile < 1.0):
        raise InvalidOptionError(
            f"quantile must lie in (0, 1) (RMT-KD uses 0.4-0.6, default 0.5); got {quantile!r}"
        )
    return quantile


def sigma_mp_fit(
    s: Any, shape: tuple[int, int], quantile: float = 0.5, bins: int | None = None
) -> float:
    """σ̂ from a least-squares fit of the eigenvalue histogram to the Marchenko–Pastur law.

    The procedure of WeightWatcher and RMT-KD (arXiv 2509.15724): the start σ₀ matches the
    ``quantile`` of λ = s²/N to the same quantile of the MP law (``quantile=0.5`` is median
    matching); then σ is refined by least squares between the fraction of eigenvalues in each
    histogram bin and the MP probability of that bin, over a window around the σ₀ bulk
    ([0.8 λ₋(σ₀), 1.25 λ₊(σ₀)]). Bin probabilities come from the exact CDF, so the square-root
    singularity at 0 for β = 1 does not bias the fit. RMT-KD uses ``quantile`` (τ ∈ [0.4, 0.6])
    as its compression knob: it sets the start and the window, and so decides which local fit
    is found when the spectrum is not a clean MP bulk.

    Args:
        s: singular values of the m×n matrix.
        shape: ``(m, n)``.
        quantile: τ in (0, 1) for the start.
        bins: number of histogram bins; default clip(√p, 10, 100).

    Returns:
        σ̂ (0 when the τ-quantile of the spectrum is exactly 0, i.e. a rank-deficient matrix).
    """
    values, big, small, beta = check_spectrum(s, shape)
    quantile = _check_quantile(quantile)
    if bins is None:
        bins = int(np.clip(round(math.sqrt(small)), 10, 100))
    elif int(bins) != bins or bins < 2:
        raise InvalidOptionError(f"bins must be an integer >= 2; got {bins!r}")
    bins = int(bins)
    lam = values * values / big
    start_var = float(np.quantile(lam, quantile)) / mp_quantile(quantile, beta)
    if start_var == 0.0:
        return 0.0
    # Units of σ₀² make the fit scale-free: the parameter is r = σ²/σ₀², starting at 1.
    u = lam / start_var
    root = math.sqrt(beta)
    edges = np.linspace(0.8 * (1.0 - root) ** 2, 1.25 * (1.0 + root) ** 2, bins + 1)
    observed = np.histogram(u, bins=edges)[0] / small

    def residuals(r: np.ndarray) -> np.ndarray:
        return np.diff(mp_cdf(edges, beta, math.sqrt(r[0]))) - observed

    fit = least_squares(residuals, x0=[1.0], bounds=([0.25], [4.0]), xtol=1e-10, ftol=1e-12)
    return math.sqrt(start_var * float(fit.x[0]))


def sigma_veraart(s: Any, shape: tuple[int, int]) -> float:
    """σ̂ by Veraart's MP-PCA rule (Veraart et al., NeuroImage 142, 2016, "Denoising of diffusion
    MRI using random matrix theory").

    With eigenvalues λ = s²/N sorted ascending, L[0] ≤ … ≤ L[p−1], a candidate noise set is
    L[0..c]; it is consistent with Marchenko–Pastur when its spread fits the MP width of its own
    mean, L[c] − L[0] ≤ 4 · sqrt((c+1)/N) · mean(L[0..c]) (λ₊ − λ₋ = 4√γ σ²). As in the paper
    the number of signal components is the smallest P for which the noise set of the other
    p − P values passes, i.e. the noise set is the *largest* consistent c, and σ̂² is its mean.
    (Growing c from the bottom and stopping at the first failure does not work for β near 1:
    there the few smallest eigenvalues, near λ₋ = 0, fail the test although they are noise.)

    Only noise sets holding at least half of the values are candidates, the majority-noise
    premise that median matching also makes. Without that floor a tiny set at the bottom always
    passes (c = 0 trivially), and a bulk wider than any MP law, e.g. noise whose rows have
    different scales, collapsed to it: σ̂ ≈ 0.0003 on a 500×500 matrix with rows scaled by
    U(0.5, 1.5), which keeps 499 of 500 values. When no majority set passes, the consistency
    search has no answer, and σ̂² is the mean of the values at or below the MP edge
    (1 + √β)²·m̄ of the mean m̄ of all values. For noise with a variance profile the mean
    eigenvalue is the average entry variance (tr WWᵀ / (Np)), the natural σ² of such a bulk;
    the cut drops the spikes standing above it, which would inflate m̄. (Iterating the cut to a
    fixed point would not stop there: on a bulk wider than MP each step trims its top again.)
    """
    values, big, small, beta = check_spectrum(s, shape)
    lam = np.sort(values * values / big)
    count = np.arange(1, lam.size + 1)
    means = np.cumsum(lam) / count
    consistent = lam - lam[0] <= 4.0 * np.sqrt(count / big) * means
    consistent[: (small + 1) // 2 - 1] = False
    if np.any(consistent):
        return math.sqrt(float(means[int(np.flatnonzero(consistent)[-1])]))
    below = lam[lam <= (1.0 + math.sqrt(beta)) ** 2 * means[-1]]
    return math.sqrt(float(below.mean()))


def sigma_laserrmt_iqr(s: Any) -> float:
    """σ̂ = IQR(s) / 1.349, the noise estimate of the original laserRMT project.

    **Reproduction only.** 1.349 is the IQR of a unit normal, but singular values of a noise
    matrix do not follow a normal law centred at 0, so this is not a consistent estimator of
    the entry scale σ: with laserRMT's threshold σ̂(1 + √β) it keeps 242 of 1024 values of a pure
    1024×1024 Gaussian matrix and all 1024 of a 1024×4096 one. Use it only to compare with
    laserRMT; use :func:`sigma_median_matching` or :func:`sigma_veraart` otherwise.
    Quartiles are numpy's default (linear interpolation), as in laserRMT.
    """
    values = check_values(s)
    q75, q25 = np.percentile(values, [75.0, 25.0])
    return float(q75 - q25) / _NORMAL_IQR


def estimate_sigma(
    s: Any, shape: tuple[int, int], estimator: str = "median", **options: Any
) -> float:
    """Estimate the noise entry scale σ with one of :data:`SIGMA_ESTIMATORS`.

    Args:
        s: singular values of the m×n matrix.
        shape: ``(m, n)``.
        estimator: ``"median"`` (:func:`sigma_median_matching`), ``"mp_fit"``
            (:func:`sigma_mp_fit`), ``"veraart"`` (:func:`sigma_veraart`) or ``"iqr"``
            (:func:`sigma_laserrmt_iqr`, reproduction of laserRMT only).
        **options: ``quantile`` and ``bins`` for ``"mp_fit"``; no other estimator takes options.
    """
    if estimator not in SIGMA_ESTIMATORS:
        raise InvalidOptionError(
            f"unknown noise estimator {estimator!r}; choose one of {', '.join(SIGMA_ESTIMATORS)}"
        )
    if estimator == "mp_fit":
        unknown = set(options) - {"quantile", "bins"}
        if unknown:
            raise InvalidOptionError(
                f"mp_fit takes the options quantile and bins; got {', '.join(sorted(unknown))}"
            )
        return sigma_mp_fit(s, shape, **options)
    if options:
        raise InvalidOptionError(
            f"the {estimator} estimator takes no options; got {', '.join(sorted(options))} "
            "(quantile and bins apply to estimator='mp_fit')"
        )
    if estimator == "median":
        return sigma_median_matching(s, shape)
    if estimator == "veraart":
        return sigma_veraart(s, shape)
    check_spectrum(s, shape)
    return sigma_laserrmt_iqr(s)
