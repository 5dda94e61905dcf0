"""Per-matrix spectral diagnostics: how much of a weight stands above its noise bulk.

All functions take singular values (any order) and return plain Python numbers. The heavy-tail
exponent α follows Martin & Mahoney (JMLR 2021, "Implicit self-regularization in deep neural
networks") and WeightWatcher, fitted by the method of Clauset, Shalizi & Newman (SIAM Review
2009); AlphaPruning (NeurIPS 2024) allocates per-layer budgets from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from laserrmt.errors import InvalidOptionError
from laserrmt.rmt._checks import check_scale, check_spectrum, check_values
from laserrmt.rmt.marchenko_pastur import marchenko_pastur_edge

if TYPE_CHECKING:
    from laserrmt.rmt.thresholds import RankChoice

__all__ = [
    "PowerLawFit",
    "mp_softrank",
    "n_spikes",
    "power_law_alpha",
    "snr",
    "spectral_entropy",
    "spectrum_diagnostics",
    "stable_rank",
]

# Fewest tail points for which a power-law MLE is worth reporting.
DEFAULT_MIN_TAIL = 10
# Candidate x_min rows processed at once: bounds the KS work array to about 32 MB.
_KS_BLOCK_ELEMENTS = 4_000_000


def snr(s: Any, edge: float) -> float:
    """Signal-to-noise ratio Σ_{s > edge} s / Σ_{s ≤ edge} s (laserRMT's SNR without its s_max
    normalisation, which made it depend on the scale of the weight).

    Returns ``inf`` when the values at or below the edge sum to 0 (nothing below the edge, or only
    exact zeros there) while some value is above it, and 0 when nothing is above the edge.
    """
    values = check_values(s)
    edge = float(edge)
    if math.isnan(edge):
        raise InvalidOptionError("edge is NaN; pass the threshold used to split signal from noise")
    return _mass_ratio(float(values[values > edge].sum()), float(values[values <= edge].sum()))


def _mass_ratio(signal: float, noise: float) -> float:
    if signal == 0.0:
        return 0.0
    return math.inf if noise == 0.0 else signal / noise


def spectral_entropy(s: Any, normalized: bool = True) -> float:
    """Shannon entropy of p_i = s_i² / Σ_j s_j².

    With ``normalized`` it is divided by log(len(s)), so it lies in [0, 1] (up to rounding, and
    not clipped: a value outside would be a bug to see, not to hide): 1 when all values are
    equal, 0 when one value carries everything. A single value, or an all-zero spectrum (a zero
    matrix has no directions), gives 0.
    """
    values = check_values(s)
    energy = values * values
    total = float(energy.sum())
    if total == 0.0 or values.size == 1:
        return 0.0
    prob = energy[energy > 0.0] / total
    entropy = float(-(prob * np.log(prob)).sum())
    if not normalized:
        return entropy
    return entropy / math.log(values.size)


def stable_rank(s: Any) -> float:
    """‖W‖_F² / ‖W‖₂² = Σ s_i² / s_max²; between 1 and the rank (0 for a zero matrix)."""
    values = check_values(s)
    top = float(values.max())
    if top == 0.0:
        return 0.0
    scaled = values / top
    return float(np.dot(scaled, scaled))


def n_spikes(s: Any, edge: float) -> int:
    """Number of singular values strictly above ``edge``."""
    values = check_values(s)
    return int(np.count_nonzero(values > float(edge)))


def mp_softrank(s: Any, shape: tuple[int, int], sigma: float) -> float:
    """λ₊ / λ_max = (σ(√N + √p) / s_max)² (WeightWatcher's ``mp_softrank``).

    Near 0 when the top eigenvalue is far above the noise bulk; about 1 or above for a
    pure-noise matrix (it is not clipped). ``inf`` for a zero matrix.
    """
    values, _, _, _ = check_spectrum(s, shape)
    edge = marchenko_pastur_edge(shape, check_scale(sigma))
    top = float(values[0])
    if top == 0.0:
        return math.inf
    return (edge / top) ** 2


@dataclass(frozen=True)
class PowerLawFit:
    """A power-law fit p(x) ∝ x^{−α} for x ≥ x_min.

    Attributes:
        alpha: the MLE exponent α = 1 + n / Σ ln(x_i / x_min) over the tail.
        xmin: the lower cut-off chosen by the smallest Kolmogorov–Smirnov distance.
        ks_distance: that distance between the tail's empirical CDF and the fitted law.
        n_tail: number of values x ≥ x_min.
    """

    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "alpha": float(self.alpha),
            "xmin": float(self.xmin),
            "ks_distance": float(self.ks_distance),
            "n_tail": int(self.n_tail),
        }


def power_law_alpha(eigenvalues: Any, *, min_tail: int = DEFAULT_MIN_TAIL) -> PowerLawFit:
    """Heavy-tail exponent α of an eigenvalue density (Martin & Mahoney; WeightWatcher).

    Clauset, Shalizi & Newman (SIAM Review 51, 2009): for every candidate x_min among the
    values, α̂ = 1 + n / Σ_{x ≥ x_min} ln(x / x_min) (continuous MLE) and the KS distance
    D = max |S(x) − P(x)| between the tail's empirical CDF S and the fitted
    P(x) = 1 − (x / x_min)^{1−α̂}; the x_min with the smallest D is chosen. Every candidate is
    evaluated (vectorised, in blocks), restricted to tails of at least ``min_tail`` values.

    Args:
        eigenvalues: the values (for a weight: s²/N or s²; α does not depend on the scale).
            Zeros are ignored (a power law lives on x > 0).
        min_tail: fewest values in a tail.

    Raises:
        InvalidOptionError: fewer than ``min_tail`` positive values, or min_tail < 2.
    """
    values = check_values(eigenvalues, name="eigenvalues")
    if int(min_tail) != min_tail or min_tail < 2:
        raise InvalidOptionError(f"min_tail must be an integer >= 2; got {min_tail!r}")
    positive = int(np.count_nonzero(values > 0.0))
    if positive < min_tail:
        raise InvalidOptionError(
            f"a power-law fit needs at least {min_tail} positive values; got {positive} "
            "(lower min_tail, or skip alpha for this small matrix)"
        )
    fit = _fit_power_law(values, int(min_tail))
    if fit is None:
        raise InvalidOptionError(
            "no power-law tail: the largest values are all equal; alpha is undefined here"
        )
    return fit


def _fit_power_law(values: np.ndarray, min_tail: int) -> PowerLawFit | None:
    """Clauset's fit on checked values with at least ``min_tail`` positive ones; ``None`` when
    every candidate tail consists of equal values."""
    x = np.sort(values[values > 0.0])
    total = x.size
    log_x = np.log(x)
    # Candidates: the first occurrence of each distinct value whose tail is long enough (a
    # repeated x_min would give the same fit with a shorter empirical CDF).
    first = np.ones(total, dtype=bool)
    first[1:] = x[1:] != x[:-1]
    candidates = np.flatnonzero(first[: total - min_tail + 1])
    # Σ_{j ≥ i} ln x_j for every i, from the right.
    tail_log_sum = np.cumsum(log_x[::-1])[::-1]
    n_tail = total - candidates
    log_excess = tail_log_sum[candidates] - n_tail * log_x[candidates]
    with np.errstate(divide="ignore"):
        alphas = 1.0 + n_tail / log_excess
    distances = np.full(candidates.size, np.inf)
    usable = log_excess > 0.0  # a tail of equal values has no exponent
    block = max(1, _KS_BLOCK_ELEMENTS // total)
    for start in range(0, candidates.size, block):
        rows = slice(start, start + block)
        first_row = int(candidates[start])
        # Columns left of the block's first x_min are outside every tail in the block.
        cols = np.arange(first_row, total)
        i = candidates[rows][:, None]
        offset = (cols[None, :] - i).astype(np.float64)
        n = n_tail[rows][:, None].astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            model = -np.expm1((1.0 - alphas[rows][:, None]) * (log_x[cols][None, :] - log_x[i]))
        # The empirical CDF steps at each point: compare with both sides of the step.
        gap = np.maximum((offset + 1.0) / n - model, model - offset / n)
        gap[offset < 0.0] = -np.inf
        distances[rows] = gap.max(axis=1)
    distances[~usable] = np.inf
    if not np.any(np.isfinite(distances)):
        return None
    best = int(np.argmin(distances))
    return PowerLawFit(
        alpha=float(alphas[best]),
        xmin=float(x[candidates[best]]),
        ks_distance=float(distances[best]),
        n_tail=int(n_tail[best]),
    )


def spectrum_diagnostics(
    s: Any, shape: tuple[int, int], choice: RankChoice
) -> dict[str, float | int | None]:
    """All diagnostics of one spectrum, for a table row.

    Returns a dict of plain numbers:

    * ``snr``: :func:`snr` of the split made by ``choice`` (its kept values against the rest);
    * ``spectral_entropy``: normalised, in [0, 1];
    * ``stable_rank``;
    * ``n_spikes``: values above the MP edge σ(√N + √p) with ``choice.sigma`` (the σ of the
      rule; for ``"laserrmt"`` that is its IQR estimate);
    * ``mp_softrank``: with ``choice.sigma``;
    * ``alpha``: power-law exponent of the eigenvalues s²/N, or ``None`` when it is undefined:
      fewer than 10 positive singular values (too few for a tail fit), or all tails flat
      (e.g. an orthogonal matrix).
    """
    values, big, small, _ = check_spectrum(s, shape)
    if not (0 <= choice.rank <= small):
        raise InvalidOptionError(
            f"the RankChoice keeps {choice.rank} values of a spectrum of {small}; pass the "
            "choice made for this spectrum"
        )
    # Splitting by rank rather than by edge keeps "fixed" (whose edge is a kept value) right.
    ratio = _mass_ratio(float(values[: choice.rank].sum()), float(values[choice.rank :].sum()))
    edge = marchenko_pastur_edge(shape, choice.sigma)
    positive = int(np.count_nonzero(values > 0.0))
    fit = None
    if positive >= DEFAULT_MIN_TAIL:
        fit = _fit_power_law(values * values / big, DEFAULT_MIN_TAIL)
    return {
        "snr": ratio,
        "spectral_entropy": spectral_entropy(values),
        "stable_rank": stable_rank(values),
        "n_spikes": int(np.count_nonzero(values > edge)),
        "mp_softrank": mp_softrank(values, shape, choice.sigma),
        "alpha": None if fit is None else fit.alpha,
    }
