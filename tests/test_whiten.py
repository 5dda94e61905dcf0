"""Activation-aware factorization: output-error optimality, exact loss identity, robustness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.surgery.lowrank import LowRankLinear, factor_weight
from laserrmt.surgery.whiten import (
    SharedWhitening,
    activation_aware_factors,
    weighted_spectrum,
    weighted_svd,
    whitened_svd,
    whitening_factor,
)

M, N, N_SAMPLES = 16, 32, 400


def _anisotropic_inputs(n_samples: int = N_SAMPLES, seed: int = 0) -> np.ndarray:
    """Rows = samples; channel scales from 0.05 to 10 in a random basis (condition ≈ 4e4)."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(np.log10(0.05), 1, N)
    basis, _ = np.linalg.qr(rng.standard_normal((N, N)))
    return (rng.standard_normal((n_samples, N)) * scales) @ basis.T


def _weight(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((M, N))


def _output_error(x: np.ndarray, w: np.ndarray, w_approx: np.ndarray) -> float:
    return float(np.linalg.norm(x @ w.T - x @ w_approx.T) ** 2)


def _plain_rank_k(w: np.ndarray, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_whitened_truncation_beats_plain_svd_and_its_loss_is_the_spectral_tail(rank):
    x, w = _anisotropic_inputs(), _weight()
    gram = x.T @ x
    a, b, info = activation_aware_factors(torch.from_numpy(w), rank, whiten="svdllm", gram=gram)
    whitened = (a @ b).numpy()
    error_whitened = _output_error(x, w, whitened)
    error_plain = _output_error(x, w, _plain_rank_k(w, rank))
    assert error_whitened < 0.6 * error_plain

    # Independent of the code's S: the squared singular values of W S are the eigenvalues of
    # W G Wᵀ for any S with S Sᵀ = G.
    squared = np.sort(np.linalg.eigvalsh(w @ gram @ w.T))[::-1]
    expected_tail = squared[rank:].sum()
    assert error_whitened == pytest.approx(expected_tail, rel=1e-8)
    assert info["tail_energy"] == pytest.approx(expected_tail, rel=1e-8)
    assert info["n_clamped"] == 0

    spectrum = weighted_spectrum(w, whiten="svdllm", gram=gram)
    assert (spectrum[rank:] ** 2).sum() == pytest.approx(expected_tail, rel=1e-8)


def test_per_sample_spectrum_is_the_mean_output_error_and_factors_do_not_change():
    x, w = _anisotropic_inputs(), _weight()
    gram = x.T @ x
    a, b, _ = activation_aware_factors(w, 3, whiten="svdllm", gram=gram, n_samples=N_SAMPLES)
    a_total, b_total, _ = activation_aware_factors(w, 3, whiten="svdllm", gram=gram)
    np.testing.assert_allclose((a @ b).numpy(), (a_total @ b_total).numpy(), atol=1e-10)
    spectrum = weighted_spectrum(w, whiten="svdllm", gram=gram, n_samples=N_SAMPLES)
    mean_error = _output_error(x, w, (a @ b).numpy()) / N_SAMPLES
    assert (spectrum[3:] ** 2).sum() == pytest.approx(mean_error, rel=1e-8)


def test_eigen_factor_reproduces_a_well_conditioned_gram_and_inverts_exactly():
    x = _anisotropic_inputs()
    gram = x.T @ x
    whitening = whitening_factor(gram)
    g = torch.from_numpy(gram)
    torch.testing.assert_close(whitening.S @ whitening.S.T, g, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(
        whitening.S @ whitening.S_inv, torch.eye(N, dtype=torch.float64), atol=1e-10, rtol=0
    )
    eigenvalues = np.linalg.eigvalsh(gram)
    assert whitening.condition == pytest.approx(eigenvalues[-1] / eigenvalues[0], rel=1e-6)
    assert whitening.n_clamped == 0
    assert whitening.floor_used == pytest.approx(1e-8 * eigenvalues[-1], rel=1e-10)


def test_rank_deficient_gram_is_floored_reported_and_still_fits_the_samples():
    x = _anisotropic_inputs(n_samples=10)  # 10 samples, 32 features: G has rank 10
    w = _weight()
    gram = x.T @ x
    whitening = whitening_factor(gram, floor=1e-6)
    assert whitening.n_clamped == N - 10
    assert whitening.condition == np.inf
    assert whitening.to_dict()["condition"] is None
    assert whitening.floor_used == pytest.approx(1e-6 * np.linalg.eigvalsh(gram)[-1], rel=1e-10)

    a, b, info = activation_aware_factors(w, 10, whiten="svdllm", gram=gram, floor=1e-6)
    assert info["n_clamped"] == N - 10 and info["floor_relative"] == 1e-6
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # Rank 10 spans every direction the 10 samples visit: the output error on them vanishes.
    relative = _output_error(x, w, (a @ b).numpy()) / np.linalg.norm(x @ w.T) ** 2
    assert relative < 1e-6


@pytest.mark.parametrize("whiten", ["none", "asvd", "svdllm", "fisher"])
def test_full_rank_factors_reproduce_the_weight(whiten):
    x, w = _anisotropic_inputs(), _weight()
    fisher = np.random.default_rng(2).gamma(0.5, size=(M, N))
    a, b, info = activation_aware_factors(
        torch.from_numpy(w),
        min(M, N),
        whiten=whiten,
        gram=x.T @ x,
        n_samples=N_SAMPLES,
        fisher=fisher,
    )
    assert a.dtype == torch.float64 and tuple(a.shape) == (M, M) and tuple(b.shape) == (M, N)
    np.testing.assert_allclose((a @ b).numpy(), w, atol=1e-10)
    assert info["whiten"] == whiten and info["relative_loss"] == pytest.approx(0.0, abs=1e-20)


def test_factors_come_back_in_the_weights_dtype_and_load_into_lowrank_linear():
    x, w = _anisotropic_inputs(), torch.from_numpy(_weight()).float()
    gram = x.T @ x
    a, b, _ = activation_aware_factors(w, 5, whiten="svdllm", gram=gram)
    assert a.dtype == b.dtype == torch.float32
    layer = LowRankLinear(N, M, 5, bias=True)
    bias = torch.randn(M)
    with torch.no_grad():
        layer.A.copy_(a)
        layer.B.copy_(b)
        layer.bias.copy_(bias)
    inputs = torch.from_numpy(x[:7]).float()
    torch.testing.assert_close(layer(inputs), inputs @ (a @ b).T + bias, rtol=1e-5, atol=1e-4)
    # The generalised SVD triple plugs into the weight-only factor code unchanged.
    a2, b2 = factor_weight(w, 5, svd=whitened_svd(w, gram))
    torch.testing.assert_close(a2 @ b2, a @ b, rtol=1e-5, atol=1e-5)


def test_fisher_weighting_is_optimal_in_the_fisher_norm():
    w = _weight()
    rng = np.random.default_rng(3)
    fisher = rng.gamma(0.3, size=(M, N)) * np.logspace(-2, 2, M)[:, None]
    rank = 4
    a, b, info = activation_aware_factors(w, rank, whiten="fisher", fisher=fisher)
    root = np.sqrt(fisher.sum(axis=1))[:, None]
    error_fisher = np.linalg.norm(root * (w - (a @ b).numpy())) ** 2
    error_plain = np.linalg.norm(root * (w - _plain_rank_k(w, rank))) ** 2
    assert error_fisher < error_plain
    assert error_fisher == pytest.approx(info["tail_energy"], rel=1e-8)


def test_asvd_rms_scale_matches_a_proportional_mean_abs_scale():
    x, w = _anisotropic_inputs(), _weight()
    gram = x.T @ x
    rms = np.sqrt(np.diag(gram) / N_SAMPLES)
    a, b, info = activation_aware_factors(w, 4, whiten="asvd", gram=gram, n_samples=N_SAMPLES)
    a2, b2, info2 = activation_aware_factors(w, 4, whiten="asvd", input_abs_mean=0.8 * rms)
    np.testing.assert_allclose((a @ b).numpy(), (a2 @ b2).numpy(), atol=1e-10)
    assert info["scale"] == "rms" and info2["scale"] == "mean_abs"
    # Different from plain SVD: the scaling is not a no-op on anisotropic channels.
    assert not np.allclose((a @ b).numpy(), _plain_rank_k(w, 4), atol=1e-3)


def test_weighted_svd_singular_values_match_weighted_spectrum():
    x, w = _anisotropic_inputs(), _weight()
    decomposition = weighted_svd(w, whiten="svdllm", gram=x.T @ x, n_samples=N_SAMPLES)
    spectrum = weighted_spectrum(w, whiten="svdllm", gram=x.T @ x, n_samples=N_SAMPLES)
    np.testing.assert_allclose(decomposition.s.numpy(), spectrum, rtol=1e-10)
    assert decomposition.info["whiten"] == "svdllm"


def test_non_finite_gram_names_the_module():
    gram = np.eye(N)
    gram[3, 4] = np.nan
    with pytest.raises(NumericalError, match=r"model\.layers\.0\.mlp\.up_proj"):
        whitening_factor(gram, module="model.layers.0.mlp.up_proj")
    with pytest.raises(NumericalError, match="no positive eigenvalue"):
        whitening_factor(np.zeros((N, N)), module="m")


def test_bad_options_are_user_errors():
    w = _weight()
    with pytest.raises(InvalidOptionError, match="unknown whitening"):
        weighted_spectrum(w, whiten="cholesky")
    with pytest.raises(InvalidOptionError, match="needs the input Gram"):
        activation_aware_factors(w, 2, whiten="svdllm")
    with pytest.raises(InvalidOptionError, match="another module"):
        activation_aware_factors(w, 2, whiten="svdllm", gram=np.eye(N + 1))
    with pytest.raises(InvalidOptionError, match=r"outside 1\.\.16"):
        activation_aware_factors(w, 17, whiten="none")
    with pytest.raises(InvalidOptionError, match="floor"):
        whitening_factor(np.eye(3), floor=0.0)


def test_free_rank_counts_planted_directions_above_the_bulk():
    thresholds = pytest.importorskip("laserrmt.rmt.thresholds")
    assert hasattr(thresholds, "choose_rank")
    from laserrmt.surgery.whiten import free_rank

    rng = np.random.default_rng(4)
    m, n, r = 100, 200, 5
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    w = (u * np.array([40.0, 35, 30, 25, 20])) @ v.T + rng.standard_normal((m, n)) * 0.1
    x = rng.standard_normal((20000, n))  # isotropic inputs: G / n ≈ I
    choice = free_rank(w, x.T @ x, n_samples=x.shape[0], method="mp")
    assert choice.rank == r


def test_modules_sharing_a_gram_share_one_whitening(monkeypatch):
    # Two weights reading one input (one Gram object) get the SVDs they would get alone, from
    # one eigendecomposition; another Gram, or the same after release, is decomposed again.
    import laserrmt.surgery.whiten as whiten

    calls = []
    original = whiten.whitening_factor
    monkeypatch.setattr(
        whiten, "whitening_factor", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    x = torch.from_numpy(_anisotropic_inputs())
    gram, other = x.T @ x, (2 * x).T @ (2 * x)
    weights = [
        torch.randn(M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    shared = SharedWhitening()
    for w in weights:
        got = weighted_svd(w, whiten="svdllm", gram=gram, n_samples=N_SAMPLES, shared=shared)
        alone = original(gram, n_samples=N_SAMPLES)
        expected = torch.linalg.svdvals(w @ alone.S)
        torch.testing.assert_close(got.s, expected, rtol=1e-12, atol=1e-12)
    assert len(calls) == 1
    weighted_svd(weights[0], whiten="svdllm", gram=other, n_samples=N_SAMPLES, shared=shared)
    shared.release()
    weighted_svd(weights[0], whiten="svdllm", gram=other, n_samples=N_SAMPLES, shared=shared)
    assert len(calls) == 3


def test_whitening_leaves_the_callers_gram_alone_and_fits_an_asymmetric_rounding():
    # The decomposition overwrites its working copy in place: the caller's float64 Gram (which
    # the factor would otherwise share) must come back unchanged. An accumulated Gram is
    # symmetric only up to rounding: the factor fits its symmetric part, per sample.
    x = torch.from_numpy(_anisotropic_inputs())
    gram = x.T @ x
    gram[0, 1] += 1e-9 * float(gram.abs().max())
    kept = gram.clone()
    whitening = whitening_factor(gram, n_samples=N_SAMPLES)
    assert torch.equal(gram, kept)
    symmetric = (kept + kept.T) / 2 / N_SAMPLES
    torch.testing.assert_close(whitening.S @ whitening.S.T, symmetric, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        whitening.S_inv @ whitening.S, torch.eye(N, dtype=torch.float64), atol=1e-10, rtol=0
    )
