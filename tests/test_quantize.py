"""Int8 weight quantization: error bound, kernel route, whole-model accuracy, 1-byte storage."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from laserrmt.errors import NumericalError, TargetSelectionError
from laserrmt.surgery.lowrank import LowRankLinear
from laserrmt.surgery.quantize import (
    Int8Linear,
    Int8LowRankLinear,
    dequantize_weight_int8,
    int8pack_mm_available,
    quantize_model_int8,
    quantize_weight_int8,
)
from laserrmt.surgery.registry import module_class


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    log_scale=st.floats(-20, 20),
    seed=st.integers(0, 2**16),
)
def test_quantization_error_is_at_most_half_a_step(rows, cols, log_scale, seed):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator) * 2.0**log_scale
    q, scale = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (rows,)
    assert int(q.abs().max()) <= 127
    # The largest entry of each row lands on ±127: the whole int8 range is used.
    assert bool((q.abs().amax(dim=1) == 127).all())
    err = (w.double() - q.double() * scale.double()[:, None]).abs()
    bound = scale.double()[:, None] / 2 * (1 + 1e-6)
    assert bool((err <= bound).all())


def test_zero_rows_quantize_to_zero_without_nan():
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    q, scale = quantize_weight_int8(w)
    assert scale[0] == 0 and bool((q[0] == 0).all())
    assert bool(torch.isfinite(dequantize_weight_int8(q, scale)).all())
    assert q[1].tolist() == [64, -127, 32]


def test_non_finite_weights_are_refused():
    with pytest.raises(NumericalError, match="NaN or Inf"):
        quantize_weight_int8(torch.tensor([[1.0, float("nan")]]))


X86_VECTOR = platform.machine().lower() in ("x86_64", "amd64") and (
    torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
)


def reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, q · scale)`` in float32."""
    w = dequantize_weight_int8(layer.weight_int8, layer.weight_scale)
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), w, bias)


@pytest.mark.skipif(not X86_VECTOR, reason="the route table below is the one for x86 CPUs")
def test_route_on_this_x86_cpu():
    # ATen vectorizes the int8 kernel for bfloat16 only on x86; float32 there is a scalar loop.
    assert int8pack_mm_available("cpu", torch.bfloat16)
    assert not int8pack_mm_available("cpu", torch.float32)
    fp32 = Int8Linear.from_linear(nn.Linear(64, 8))
    bf16 = Int8Linear.from_linear(nn.Linear(64, 8).to(torch.bfloat16))
    assert fp32.kernel == "dequantize" and "kernel=dequantize" in repr(fp32)
    assert bf16.kernel == "int8pack_mm" and "kernel=int8pack_mm" in repr(bf16)
    # The vectorized kernels have no remainder loop: other input sizes are not sent to them.
    odd = Int8Linear.from_linear(nn.Linear(40, 8).to(torch.bfloat16))
    assert odd.kernel == "dequantize"


def test_float32_route_agrees_with_dequantized_linear():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        got = layer(x)
        original = linear(x)
    torch.testing.assert_close(got, reference(layer, x), rtol=1e-5, atol=1e-5)
    assert float((got - original).norm() / original.norm()) < 0.01


def test_kernel_route_agrees_and_is_really_called(monkeypatch):
    if not int8pack_mm_available("cpu", torch.bfloat16):
        pytest.skip("no vectorized int8 kernel for bfloat16 on this CPU")
    torch.manual_seed(2)
    linear = nn.Linear(64, 36).to(torch.bfloat16)
    layer = Int8Linear.from_linear(linear)
    assert layer.dtype == torch.bfloat16 and layer.weight_scale.dtype == torch.float32
    calls = []
    original = torch._weight_int8pack_mm

    def spy(*args):
        calls.append(tuple(args[0].shape))
        return original(*args)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", spy)
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    # A view starting 2 bytes into its storage is copied, never handed to aligned loads.
    shifted = torch.randn(3 * 5 * 64 + 1).to(torch.bfloat16)[1:].view(3, 5, 64)
    with torch.no_grad():
        got = layer(x)
        got_shifted = layer(shifted)
    assert calls == [(15, 64), (15, 64)]
    assert got.dtype == torch.bfloat16 and got.shape == (3, 5, 36)
    torch.testing.assert_close(got.float(), reference(layer, x), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_shifted.float(), reference(layer, shifted), rtol=2e-2, atol=2e-2)


def test_misaligned_weight_buffer_is_not_sent_to_the_kernel():
    layer = Int8Linear.from_linear(nn.Linear(64, 8).to(torch.bfloat16))
    storage = torch.zeros(8 * 64 + 1, dtype=torch.int8)
    shifted = storage[1:].view(8, 64)
    shifted.copy_(layer.weight_int8)
    layer.weight_int8 = shifted
    assert layer.kernel == "dequantize"
    x = torch.randn(2, 64).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).float(), reference(layer, x), rtol=2e-2, atol=2e-2)


