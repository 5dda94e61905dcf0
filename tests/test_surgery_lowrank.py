"""Factorized layers and in-place denoising: exactness against the dense rank-k product."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from laserrmt.errors import InvalidOptionError, NumericalError, PlanError, TargetSelectionError
from laserrmt.surgery.lowrank import (
    LowRankConv1d,
    LowRankConv2d,
    LowRankLinear,
    denoise_,
    factor_weight,
    factorize,
    low_rank_weight,
    restore_,
    truncated_svd,
    weight_as_matrix,
)
from laserrmt.surgery.registry import module_class


def _rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Reference rank-k truncation, independent of the code under test (numpy, float64)."""
    u, s, vh = np.linalg.svd(matrix.detach().double().numpy(), full_matrices=False)
    return torch.from_numpy((u[:, :k] * s[:k]) @ vh[:k])


def _layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(24, 40),
        "conv1d": nn.Conv1d(6, 10, kernel_size=3, stride=2, padding=1, dilation=1),
        "conv2d": nn.Conv2d(5, 12, kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=2),
        "hf_conv1d": Conv1D(40, 24),  # nf=40 outputs, nx=24 inputs; weight stored 24×40
    }


def _input(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shapes = {
        "linear": (3, 7, 24),
        "conv1d": (2, 6, 17),
        "conv2d": (2, 5, 11, 9),
        "hf_conv1d": (3, 7, 24),
    }
    return torch.randn(*shapes[kind], generator=gen)


def _dense_reference(kind: str, layer: nn.Module, k: int, x: torch.Tensor) -> torch.Tensor:
    """The original layer's forward with its weight replaced by the rank-k product."""
    x64 = x.double()
    bias = layer.bias.detach().double()
    if kind == "linear":
        return x64 @ _rank_k(layer.weight, k).T + bias
    if kind == "hf_conv1d":
        return x64 @ _rank_k(layer.weight.T, k).T + bias  # out × in matrix is weightᵀ
    w = _rank_k(layer.weight.reshape(layer.weight.shape[0], -1), k).reshape(layer.weight.shape)
    conv = torch.nn.functional.conv1d if kind == "conv1d" else torch.nn.functional.conv2d
    return conv(x64, w, bias, layer.stride, layer.padding, layer.dilation)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "hf_conv1d"])
def test_factorized_layer_equals_dense_rank_k_product(kind):
    layer = _layers()[kind]
    k = 4
    low = factorize(layer, k, name=kind)
    expected_cls = {"conv1d": LowRankConv1d, "conv2d": LowRankConv2d}.get(kind, LowRankLinear)
    assert type(low) is expected_cls
    x = _input(kind)
    with torch.no_grad():
        out = low(x)
    ref = _dense_reference(kind, layer, k, x)
    assert out.shape == ref.shape
    assert (out.double() - ref).abs().max().item() <= 1e-5
    m, n = weight_as_matrix(layer).shape
    weights = sum(p.numel() for name, p in low.named_parameters() if "bias" not in name)
    assert weights == k * (m + n)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "hf_conv1d"])
def test_full_rank_factorization_reproduces_the_layer(kind):
    layer = _layers()[kind]
    full = min(weight_as_matrix(layer).shape)
    low = factorize(layer, full)
    x = _input(kind)
    with torch.no_grad():
        assert (low(x) - layer(x)).abs().max().item() <= 1e-5
        assert (
            low.to_dense() - (layer.weight.T if kind == "hf_conv1d" else layer.weight)
        ).abs().max() <= 1e-5


def test_planted_rank_r_weight_is_reproduced_at_rank_r():
    gen = torch.Generator().manual_seed(2)
    r = 5
    layer = nn.Linear(48, 32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, r, generator=gen) @ torch.randn(r, 48, generator=gen))
    low = LowRankLinear.from_linear(layer, r)
    assert low.rank == r and low.in_features == 48 and low.out_features == 32
    assert (low.to_dense() - layer.weight).abs().max().item() <= 1e-5
    x = torch.randn(4, 48, generator=gen)
    with torch.no_grad():
        assert (low(x) - layer(x)).abs().max().item() <= 1e-5


