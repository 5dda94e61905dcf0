"""Noise-level estimators (method.md §2) on pure and planted noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.rmt import (
    SIGMA_ESTIMATORS,
    choose_rank,
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


# --- a bulk that is noise but not MP-shaped ----------------------------------------------------


@pytest.mark.parametrize("shape", [(500, 500), (500, 1000), (1000, 500)])
def test_veraart_does_not_collapse_on_a_heteroscedastic_bulk(shape: tuple[int, int]) -> None:
    # Rows scaled by U(0.5, 1.5): pure noise whose bulk is wider than any MP law. The old
    # consistency search fell back to c = 0 (σ̂ ≈ 0.0003 on 500×500) and kept 499 of 500.
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape) * rng.uniform(0.5, 1.5, (shape[0], 1))
    s = singular_values(w)
    average = math.sqrt(float(np.mean(w * w)))  # the entry scale averaged over the rows
    assert sigma_veraart(s, shape) == pytest.approx(average, rel=0.25)
    median_rank = choose_rank(s, shape, "mp").rank
    veraart_rank = choose_rank(s, shape, "mp", estimator="veraart").rank
    assert median_rank < 0.12 * min(shape)
    assert veraart_rank <= 2 * median_rank


def test_veraart_does_not_collapse_on_anisotropic_activations() -> None:
    # 256 features with variances U(0.25, 2.25), 2048 independent tokens, no spike.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 2048)) * np.sqrt(rng.uniform(0.25, 2.25, (256, 1)))
    choice = choose_rank(singular_values(x), (256, 2048), "mp", estimator="veraart")
    assert choice.status == "ok"
    assert choice.rank < 128  # the old search kept 223 or more of 256


def test_veraart_without_a_consistent_majority_set_reads_the_average_variance() -> None:
    # Rows scaled by U(0.3, 1.7), 300×600, plus 3 strong spikes: no set holding half the values
    # passes the MP width test, so σ̂² is the mean of the values under the MP edge of the mean.
    rng = np.random.default_rng(0)
    shape = (300, 600)
    noise = rng.standard_normal(shape) * rng.uniform(0.3, 1.7, (300, 1))
    u = np.linalg.qr(rng.standard_normal((300, 3)))[0]
    v = np.linalg.qr(rng.standard_normal((600, 3)))[0]
    s = singular_values(noise + (u * np.array([60.0, 70.0, 80.0])) @ v.T)
    lam = np.sort(s * s / 600)
    count = np.arange(1, 301)
    means = np.cumsum(lam) / count
    passes = lam - lam[0] <= 4.0 * np.sqrt(count / 600) * means
    assert not passes[149:].any()  # the fallback case
    expected = lam[lam <= (1 + math.sqrt(0.5)) ** 2 * lam.mean()].mean()
    assert sigma_veraart(s, shape) ** 2 == pytest.approx(expected, rel=1e-12)
    # The spikes are out; the bulk's top beyond the MP edge is cut too, so it reads a little low.
    assert sigma_veraart(s, shape) ** 2 == pytest.approx(np.mean(noise * noise), rel=0.2)
    veraart_rank = choose_rank(s, shape, "mp", estimator="veraart").rank
    assert 3 <= veraart_rank <= 2 * choose_rank(s, shape, "mp").rank


def test_veraart_keeps_spikes_out_on_a_heteroscedastic_bulk() -> None:
    rng = np.random.default_rng(3)
    shape = (1000, 500)
    w = rng.standard_normal(shape) * rng.uniform(0.8, 1.2, (shape[0], 1))
    u = np.linalg.qr(rng.standard_normal((shape[0], 5)))[0]
    v = np.linalg.qr(rng.standard_normal((shape[1], 5)))[0]
    w += (u * np.linspace(8, 16, 5) * (500 * 1000) ** 0.25) @ v.T
    s = singular_values(w)
    assert sigma_veraart(s, shape) == pytest.approx(1.0, rel=0.05)
    assert choose_rank(s, shape, "mp", estimator="veraart").rank >= 5
