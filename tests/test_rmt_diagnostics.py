"""Per-matrix spectral diagnostics (method.md §4)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.rmt import (
    PowerLawFit,
    RankChoice,
    choose_rank,
    marchenko_pastur_edge,
    mp_softrank,
    n_spikes,
    power_law_alpha,
    snr,
    spectral_entropy,
    spectrum_diagnostics,
    stable_rank,
)


def test_snr_definition_and_limits() -> None:
    s = np.array([10.0, 6.0, 2.0, 1.0, 1.0])
    assert snr(s, edge=5.0) == pytest.approx(16.0 / 4.0)
    # Scale-free, unlike laserRMT's SNR / s_max.
    assert snr(1e3 * s, edge=5e3) == pytest.approx(snr(s, edge=5.0))
    assert snr(s, edge=0.5) == math.inf
    assert snr(s, edge=20.0) == 0.0
    assert snr(np.array([3.0, 0.0, 0.0]), edge=1.0) == math.inf


def test_spectral_entropy_values() -> None:
    assert spectral_entropy(np.ones(16)) == pytest.approx(1.0)
    assert spectral_entropy(np.ones(16), normalized=False) == pytest.approx(math.log(16))
    assert spectral_entropy(np.array([5.0, 0.0, 0.0])) == 0.0
    # p = (0.8, 0.2) from s² = (4, 1).
    expected = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) / math.log(2)
    assert spectral_entropy(np.array([2.0, 1.0])) == pytest.approx(expected)
    assert spectral_entropy(np.zeros(4)) == 0.0


def test_stable_rank_and_spikes() -> None:
    assert stable_rank(np.array([2.0, 2.0, 2.0])) == pytest.approx(3.0)
    assert stable_rank(np.array([1.0, 2.0, 0.0])) == pytest.approx(1.25)
    assert stable_rank(np.zeros(3)) == 0.0
    assert n_spikes(np.array([5.0, 3.0, 3.0, 1.0]), 3.0) == 1


def test_mp_softrank() -> None:
    shape = (400, 100)
    s = np.full(100, 1.0)
    s[0] = 3.0 * marchenko_pastur_edge(shape, 0.1)
    assert mp_softrank(s, shape, 0.1) == pytest.approx(1 / 9)
    assert mp_softrank(np.zeros(100), shape, 0.1) == math.inf


@pytest.mark.parametrize("alpha", [1.8, 2.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_power_law_alpha_recovered_from_pareto_samples(alpha: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    xmin = 2.0
    tail = xmin * rng.random(2000) ** (-1.0 / (alpha - 1.0))  # density ∝ x^{-alpha}, x ≥ xmin
    body = rng.uniform(0.1, xmin, 600)  # not power-law: the KS search must cut it off
    fit = power_law_alpha(rng.permutation(np.concatenate([tail, body])))
    assert isinstance(fit, PowerLawFit)
    assert fit.alpha == pytest.approx(alpha, abs=0.15)
    assert xmin * 0.9 <= fit.xmin <= xmin * 2.0
    assert fit.n_tail >= 500
    assert 0.0 < fit.ks_distance < 0.05
    # α is scale-free.
    scaled = power_law_alpha(7.0 * np.concatenate([tail, body]))
    assert scaled.alpha == pytest.approx(fit.alpha, rel=1e-9)


def test_power_law_alpha_rejects_too_few_values() -> None:
    with pytest.raises(InvalidOptionError, match="at least 10"):
        power_law_alpha(np.arange(1.0, 6.0))
    with pytest.raises(InvalidOptionError, match="all equal"):
        power_law_alpha(np.ones(50))
    with pytest.raises(NumericalError):
        power_law_alpha(np.array([1.0, np.nan] * 10))


def test_spectrum_diagnostics_row_is_plain_and_consistent() -> None:
    rng = np.random.default_rng(0)
    shape = (576, 1536)
    w = 0.02 * rng.standard_normal(shape)
    w += 0.5 * np.outer(rng.standard_normal(576), rng.standard_normal(1536)) / 30
    s = np.sqrt(np.clip(np.linalg.eigvalsh(w @ w.T), 0.0, None))[::-1]  # 576 values, descending
    choice = choose_rank(s, shape, "mp")
    row = spectrum_diagnostics(s, shape, choice)
    assert set(row) == {
        "snr",
        "spectral_entropy",
        "stable_rank",
        "n_spikes",
        "mp_softrank",
        "alpha",
    }
    assert json.loads(json.dumps(row)) == row
    assert all(type(v) in (int, float) for v in row.values())
    assert choice.rank == 1 and row["n_spikes"] == 1
    assert row["snr"] == pytest.approx(s[0] / s[1:].sum())
    assert row["mp_softrank"] == pytest.approx((choice.edge / s[0]) ** 2)


@pytest.mark.parametrize(("alpha", "seed"), [(2.0, 0), (3.5, 1)])
def test_spectrum_diagnostics_alpha_of_a_planted_pareto_spectrum(alpha: float, seed: int) -> None:
    # Eigenvalues s²/N drawn from density ∝ x^{-α} on x ≥ 1: the row's α must be that α.
    rng = np.random.default_rng(seed)
    shape = (1500, 3000)
    eigenvalues = rng.random(1500) ** (-1.0 / (alpha - 1.0))
    s = np.sqrt(3000 * eigenvalues)
    row = spectrum_diagnostics(s, shape, choose_rank(s, shape, "fixed", fraction=0.5))
    # Standard error of the MLE is (α − 1)/√n ≈ 0.03-0.07 here; the KS x_min search adds a little.
    assert row["alpha"] == pytest.approx(alpha, abs=0.2)


def test_spectrum_diagnostics_for_fixed_counts_the_kept_values() -> None:
    s = np.arange(20, 0, -1, dtype=float)
    choice = choose_rank(s, (20, 40), "fixed", fraction=0.25)
    row = spectrum_diagnostics(s, (20, 40), choice)
    assert row["snr"] == pytest.approx(s[:5].sum() / s[5:].sum())


def test_spectrum_diagnostics_small_matrix_has_no_alpha() -> None:
    s = np.array([3.0, 2.0, 1.0, 0.5])
    row = spectrum_diagnostics(s, (4, 9), choose_rank(s, (4, 9), "mp"))
    assert row["alpha"] is None


def test_spectrum_diagnostics_rejects_a_foreign_choice() -> None:
    choice = RankChoice(rank=12, sigma=1.0, edge=1.0, method="mp")
    with pytest.raises(InvalidOptionError, match="keeps 12"):
        spectrum_diagnostics(np.ones(10), (10, 10), choice)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from([(8, 8), (20, 10), (10, 30), (50, 25)]),
    true_rank=st.integers(1, 8),
)
def test_entropy_matches_an_independent_computation_and_stable_rank_is_below_rank(
    seed: int, shape: tuple[int, int], true_rank: int
) -> None:
    rng = np.random.default_rng(seed)
    m, n = shape
    k = min(true_rank, m, n)
    w = rng.standard_normal((m, k)) @ (rng.standard_normal((k, n)) * rng.uniform(0.01, 10, (k, 1)))
    s = np.linalg.svd(w, compute_uv=False)
    numerical_rank = int(np.sum(s > s[0] * 1e-10))
    assert numerical_rank == k
    # scipy normalises s² itself; base p gives the entropy divided by log p.
    expected = scipy.stats.entropy(s * s, base=len(s))
    assert spectral_entropy(s) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert spectral_entropy(s, normalized=False) == pytest.approx(
        scipy.stats.entropy(s * s), rel=1e-9, abs=1e-12
    )
    assert 1.0 - 1e-9 <= stable_rank(s) <= k + 1e-9


def test_entropy_of_a_planted_spectrum_by_hand() -> None:
    # k equal values and p − k zeros: p_i = 1/k on k values, H = log k, normalised log k / log p.
    s = np.concatenate([np.full(6, 3.0), np.zeros(26)])
    assert spectral_entropy(s) == pytest.approx(math.log(6) / math.log(32), rel=1e-12)
    # s² = (9, 4, 4, 1, 1, 1) / 20 by hand.
    s = np.array([3.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    p = np.array([9, 4, 4, 1, 1, 1]) / 20
    by_hand = -sum(q * math.log(q) for q in p) / math.log(6)
    assert spectral_entropy(s) == pytest.approx(by_hand, rel=1e-12)


def test_entropy_is_not_clipped_into_the_unit_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    # Entropy normalised by log(number of positive values) (a plausible slip) exceeds 1 once
    # zeros are present, and so does entropy of s instead of s² on some spectra: a clip to
    # [0, 1] would hide both. The function divides by log p and never clips: a flat spectrum
    # with zeros is below 1 by exactly log k / log p, and bad input raises instead of clipping.
    s = np.concatenate([np.ones(4), np.zeros(12)])
    assert spectral_entropy(s) == pytest.approx(0.5, rel=1e-12)
    assert spectral_entropy(s, normalized=False) == pytest.approx(math.log(4), rel=1e-12)
    with pytest.raises(NumericalError):
        spectral_entropy(np.array([1.0, -1.0, 0.5]))
    with pytest.raises(NumericalError):
        spectral_entropy(np.array([1.0, np.nan, 0.5]))
    # A normaliser half the right size (as a slip would give) must show as entropy 2, not 1.
    log = math.log
    monkeypatch.setattr(math, "log", lambda x: 0.5 * log(x))
    assert spectral_entropy(np.ones(16)) == pytest.approx(2.0, rel=1e-12)