def test_dequantized_route_for_autograd_and_double():
    torch.manual_seed(1)
    layer = Int8Linear.from_linear(nn.Linear(16, 8))
    x = torch.randn(4, 16, requires_grad=True)
    y = layer(x)  # the int8 op has no derivative: this must take the dequantized route
    y.sum().backward()
    w = dequantize_weight_int8(layer.weight_int8, layer.weight_scale)
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, 16))
    with torch.no_grad():
        y64 = layer(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, F.linear(x.double(), w.double(), layer.bias.double()))


def test_hf_conv1d_is_transposed_to_out_by_in():
    torch.manual_seed(3)
    conv = Conv1D(24, 10)  # 10 in, 24 out, stored in × out
    layer = Int8Linear.from_linear(conv)
    assert layer.weight_int8.shape == (24, 10)
    x = torch.randn(3, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=0.02, atol=0.02)


def test_low_rank_factors_are_quantized_one_by_one():
    torch.manual_seed(4)
    low = LowRankLinear.from_linear(nn.Linear(48, 40), rank=12)
    layer = Int8LowRankLinear.from_low_rank(low)
    assert layer.A_int8.shape == (40, 12) and layer.B_int8.shape == (12, 48)
    assert layer.A_scale.shape == (40,) and layer.B_scale.shape == (12,)
    x = torch.randn(7, 48)
    with torch.no_grad():
        a = dequantize_weight_int8(layer.A_int8, layer.A_scale)
        b = dequantize_weight_int8(layer.B_int8, layer.B_scale)
        torch.testing.assert_close(
            layer(x), F.linear(F.linear(x, b), a, low.bias), rtol=1e-5, atol=1e-5
        )
        rel = (layer(x) - low(x)).norm() / low(x).norm()
    assert rel < 0.02
    torch.testing.assert_close(layer.to_dense(), a @ b)


def test_tiny_llama_logits_stay_close_after_quantizing_every_linear():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    replaced = quantize_model_int8(model)
    assert len(replaced) == 2 * 7 and "lm_head" not in replaced
    assert isinstance(model.model.layers[1].mlp.down_proj, Int8Linear)
    assert isinstance(model.lm_head, nn.Linear)  # heads are left alone unless named
    with torch.no_grad():
        after = model(ids).logits
    rel = float((after - before).norm() / before.norm())
    assert 0 < rel < 0.02


def test_state_dict_stores_one_byte_per_weight(tmp_path):
    model = tiny_llama()
    quantize_model_int8(model, ["model.layers.0.mlp.up_proj", "lm_head"])
    state = model.state_dict()
    assert state["model.layers.0.mlp.up_proj.weight_int8"].dtype == torch.int8
    assert state["lm_head.weight_int8"].dtype == torch.int8
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if "lm_head" not in k}, path)
    loaded = load_file(path)
    q = loaded["model.layers.0.mlp.up_proj.weight_int8"]
    assert q.dtype == torch.int8 and q.element_size() == 1
    # Reload through the registry: an empty shell from the config, then the state dict.
    layer = model.model.layers[0].mlp.up_proj
    shell = module_class("Int8Linear").from_laserrmt_config(layer.laserrmt_config())
    shell.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(shell(x), layer(x))


def test_low_rank_shell_roundtrip():
    low = LowRankLinear.from_linear(nn.Linear(20, 16, bias=False), rank=4)
    layer = Int8LowRankLinear.from_low_rank(low)
    shell = module_class("Int8LowRankLinear").from_laserrmt_config(layer.laserrmt_config())
    shell.load_state_dict(layer.state_dict())
    x = torch.randn(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(shell(x), layer(x))


def test_quantize_model_replaces_low_rank_layers_and_refuses_others():
    model = nn.Sequential(
        nn.Embedding(10, 8),
        LowRankLinear.from_linear(nn.Linear(8, 8), rank=2),
        nn.Conv1d(8, 8, 1),
    )
    assert quantize_model_int8(model) == ["1"]
    assert isinstance(model[1], Int8LowRankLinear)
    with pytest.raises(TargetSelectionError, match="Conv1d"):
        quantize_model_int8(model, ["2"])
    with pytest.raises(TargetSelectionError, match="no module named"):
        quantize_model_int8(model, ["7"])
    with pytest.raises(TargetSelectionError, match="Int8LowRankLinear"):
        quantize_model_int8(model, ["1"])


def test_quantized_model_saves_and_loads_through_the_registry(tmp_path):
    from safetensors import safe_open

    from laserrmt.surgery.io import load, save_compressed

    model = tiny_llama()
    quantize_model_int8(model)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    folder = save_compressed(model, tmp_path / "int8")
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight_int8").dtype == torch.int8
    loaded, _ = load(folder)
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, Int8Linear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, rtol=0, atol=0)
