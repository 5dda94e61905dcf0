"""Noise-level estimators (method.md §2) on pure and planted noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.rmt import (
    SIGMA_ESTIMATORS,
    estimate_sigma,
    mp_median,
    sigma_laserrmt_iqr,
    sigma_median_matching,
    sigma_mp_fit,
    sigma_veraart,
)


def planted_spectrum(
    shape: tuple[int, int], rank: int, sigma: float, seed: int, strength: float = 4.0
) -> np.ndarray:
    """Singular values of U diag(θ) Vᵀ + σZ, spikes θ at 4-8x the BBP point σ(Np)^{1/4}."""
    rng = np.random.default_rng(seed)
    m, n = shape
    w = sigma * rng.standard_normal(shape)
    if rank:
        u = np.linalg.qr(rng.standard_normal((m, rank)))[0]
        v = np.linalg.qr(rng.standard_normal((n, rank)))[0]
        theta = sigma * (m * n) ** 0.25 * np.linspace(strength, 2 * strength, rank)
        w += (u * theta) @ v.T
    return singular_values(w)


def singular_values(w: np.ndarray) -> np.ndarray:
    """Singular values via the smaller Gram matrix (faster than an SVD; accurate for the bulk)."""
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))[::-1]


SHAPE = (1200, 600)
SIGMA = 0.07


@pytest.fixture(scope="module")
def planted() -> np.ndarray:
    return planted_spectrum(SHAPE, rank=10, sigma=SIGMA, seed=3)


@pytest.fixture(scope="module")
def pure() -> np.ndarray:
    return planted_spectrum(SHAPE, rank=0, sigma=SIGMA, seed=4)


@pytest.mark.parametrize("estimator", ["median", "mp_fit", "veraart"])
def test_sigma_recovered_on_pure_noise(pure: np.ndarray, estimator: str) -> None:
    assert estimate_sigma(pure, SHAPE, estimator) == pytest.approx(SIGMA, rel=0.01)


@pytest.mark.parametrize("estimator", ["median", "mp_fit", "veraart"])
def test_sigma_recovered_within_two_percent_with_spikes(
    planted: np.ndarray, estimator: str
) -> None:
    assert estimate_sigma(planted, SHAPE, estimator) == pytest.approx(SIGMA, rel=0.02)


def test_median_matching_formula(planted: np.ndarray) -> None:
    expected = np.median(planted) / math.sqrt(1200 * mp_median(0.5))
    assert sigma_median_matching(planted, SHAPE) == pytest.approx(expected, rel=1e-12)


def test_veraart_ignores_spikes(pure: np.ndarray) -> None:
    # Replacing the top values by huge spikes must not move the estimate: they leave the
    # noise set.
    spiked = pure.copy()
    spiked[:5] = 1e3 * spiked[:5]
    assert sigma_veraart(spiked, SHAPE) == pytest.approx(sigma_veraart(pure, SHAPE), rel=0.01)
    # Median matching moves a little (the median shifts by 5 ranks), Veraart barely.
    assert sigma_veraart(spiked, SHAPE) == pytest.approx(SIGMA, rel=0.01)


def test_veraart_works_for_square_matrices() -> None:
    # At β = 1 the smallest eigenvalues sit near λ₋ = 0 and fail the width test on their own;
    # the estimate must still use the whole bulk.
    s = planted_spectrum((500, 500), rank=0, sigma=2.0, seed=5)
    assert sigma_veraart(s, (500, 500)) == pytest.approx(2.0, rel=0.01)


def test_mp_fit_quantile_and_bins_options(planted: np.ndarray) -> None:
    for quantile in (0.4, 0.5, 0.6):
        assert sigma_mp_fit(planted, SHAPE, quantile=quantile) == pytest.approx(SIGMA, rel=0.02)
    assert sigma_mp_fit(planted, SHAPE, bins=60) == pytest.approx(SIGMA, rel=0.02)
    with pytest.raises(InvalidOptionError, match="quantile"):
        sigma_mp_fit(planted, SHAPE, quantile=1.0)
    with pytest.raises(InvalidOptionError, match="bins"):
        sigma_mp_fit(planted, SHAPE, bins=1)


def test_laserrmt_iqr_is_reproduced_and_inconsistent(pure: np.ndarray) -> None:
    q75, q25 = np.percentile(pure, [75, 25])
    assert sigma_laserrmt_iqr(pure) == pytest.approx((q75 - q25) / 1.349)
    # It measures the spread of the singular values, not the entry scale: far off.
    assert sigma_laserrmt_iqr(pure) > 5 * SIGMA


@pytest.mark.parametrize("estimator", SIGMA_ESTIMATORS)
def test_estimators_are_scale_equivariant_and_orientation_free(
    planted: np.ndarray, estimator: str
) -> None:
    base = estimate_sigma(planted, SHAPE, estimator)
    assert estimate_sigma(37.5 * planted, SHAPE, estimator) == pytest.approx(37.5 * base, rel=1e-9)
    assert estimate_sigma(planted, SHAPE[::-1], estimator) == pytest.approx(base, rel=1e-12)


def test_rank_deficient_matrix_gives_zero_median_sigma() -> None:
    s = np.concatenate([[5.0, 3.0], np.zeros(8)])
    assert sigma_median_matching(s, (10, 20)) == 0.0
    assert sigma_mp_fit(s, (10, 20)) == 0.0


def test_estimate_sigma_rejects_bad_input(planted: np.ndarray) -> None:
    with pytest.raises(InvalidOptionError, match="median, mp_fit, veraart, iqr"):
        estimate_sigma(planted, SHAPE, "mad")
    with pytest.raises(InvalidOptionError, match="takes no options"):
        estimate_sigma(planted, SHAPE, "median", quantile=0.4)
    with pytest.raises(InvalidOptionError, match="min\\(m, n\\)"):
        estimate_sigma(planted, (1200, 700), "median")
    bad = planted.copy()
    bad[3] = np.nan
    with pytest.raises(NumericalError):
        estimate_sigma(bad, SHAPE, "veraart")
    with pytest.raises(NumericalError):
        sigma_laserrmt_iqr([1.0, -2.0])
