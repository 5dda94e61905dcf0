"""Random Matrix Theory on spectra: pure functions on numpy arrays (float64), no I/O, no torch.

The weight view: for an m×n matrix, N = max(m, n), p = min(m, n), β = p/N, singular values
s₁ ≥ … ≥ s_p, eigenvalues λ = s²/N. Entry point::

    choice = choose_rank(s, (m, n), "mp")          # -> RankChoice(rank, sigma, edge, method, options, status)
    row = spectrum_diagnostics(s, (m, n), choice)  # snr, entropy, stable rank, spikes, alpha

Submodules: :mod:`~laserrmt.rmt.marchenko_pastur` (the noise law), :mod:`~laserrmt.rmt.noise`
(σ estimators), :mod:`~laserrmt.rmt.tracy_widom` (edge fluctuations),
:mod:`~laserrmt.rmt.null` (what pure noise does to a rule whose σ is estimated),
:mod:`~laserrmt.rmt.thresholds` (rank rules), :mod:`~laserrmt.rmt.diagnostics`.
"""

from laserrmt.rmt.diagnostics import (
    PowerLawFit,
    mp_softrank,
    n_spikes,
    power_law_alpha,
    snr,
    spectral_entropy,
    spectrum_diagnostics,
    stable_rank,
)
from laserrmt.rmt.marchenko_pastur import (
    marchenko_pastur_bulk,
    marchenko_pastur_edge,
    marchenko_pastur_lower_edge,
    mp_cdf,
    mp_density,
    mp_median,
    mp_quantile,
    mp_share_below_bulk,
    mp_support,
)
from laserrmt.rmt.noise import (
    SIGMA_ESTIMATORS,
    estimate_sigma,
    sigma_laserrmt_iqr,
    sigma_median_matching,
    sigma_mp_fit,
    sigma_veraart,
)
from laserrmt.rmt.null import edge_false_positive_rate, sigma_ratio_draws, tracy_widom_level
from laserrmt.rmt.thresholds import (
    MAX_SHARE_BELOW_BULK,
    MIN_SPECTRUM,
    RANK_STATUSES,
    THRESHOLD_METHODS,
    RankChoice,
    choose_rank,
    gavish_donoho_lambda,
    gavish_donoho_omega,
    gavish_donoho_threshold,
    laserrmt_threshold,
)
from laserrmt.rmt.tracy_widom import (
    johnstone_centering,
    tracy_widom_cdf,
    tracy_widom_edge,
    tracy_widom_pdf,
    tracy_widom_quantile,
)

__all__ = [
    "MAX_SHARE_BELOW_BULK",
    "MIN_SPECTRUM",
    "RANK_STATUSES",
    "SIGMA_ESTIMATORS",
    "THRESHOLD_METHODS",
    "PowerLawFit",
    "RankChoice",
    "choose_rank",
    "edge_false_positive_rate",
    "estimate_sigma",
    "gavish_donoho_lambda",
    "gavish_donoho_omega",
    "gavish_donoho_threshold",
    "johnstone_centering",
    "laserrmt_threshold",
    "marchenko_pastur_bulk",
    "marchenko_pastur_edge",
    "marchenko_pastur_lower_edge",
    "mp_cdf",
    "mp_density",
    "mp_median",
    "mp_quantile",
    "mp_share_below_bulk",
    "mp_softrank",
    "mp_support",
    "n_spikes",
    "power_law_alpha",
    "sigma_laserrmt_iqr",
    "sigma_median_matching",
    "sigma_mp_fit",
    "sigma_ratio_draws",
    "sigma_veraart",
    "snr",
    "spectral_entropy",
    "spectrum_diagnostics",
    "stable_rank",
    "tracy_widom_cdf",
    "tracy_widom_edge",
    "tracy_widom_level",
    "tracy_widom_pdf",
    "tracy_widom_quantile",
]
