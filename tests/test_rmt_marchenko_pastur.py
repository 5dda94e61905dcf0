"""Marchenko–Pastur law: density, CDF, median and singular-value edges (method.md §1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad

from laserrmt.errors import InvalidOptionError
from laserrmt.rmt import (
    marchenko_pastur_bulk,
    marchenko_pastur_edge,
    marchenko_pastur_lower_edge,
    mp_cdf,
    mp_density,
    mp_median,
    mp_quantile,
    mp_support,
)

RATIOS = [1.0, 0.5, 0.25, 0.1, 0.01]


@pytest.mark.parametrize(("beta", "expected"), [(1.0, 0.6528), (0.5, 0.8305), (0.25, 0.9160)])
def test_mp_median_check_values(beta: float, expected: float) -> None:
    assert mp_median(beta) == pytest.approx(expected, abs=1e-4)
    # The median is where the CDF crosses 1/2.
    assert float(mp_cdf(mp_median(beta), beta)) == pytest.approx(0.5, abs=1e-12)


def test_mp_support_values() -> None:
    assert mp_support(0.25, 2.0) == pytest.approx((1.0, 9.0))
    assert mp_support(1.0) == pytest.approx((0.0, 4.0))


@pytest.mark.parametrize("q", RATIOS)
@pytest.mark.parametrize("sigma", [1.0, 0.3])
def test_mp_density_integrates_to_one(q: float, sigma: float) -> None:
    lo, hi = mp_support(q, sigma)
    total, _ = quad(lambda x: float(mp_density(x, q, sigma)), lo, hi, limit=200)
    assert total == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("q", RATIOS)
def test_mp_cdf_matches_integrated_density(q: float) -> None:
    sigma = 1.7
    lo, hi = mp_support(q, sigma)
    for x in np.linspace(lo, hi, 9)[1:-1]:
        integral, _ = quad(lambda t: float(mp_density(t, q, sigma)), lo, x, limit=200)
        assert float(mp_cdf(x, q, sigma)) == pytest.approx(integral, abs=1e-8)
    assert float(mp_cdf(lo - 1.0, q, sigma)) == 0.0
    assert float(mp_cdf(hi * 2.0, q, sigma)) == 1.0
    grid = np.linspace(lo, hi, 200)
    assert np.all(np.diff(mp_cdf(grid, q, sigma)) >= 0.0)


def test_mp_density_is_zero_outside_support_and_a_scale_family() -> None:
    q, sigma = 0.3, 2.0
    lo, hi = mp_support(q, sigma)
    assert mp_density([lo * 0.5, hi * 1.01], q, sigma).tolist() == [0.0, 0.0]
    x = np.linspace(lo, hi, 50)[1:-1]
    scaled = mp_density(x / sigma**2, q) / sigma**2
    np.testing.assert_allclose(mp_density(x, q, sigma), scaled, rtol=1e-12)


def test_mp_quantile_inverts_cdf() -> None:
    for prob in (0.05, 0.3, 0.9):
        x = mp_quantile(prob, 0.4, 1.3)
        assert float(mp_cdf(x, 0.4, 1.3)) == pytest.approx(prob, abs=1e-10)


def test_covariance_spectrum_follows_mp() -> None:
    # C = X Xᵀ / n of a d×n matrix of variance σ²: eigenvalues ~ MP(q = d/n, σ).
    rng = np.random.default_rng(0)
    d, n, sigma = 300, 1200, 1.5
    x = sigma * rng.standard_normal((d, n))
    eig = np.linalg.eigvalsh(x @ x.T / n)
    empirical = np.arange(1, d + 1) / d
    ks = np.max(np.abs(mp_cdf(np.sort(eig), d / n, sigma) - empirical))
    assert ks < 0.03
    assert eig.max() == pytest.approx(mp_support(d / n, sigma)[1], rel=0.05)


@pytest.mark.parametrize("shape", [(400, 100), (100, 400)])
def test_singular_value_edges(shape: tuple[int, int]) -> None:
    sigma = 0.2
    assert marchenko_pastur_edge(shape, sigma) == pytest.approx(sigma * (20 + 10))
    assert marchenko_pastur_lower_edge(shape, sigma) == pytest.approx(sigma * (20 - 10))
    assert marchenko_pastur_bulk(shape, sigma) == pytest.approx((2.0, 6.0))
    s = np.linalg.svd(sigma * np.random.default_rng(1).standard_normal(shape), compute_uv=False)
    assert s.max() == pytest.approx(marchenko_pastur_edge(shape, sigma), rel=0.03)
    assert s.min() == pytest.approx(marchenko_pastur_lower_edge(shape, sigma), rel=0.1)


def test_square_lower_edge_is_zero() -> None:
    assert marchenko_pastur_lower_edge((64, 64), 3.0) == 0.0
    assert marchenko_pastur_edge((64, 64), 3.0) == pytest.approx(3.0 * 2 * math.sqrt(64))


@pytest.mark.parametrize(
    "call",
    [
        lambda: mp_support(0.0),
        lambda: mp_support(1.5),
        lambda: mp_support(0.5, -1.0),
        lambda: mp_density(1.0, 0.5, 0.0),
        lambda: mp_cdf(1.0, 0.5, float("nan")),
        lambda: mp_quantile(1.0, 0.5),
        lambda: marchenko_pastur_edge((0, 5)),
        lambda: marchenko_pastur_edge((3,)),
    ],
)
def test_invalid_arguments_raise(call) -> None:
    with pytest.raises(InvalidOptionError):
        call()
