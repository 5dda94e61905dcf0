"""Tracy–Widom TW₁ from Painlevé II, Johnstone's centring, and the singular-value edge (§3)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from laserrmt.errors import InvalidOptionError
from laserrmt.rmt import (
    johnstone_centering,
    tracy_widom_cdf,
    tracy_widom_edge,
    tracy_widom_pdf,
    tracy_widom_quantile,
)


@pytest.mark.parametrize(("p", "expected"), [(0.90, 0.45), (0.95, 0.98), (0.99, 2.02)])
def test_quantiles_match_table(p: float, expected: float) -> None:
    t = tracy_widom_quantile(p)
    assert t == pytest.approx(expected, abs=0.01)
    assert float(tracy_widom_cdf(t)) == pytest.approx(p, abs=1e-10)


def test_moments_and_normalisation() -> None:
    x = np.linspace(-9.0, 14.0, 20001)
    density = tracy_widom_pdf(x)
    mass = np.trapezoid(density, x)
    mean = np.trapezoid(x * density, x)
    sd = math.sqrt(np.trapezoid((x - mean) ** 2 * density, x))
    assert mass == pytest.approx(1.0, abs=1e-6)
    assert mean == pytest.approx(-1.2065, abs=2e-3)
    assert sd == pytest.approx(1.2680, abs=2e-3)


def test_cdf_is_monotone_and_continuous_at_the_airy_switch() -> None:
    x = np.linspace(-9.0, 14.0, 4001)
    cdf = tracy_widom_cdf(x)
    assert np.all(np.diff(cdf) >= -1e-15)
    assert cdf[0] < 1e-15 and cdf[-1] == pytest.approx(1.0, abs=1e-15)
    # Left of 8 the ODE solution is used, right of it the Airy closed form.
    below, above = tracy_widom_cdf([8.0 - 1e-9, 8.0 + 1e-9])
    assert above - below == pytest.approx(0.0, abs=1e-12)
    # The density is the derivative of the CDF.
    h = 1e-5
    for t in (-3.0, -1.0, 0.5, 3.0):
        numeric = (tracy_widom_cdf(t + h) - tracy_widom_cdf(t - h)) / (2 * h)
        assert float(tracy_widom_pdf(t)) == pytest.approx(float(numeric), rel=1e-6)


def test_largest_wishart_eigenvalue_follows_tw1() -> None:
    # Johnstone (2001): (ℓ₁ − μ)/σ_TW → TW₁ for the largest eigenvalue of XᵀX, X n×p Gaussian.
    rng = np.random.default_rng(0)
    n, p, draws = 200, 80, 400
    x = rng.standard_normal((draws, n, p))
    top = np.linalg.eigvalsh(np.swapaxes(x, 1, 2) @ x)[:, -1]
    mu, scale = johnstone_centering(n, p)
    z = (top - mu) / scale
    assert z.mean() == pytest.approx(-1.21, abs=0.2)
    assert z.std() == pytest.approx(1.27, abs=0.15)
    for level in (0.5, 0.9, 0.95):
        assert np.mean(z <= tracy_widom_quantile(level)) == pytest.approx(level, abs=0.05)


def test_johnstone_centering_formula() -> None:
    mu, scale = johnstone_centering(101, 25)
    assert mu == pytest.approx((10 + 5) ** 2)
    assert scale == pytest.approx(15 * (1 / 10 + 1 / 5) ** (1 / 3))


def test_edge_is_orientation_free_and_above_the_mp_edge() -> None:
    edge = tracy_widom_edge((300, 100), sigma=0.5, alpha=0.05)
    assert edge == tracy_widom_edge((100, 300), sigma=0.5, alpha=0.05)
    mu, scale = johnstone_centering(300, 100)
    assert edge == pytest.approx(0.5 * math.sqrt(mu + tracy_widom_quantile(0.95) * scale))
    assert edge > 0.5 * (math.sqrt(300) + math.sqrt(100))
    # A stricter level moves the edge out.
    assert tracy_widom_edge((300, 100), 0.5, alpha=0.01) > edge


@pytest.mark.parametrize(
    "call",
    [
        lambda: tracy_widom_quantile(0.0),
        lambda: tracy_widom_quantile(1.0),
        lambda: tracy_widom_quantile(1.0 - 1e-14),
        lambda: johnstone_centering(1, 5),
        lambda: tracy_widom_edge((50, 40), 1.0, alpha=1.5),
    ],
)
def test_invalid_arguments_raise(call) -> None:
    with pytest.raises(InvalidOptionError):
        call()
