"""The factors the budget surgery installs are SVD-LLM's: an oracle from the calibration inputs.

For a layer ``y = W x`` and calibration inputs ``X`` (rows = tokens, ``G = XᵀX / N``,
``S Sᵀ = G``), the best rank-k ``W′`` in output error has
``‖X Wᵀ − X W′ᵀ‖_F² = N · Σ_{i>k} s_i²`` with ``s`` the singular values of ``W S``. The test
captures ``X`` with its own hooks on the uncompressed model, computes ``S`` and ``s`` itself,
and compares with the error of the factors the compressed model actually holds. Factors from
a plain SVD at the same rank lose measurably more, so they fail the identity.
"""

from __future__ import annotations

import copy

import pytest
import torch

from laserrmt.data.text import calibration_windows
from laserrmt.pipeline import compress
from laserrmt.surgery.lowrank import LowRankLinear
from tests.small_text import small_calibration_split
from tests.tiny_models import tiny_llama, tiny_tokenizer

WINDOWS = {"calibration_windows": 4, "window": 64, "seed": 1}  # 256 tokens: full-rank Grams


def _inputs(model, names, windows):
    """Each named module's inputs over the windows, one window per forward: N × n float64."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, args, _out, name=name: captured[name].append(
                args[0].detach().reshape(-1, args[0].shape[-1]).double()
            )
        )
        for name in names
    ]
    with torch.no_grad():
        for window in windows:
            model(window.unsqueeze(0))
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(parts) for name, parts in captured.items()}


def _output_error(x, weight, approximation):
    return float(((x @ (weight - approximation).T) ** 2).sum())


@pytest.fixture(scope="module", autouse=True)
def _small_split():
    """Calibration windows from a small split (see tests/small_text.py)."""
    with small_calibration_split():
        yield


def test_installed_factors_lose_exactly_the_truncated_whitened_energy():
    tokenizer = tiny_tokenizer()
    original = tiny_llama()
    model, result = compress(
        copy.deepcopy(original),
        tokenizer,
        method="budget",
        whiten="svdllm",
        target_params=0.3,
        progress=False,
        **WINDOWS,
    )
    factorized = [d for d in result.plan if d.mode == "factorize"]
    assert len(factorized) >= 5
    windows = calibration_windows(
        tokenizer, n_windows=WINDOWS["calibration_windows"], window=64, seed=WINDOWS["seed"]
    )
    inputs = _inputs(original, [d.module for d in factorized], windows)
    plain_worse = 0
    for decision in factorized:
        x = inputs[decision.module]
        n_tokens, k = x.shape[0], decision.rank
        weight = original.get_submodule(decision.module).weight.detach().double()
        installed = model.get_submodule(decision.module)
        assert isinstance(installed, LowRankLinear)
        approximation = installed.A.detach().double() @ installed.B.detach().double()

        eigenvalues, q = torch.linalg.eigh(x.T @ x / n_tokens)
        # no eigenvalue under the whitening floor (1e-8 of the largest): no clamping
        assert eigenvalues[0] > 1e-7 * eigenvalues[-1], decision.module
        whitened = torch.linalg.svdvals(weight @ (q * eigenvalues.sqrt()))
        expected = n_tokens * float((whitened[k:] ** 2).sum())
        error = _output_error(x, weight, approximation)
        assert error == pytest.approx(expected, rel=1e-3), decision.module

        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        plain = _output_error(x, weight, (u[:, :k] * s[:k]) @ vh[:k])
        plain_worse += plain > 1.01 * expected
    # the identity tells the two apart on these inputs (else the test could not fail)
    assert plain_worse >= len(factorized) // 2