def test_factors_split_singular_values_evenly_and_reuse_a_given_svd():
    torch.manual_seed(3)
    w = torch.randn(20, 30)
    u, s, vh = truncated_svd(w)
    assert u.dtype == s.dtype == vh.dtype == torch.float64
    a, b = factor_weight(w, 6, svd=(u, s, vh))
    # A = U_k Σ^{1/2}: column norms of A and row norms of B are both sqrt(s_i).
    assert torch.allclose(a.double().norm(dim=0), s[:6].sqrt(), atol=1e-5)
    assert torch.allclose(b.double().norm(dim=1), s[:6].sqrt(), atol=1e-5)
    # A deliberately different "SVD" shows it is used rather than recomputed.
    fake = (u, s * 2, vh)
    a2, b2 = factor_weight(w, 6, svd=fake)
    assert torch.allclose(a2 @ b2, 2 * (a @ b), atol=1e-4)
    # numpy triplets truncated to fewer than full rank are accepted.
    a3, _ = factor_weight(w, 6, svd=(u[:, :8].numpy(), s[:8].numpy(), vh[:8].numpy()))
    assert torch.allclose(a3, a)
    with pytest.raises(PlanError, match="do not fit a 20×30 weight at rank 6"):
        factor_weight(w, 6, svd=(u[:, :5], s[:5], vh[:5]))


def test_dtype_and_device_are_kept():
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    low = factorize(layer, 3)
    assert low.A.dtype == low.B.dtype == low.bias.dtype == torch.bfloat16
    assert low.A.device == layer.weight.device
    ref = _rank_k(layer.weight.float(), 3).to(torch.bfloat16)
    assert (low.to_dense().float() - ref.float()).abs().max().item() <= 2e-2


def test_nan_weight_raises_numerical_error_naming_the_module():
    layer = nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"model\.layers\.3\.mlp\.up_proj"):
        factorize(layer, 2, name="model.layers.3.mlp.up_proj")
    with pytest.raises(NumericalError, match="blk"):
        denoise_(layer, 2, name="blk")


def test_overflow_after_cast_raises_numerical_error():
    layer = nn.Linear(4, 4).to(torch.float16)
    u, s, vh = truncated_svd(layer.weight)
    # σ = 1e12 gives factor entries near 1e6, beyond float16's 65504.
    with pytest.raises(NumericalError, match="factor A of module big"):
        factorize(layer, 1, svd=(u, torch.full_like(s, 1e12), vh), name="big")


def test_bad_rank_and_unsupported_layers():
    with pytest.raises(InvalidOptionError, match=r"outside 1\.\.8"):
        factorize(nn.Linear(8, 16), 9)
    with pytest.raises(TargetSelectionError, match="Embedding"):
        factorize(nn.Embedding(10, 4), 2, name="emb")
    with pytest.raises(TargetSelectionError, match="grouped convolution"):
        factorize(nn.Conv2d(4, 4, 3, groups=2), 2)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "hf_conv1d"])
def test_denoise_then_restore_gives_back_the_exact_weight(kind):
    layer = _layers()[kind]
    before = layer.weight.detach().clone()
    bias_before = layer.bias.detach().clone()
    original = denoise_(layer, 3)
    matrix = weight_as_matrix(layer)
    # The weight is now the rank-3 truncation, in the module's own layout.
    assert torch.linalg.matrix_rank(matrix.double(), atol=1e-4).item() == 3
    ref = _rank_k(before.T if kind == "hf_conv1d" else before.reshape(before.shape[0], -1), 3)
    assert (matrix.double() - ref).abs().max().item() <= 1e-5
    assert torch.equal(layer.bias, bias_before)
    assert torch.equal(original, before)
    assert original.data_ptr() != layer.weight.data_ptr()
    restore_(layer, original)
    assert torch.equal(layer.weight, before)


def test_restore_refuses_a_weight_of_another_shape():
    layer = nn.Linear(4, 6)
    with pytest.raises(PlanError, match="restore into the module it came from"):
        restore_(layer, torch.zeros(4, 4))


def test_low_rank_weight_keeps_dtype():
    w = torch.randn(10, 12, dtype=torch.float64)
    out = low_rank_weight(w, 2)
    assert out.dtype == torch.float64
    assert torch.allclose(out, _rank_k(w, 2))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_config_round_trip_builds_an_identical_shell(kind):
    layer = _layers()[kind]
    low = factorize(layer, 3)
    cfg = low.laserrmt_config()
    shell = module_class(type(low).__name__).from_laserrmt_config(cfg)
    assert type(shell) is type(low)
    assert {k: (v.shape, v.dtype) for k, v in shell.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in low.state_dict().items()
    }
    shell.load_state_dict(low.state_dict())
    x = _input(kind)
    with torch.no_grad():
        assert torch.equal(shell(x), low(x))


def test_conv_padding_mode_is_kept():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular")
    low = factorize(conv, 6)  # full rank: min(6, 3·3·3)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert (low(x) - conv(x)).abs().max().item() <= 1e-5
