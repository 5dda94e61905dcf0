"""One spectrum, one row: the RMT summary the monitor records per matrix and step.

Everything here works on singular values (or covariance eigenvalues) already on the host; the
decompositions themselves run on the model's device in :mod:`laserrmt.monitor.hook`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.integrate import quad

from laserrmt.rmt import (
    choose_rank,
    marchenko_pastur_edge,
    mp_density,
    mp_support,
    spectral_entropy,
    spectrum_diagnostics,
    stable_rank,
)
from laserrmt.rmt.activations import activation_rank

#: Martin & Mahoney (JMLR 2021; Nature Communications 2021): the power-law exponent of a
#: well-trained layer's eigenvalue tail lies in [2, 6]; below 2 a layer is over-correlated
#: (very heavy tail), above 6 it is barely different from its random initialisation.
WELL_TRAINED_ALPHA = (2.0, 6.0)

# Six significant digits keep a spectrum plot exact to the eye at a third of the JSON size.
_DIGITS = 6


@lru_cache(maxsize=512)
def mp_noise_entropy(shape: tuple[int, int]) -> float:
    """The normalised spectral entropy of pure Marchenko–Pastur noise of ``shape``.

    With p_i = λ_i / Σλ_j and E[λ] = 1 (σ = 1), −Σ p_i ln p_i = ln p − E[λ ln λ] in the large-p
    limit, so H/ln p = 1 − E_MP[λ ln λ] / ln p, the expectation taken under the MP density of
    ratio β = p/N (integrated numerically). A trained matrix's entropy is read against this
    value: spikes and heavy tails lower it.
    """
    big, small = max(shape), min(shape)
    if small < 2:
        return 0.0
    beta = small / big
    lo, hi = mp_support(beta)
    moment, _ = quad(
        lambda x: float(mp_density(np.array([x]), beta)[0]) * x * math.log(x),
        lo,
        hi,
        limit=200,
    )
    return 1.0 - moment / math.log(small)


def weight_summary(
    singular_values: np.ndarray,
    shape: tuple[int, int],
    *,
    alpha: float,
    eps: float,
    keep_spectrum: bool,
) -> dict[str, Any]:
    """The RMT summary of one weight spectrum (descending float64 singular values).

    ``n_tw`` counts the values above the Tracy–Widom edge at level ``alpha`` with σ̂ estimated
    by median matching (a test: pure noise shows a spike with probability ``alpha``);
    ``n_mp`` those above the MP edge (the limit of the bulk, not a test). Both are ``None``
    when the rule cannot judge the matrix (``status`` ``too_short`` or ``no_bulk``), and then
    ``kept_fraction`` is 1 (nothing would be cut). ``effective_rank`` is p^H, the number of
    equally strong directions with the same entropy (Roy & Vetterli, EUSIPCO 2007).
    """
    s = singular_values
    p = len(s)
    choice = choose_rank(s, shape, "tw", alpha=alpha, eps=eps)
    diagnostics = spectrum_diagnostics(s, shape, choice)
    judged = choice.status == "ok"
    entropy = float(diagnostics["spectral_entropy"] or 0.0)
    record: dict[str, Any] = {
        "shape": list(shape),
        "status": choice.status,
        "sigma": choice.sigma,
        "mp_edge": marchenko_pastur_edge(shape, choice.sigma),
        "tw_edge": choice.edge if judged else None,
        "n_mp": diagnostics["n_spikes"] if judged else None,
        "n_tw": choice.rank if judged else None,
        "kept_fraction": choice.rank / p if judged else 1.0,
        "alpha": diagnostics["alpha"],
        "spectral_entropy": entropy,
        "entropy_mp": mp_noise_entropy(shape),
        "effective_rank": p**entropy,
        "stable_rank": diagnostics["stable_rank"],
        "mp_softrank": diagnostics["mp_softrank"],
        "s_max": float(s[0]),
    }
    if keep_spectrum:
        record["singular_values"] = [float(f"{v:.{_DIGITS}g}") for v in s]
    return record


def activation_summary(covariance: np.ndarray, rows: int) -> dict[str, Any]:
    """The MP summary of one activation covariance (``d × d``, centred) from ``rows`` rows.

    Rows are taken as independent: tokens of one sequence are not, so the edge is low and the
    rank high on strongly correlated inputs (:mod:`laserrmt.rmt.activations` explains the
    effective-sample-size correction that the width methods apply).
    """
    choice = activation_rank(covariance, rows)
    s = np.sqrt(np.clip(np.linalg.eigvalsh((covariance + covariance.T) / 2), 0.0, None))
    judged = choice.status == "ok"
    return {
        "shape": [int(covariance.shape[0]), int(rows)],
        "status": choice.status,
        "sigma": choice.sigma,
        "mp_edge": choice.edge if judged else None,
        "n_mp": choice.rank if judged else None,
        "kept_fraction": choice.rank / len(s) if judged else 1.0,
        "spectral_entropy": spectral_entropy(s),
        "stable_rank": stable_rank(s),
    }
