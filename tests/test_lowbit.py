"""Group-wise low-bit weights and their RMT-chosen low-rank correction, against brute force and
planted structure."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.pipeline import CompressSettings
from laserrmt.stats.calibration import collect_input_statistics
from laserrmt.surgery.io import load, save_compressed, weight_bytes
from laserrmt.surgery.lowbit import (
    BITS,
    LowBitLinear,
    LowBitLowRankLinear,
    correction_bytes,
    lowbit_matrix_bytes,
    pack_codes,
    quantize_model_lowbit,
    quantize_weight_lowbit,
    quantize_with_correction,
    unpack_codes,
)
from laserrmt.surgery.lowrank import LowRankLinear
from laserrmt.surgery.quantize import Int8LowRankLinear
from laserrmt.surgery.whiten import whitening_factor
from tiny_models import tiny_llama


def _brute_unpack(packed: torch.Tensor, bits: int, n: int) -> list[list[int]]:
    """Read the codes bit by bit from a little-endian bit string of each row."""
    rows = []
    for row in packed.tolist():
        stream = [(byte >> k) & 1 for byte in row for k in range(8)]
        rows.append([sum(stream[i * bits + k] << k for k in range(bits)) for i in range(n)])
    return rows


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 24, 37])
def test_packing_round_trip_and_bit_layout(bits, n):
    codes = torch.randint(0, 1 << bits, (3, n), generator=torch.Generator().manual_seed(n))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    unit = math.lcm(bits, 8)
    assert packed.shape == (3, -(-n // (unit // bits)) * (unit // 8))
    assert _brute_unpack(packed, bits, n) == codes.tolist()
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [128, 32, 50])  # 50 leaves a short last group
def test_error_is_at_most_half_a_step_per_group(bits, group_size):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 300, generator=g) * torch.logspace(-3, 1, 300)
    q = quantize_weight_lowbit(w, bits, group_size)
    # Brute-force dequantization from the stored bytes, group by group.
    codes = torch.tensor(_brute_unpack(q.packed, bits, 300), dtype=torch.float64)
    columns = torch.arange(300) // group_size
    scale = q.scale.double()[:, columns]
    low = q.low.double()[:, columns]
    dequantized = low + codes * scale
    assert torch.allclose(q.dequantize(torch.float64), dequantized, rtol=1e-6, atol=0)
    error = (w.double() - dequantized).abs()
    assert bool((error <= scale / 2 * (1 + 1e-6) + 1e-12).all())
    assert codes.max() <= (1 << bits) - 1 and codes.min() >= 0


def test_constant_groups_and_bad_input():
    q = quantize_weight_lowbit(torch.full((2, 8), 0.5), 3, 4)  # 0.5 is exact in float16
    assert torch.equal(q.dequantize(), torch.full((2, 8), 0.5))
    with pytest.raises(NumericalError, match="NaN or Inf"):
        quantize_weight_lowbit(torch.tensor([[1.0, float("inf")]]), 4)
    with pytest.raises(NumericalError, match="float16"):
        quantize_weight_lowbit(torch.tensor([[-1e5, 1e5]]), 4)
    with pytest.raises(InvalidOptionError, match="bits"):
        quantize_weight_lowbit(torch.ones(2, 2), 7)
    with pytest.raises(InvalidOptionError, match="group size"):
        quantize_weight_lowbit(torch.ones(2, 2), 4, 0)


@pytest.mark.parametrize(("bits", "rank"), [(2, 0), (3, 5), (4, 0), (5, 3), (6, 0), (8, 2)])
def test_stored_bytes_equal_the_formula_and_the_state_dict(bits, rank):
    m, n, group = 10, 77, 32
    # codes: ceil(n / codes per unit) units of lcm(bits, 8) / 8 bytes; two float16 per group.
    per_row = {2: 20, 3: 30, 4: 39, 5: 50, 6: 60, 8: 77}[bits] + 4 * 3
    assert lowbit_matrix_bytes(m, n, bits, group) == m * per_row
    linear = nn.Linear(n, m, bias=False)
    if rank:
        corrected = quantize_with_correction(linear.weight, bits, group, rule="mp")
        corrected = type(corrected)(
            corrected.quantized,
            torch.randn(m, rank, dtype=torch.float64),
            torch.randn(rank, n, dtype=torch.float64),
            rank,
            corrected.choice,
            corrected.spectrum,
        )
        layer: nn.Module = LowBitLowRankLinear.from_correction(corrected, linear)
        expected = m * per_row + (m * rank + 4 * m) + (rank * n + 4 * rank)
        assert correction_bytes(m, n, rank) == expected - m * per_row
    else:
        layer = LowBitLinear.from_linear(linear, bits, group)
        expected = m * per_row
    assert weight_bytes(layer) == expected
    assert sum(t.numel() * t.element_size() for t in layer.state_dict().values()) == expected


def _planted(seed: int, m: int = 192, n: int = 256) -> tuple[torch.Tensor, float]:
    """A weight whose 3-bit grid wipes out a planted rank-3 part entirely.

    Every group of 128 inputs holds one -0.75 and one 1.0, so its grid is -0.75 + k/4 (0 is a
    level). The rest is a rank-3 matrix (singular values 1.5, 1.25, 1) plus noise of std 0.005,
    all below 1/8 in size: it rounds to 0, and the residual is that part (zero at the two
    extremes).
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, 3, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64))[0]
    small = u @ torch.diag(torch.tensor([1.5, 1.25, 1.0], dtype=torch.float64)) @ v.T
    small += 0.005 * torch.randn(m, n, generator=g, dtype=torch.float64)
    assert float(small.abs().max()) < 0.125
    w = small.clone()
    w[:, 0::128], w[:, 1::128] = -0.75, 1.0
    return w, 0.25


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rule", ["mp", "tw"])
def test_rule_finds_the_planted_rank_and_the_correction_cuts_the_output_error(seed, rule):
    w, step = _planted(seed)
    q = quantize_weight_lowbit(w, 3, 128)
    assert float(q.scale.double().max()) == step
    assert float(q.dequantize(torch.float64)[:, 2:128].abs().max()) == 0  # the part is gone
    n = w.shape[1]
    # Isotropic inputs: the weighted residual's noise is i.i.d., as the MP law presumes.
    for gram, samples in ((None, None), (torch.eye(n, dtype=torch.float64) * 1000, 1000)):
        corrected = quantize_with_correction(w, 3, 128, gram=gram, n_samples=samples, rule=rule)
        assert corrected.choice.status == "ok" and corrected.rank == 3
    x = torch.randn(2000, n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    corrected = quantize_with_correction(w, 3, 128, gram=x.T @ x, n_samples=2000, rule=rule)
    assert corrected.rank >= 3  # the sampled Gram's anisotropy may admit a direction more
    linear = nn.Linear(n, w.shape[0], bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(w)
        plain = LowBitLinear.from_linear(linear, 3, 128)(x)
        fixed = LowBitLowRankLinear.from_correction(corrected, linear)(x)
        dense = linear(x)
    plain_error, fixed_error = (plain - dense).norm(), (fixed - dense).norm()
    # Noise energy 0.005² · m · n ≈ 1.2 of the residual's 6.0 is all that may stay.
    assert fixed_error < 0.5 * plain_error


@pytest.mark.parametrize("bits", BITS)
def test_pure_rounding_noise_gets_almost_no_correction(bits):
    w = torch.randn(192, 256, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    ranks = [
        quantize_with_correction(w, bits, 128, gram=gram, n_samples=1000).rank
        for gram in (None, torch.eye(256, dtype=torch.float64) * 1000)
    ]
    # Rounding errors are independent but their variance differs from group to group, which
    # spreads the bulk slightly past the MP edge: at most 1 % of the 192 directions.
    assert max(ranks) <= 2


def test_max_rank_caps_and_bad_options_are_refused():
    w, _ = _planted(0)
    assert quantize_with_correction(w, 3, 128, max_rank=1).rank == 1
    with pytest.raises(InvalidOptionError, match="rule"):
        quantize_with_correction(w, 3, 128, rule="fixed")
    with pytest.raises(InvalidOptionError, match="max_rank"):
        quantize_with_correction(w, 3, 128, max_rank=-1)


def _ids() -> torch.Tensor:
    return torch.randint(0, 200, (4, 64), generator=torch.Generator().manual_seed(3))


def _planted_llama() -> nn.Module:
    """A tiny llama whose first down projection carries the planted weight (64 × 128 slice)."""
    model = tiny_llama()
    w, _ = _planted(4, 64, 256)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.copy_(w[:, :128].float())
    return model


def test_model_level_quantization_saves_and_loads_equal_outputs(tmp_path):
    model = _planted_llama()
    model.model.layers[1].mlp.up_proj = LowRankLinear.from_linear(
        model.model.layers[1].mlp.up_proj, 8
    )
    batches = [_ids()[i : i + 1] for i in range(4)]  # 256 tokens for 128 inputs
    ranks = quantize_model_lowbit(model, 3, batches=batches, extra_bits=1.0, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    # The planted directions, and those that the anisotropic Gram lifts above the MP edge.
    assert 3 <= ranks["model.layers.0.mlp.down_proj"] <= 128 * 64 // (8 * 192)
    assert isinstance(layer, LowBitLowRankLinear)
    assert isinstance(model.model.layers[1].mlp.up_proj, Int8LowRankLinear)
    assert "lm_head" not in ranks
    with torch.no_grad():
        before = model(_ids()).logits
    loaded, _ = load(save_compressed(model, tmp_path / "q3"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, before, rtol=0, atol=0)


def test_uncorrected_model_and_missing_statistics():
    model = tiny_llama()
    ranks = quantize_model_lowbit(model, 4, correct=False, progress=False)
    assert set(ranks.values()) == {0}
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowBitLinear)
    with pytest.raises(InvalidOptionError, match="no calibration statistics"):
        quantize_model_lowbit(tiny_llama(), 4, statistics={}, progress=False)


def test_settings_accept_low_bit_and_refuse_a_byte_target_with_it():
    CompressSettings(quantize="int3", correct_rank="none").validate()
    with pytest.raises(InvalidOptionError, match="correct-rank"):
        CompressSettings(quantize="int4", correct_rank="svd").validate()
    with pytest.raises(InvalidOptionError, match="target-size"):
        CompressSettings(method="budget", quantize="int4", target_size=10**6).validate()


@pytest.mark.parametrize("shape", [(40, 64), (64, 40)])
def test_correction_equals_the_truncated_svd_of_the_whitened_residual(shape):
    """SVD-LLM's construction by brute force: full SVD of R S, top k, times S⁻¹."""
    m, n = shape
    g = torch.Generator().manual_seed(m)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(500, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n)
    corrected = quantize_with_correction(w, 2, 16, gram=x.T @ x, n_samples=500, max_rank=3)
    assert corrected.rank == 3  # the anisotropic inputs lift directions over the edge
    residual = w - corrected.quantized.dequantize(torch.float64)
    s = whitening_factor(x.T @ x, n_samples=500)
    u, sigma, vh = torch.linalg.svd(residual @ s.S, full_matrices=False)
    expected = u[:, :3] @ torch.diag(sigma[:3]) @ vh[:3] @ s.S_inv
    assert torch.allclose(
        corrected.A @ corrected.B, expected, atol=1e-9 * float(expected.abs().max())
    )
    assert torch.allclose(
        torch.as_tensor(corrected.spectrum), sigma, rtol=1e-6, atol=1e-9 * float(sigma[0])
    )


def test_layers_with_the_same_input_share_one_whitening(monkeypatch):
    import laserrmt.surgery.lowbit as lowbit

    calls = []
    original = lowbit.whitening_factor
    monkeypatch.setattr(
        lowbit, "whitening_factor", lambda *a, **k: calls.append(k["module"]) or original(*a, **k)
    )
    cache: dict = {}
    batches = [_ids()[i : i + 1] for i in range(4)]
    quantize_model_lowbit(tiny_llama(), 3, batches=batches, whitenings=cache, progress=False)
    # Per block: q/k/v share an input, o has its own, gate/up share one, down has its own.
    assert len(calls) == 2 * 4 and len(cache) == 2 * 7
    stats = collect_input_statistics(tiny_llama(), batches, list(cache), progress=False)
    quantize_model_lowbit(tiny_llama(), 2, statistics=stats, whitenings=cache, progress=False)
    assert len(calls) == 8  # the second bit width factors no Gram again


def test_compress_quantizes_to_low_bit_after_the_budget_method():
    from laserrmt.pipeline import compress
    from tiny_models import tiny_tokenizer

    model, result = compress(
        tiny_llama(),
        tiny_tokenizer(),
        method="budget",
        target_params=0.2,
        quantize="int3",
        calibration_windows=4,
        window=64,
        progress=False,
    )
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Int8LowRankLinear" in kinds and {"LowBitLinear", "LowBitLowRankLinear"} & kinds
    assert result.corrections is not None and any(result.corrections.values())
    assert result.to_dict()["corrections"] == result.corrections
    assert result.weight_bytes == weight_bytes(model)
