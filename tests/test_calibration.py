"""Calibration statistics: blockwise passes agree with plain forwards, hooks leave no trace."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from laserrmt.errors import NumericalError, TargetSelectionError
from laserrmt.stats import calibration
from laserrmt.stats.calibration import (
    BlocksNotFoundError,
    causal_lm_gradient,
    collect_activation_statistics,
    collect_fisher_diagonal,
    collect_input_statistics,
    find_blocks,
    iter_activation_statistics,
)

VOCAB = 128


def tiny_llama(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(2)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def tiny_qwen2_sliding() -> nn.Module:
    """Layers alternate sliding-window and full attention: each block gets its own mask."""
    torch.manual_seed(3)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    config._attn_implementation = "eager"
    return transformers.Qwen2ForCausalLM(config).eval()


def token_batches(n: int = 3, batch: int = 2, length: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(42)
    return [torch.randint(0, VOCAB, (batch, length), generator=generator) for _ in range(n)]


def weight_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)]


def reference_rows(
    model: nn.Module,
    batches: Sequence[object],
    names: Sequence[str],
    where: str = "input",
    rows: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Feature rows of every module from plain whole-model forwards, kept in full."""
    rows = rows or (lambda _m, x: x.reshape(-1, x.shape[-1]))
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        if where == "input":

            def hook(m, args, name=name):
                seen[name].append(rows(m, args[0]).double())

            handles.append(module.register_forward_pre_hook(hook))
        else:

            def hook(m, args, out, name=name):
                out = out[0] if isinstance(out, tuple) else out
                seen[name].append(rows(m, out).double())

            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
    for handle in handles:
        handle.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def assert_matches_reference(stats, reference, tol: float = 1e-8) -> None:
    assert stats.keys() == reference.keys()
    for name, x in reference.items():
        s = stats[name]
        gram = x.T @ x
        err = (s.gram - gram).norm() / gram.norm()
        assert err <= tol, f"{name}: relative Gram error {err:.2e}"
        assert s.n_samples == x.shape[0], name
        torch.testing.assert_close(s.mean, x.mean(0), rtol=1e-10, atol=1e-12)


def test_find_blocks_names_the_layer_lists():
    assert find_blocks(tiny_llama())[0] == "model.layers"
    assert find_blocks(tiny_gpt2())[0] == "transformer.h"
    assert find_blocks(tiny_bert())[0] == "encoder.layer"
    with pytest.raises(BlocksNotFoundError, match="blockwise=False"):
        find_blocks(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_find_blocks_prefers_the_list_holding_most_weights():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(8))
            self.proj = nn.Linear(16, 16)

    model = nn.Module()
    model.layers = nn.ModuleList(Layer() for _ in range(3))
    assert find_blocks(model)[0] == "layers"


@pytest.mark.parametrize(
    "make_model", [tiny_llama, tiny_gpt2, tiny_qwen2_sliding], ids=["llama", "gpt2", "qwen2"]
)
def test_blockwise_gram_equals_plain_forward(make_model):
    model = make_model()
    batches = token_batches()
    names = weight_modules(model)  # includes lm_head, which lies outside the blocks
    stats = collect_input_statistics(model, batches, names, progress=False)
    assert_matches_reference(stats, reference_rows(model, batches, names))
    assert all(s.n_samples == 3 * 2 * 16 for s in stats.values())
    assert all(s.gram.dtype == torch.float64 for s in stats.values())


def test_blockwise_bert_with_padding_mask_kwargs():
    model = tiny_bert()
    batches = []
    for ids in token_batches(n=2):
        mask = torch.ones_like(ids)
        mask[0, 10:] = 0  # padding changes attention, hence every later input
        batches.append({"input_ids": ids, "attention_mask": mask})
    names = weight_modules(model)
    stats = collect_input_statistics(model, batches, names, progress=False)
    assert_matches_reference(stats, reference_rows(model, batches, names))


def test_whole_model_pass_equals_blockwise():
    model = tiny_llama()
    batches = token_batches()
    names = weight_modules(model)
    blockwise = collect_input_statistics(model, batches, names, progress=False)
    whole = collect_input_statistics(model, batches, names, blockwise=False, progress=False)
    for name in names:
        torch.testing.assert_close(blockwise[name].gram, whole[name].gram, rtol=1e-12, atol=0)


def test_shared_inputs_share_one_gram():
    model = tiny_llama()
    names = weight_modules(model)
    stats = collect_input_statistics(model, token_batches(), names, progress=False)
    attn = "model.layers.1.self_attn"
    assert stats[f"{attn}.q_proj"].gram is stats[f"{attn}.k_proj"].gram
    assert stats[f"{attn}.q_proj"].gram is stats[f"{attn}.v_proj"].gram
    assert stats[f"{attn}.q_proj"].gram is not stats[f"{attn}.o_proj"].gram
    mlp = "model.layers.1.mlp"
    assert stats[f"{mlp}.gate_proj"].gram is stats[f"{mlp}.up_proj"].gram


def test_blockwise_keeps_one_blocks_accumulators_alive():
    model = tiny_llama(layers=3)
    names = [n for n in weight_modules(model) if n != "lm_head"]
    batches = token_batches()
    # A Llama block has four distinct linear inputs: qkv, o, gate/up, down.
    calibration._census.reset()
    collect_input_statistics(model, batches, names, progress=False)
    assert calibration._census.peak == 4
    assert calibration._census.live == 0
    calibration._census.reset()
    collect_input_statistics(model, batches, names, blockwise=False, progress=False)
    assert calibration._census.peak == 4 * 3


def test_streaming_yields_a_block_before_the_next_runs():
    model = tiny_llama(layers=3)
    names = [n for n in weight_modules(model) if n != "lm_head"]
    stream = iter_activation_statistics(model, token_batches(), names, progress=False)
    first = [next(stream) for _ in range(7)]
    assert {s.module.split(".")[2] for s in first} == {"0"}
    # Between two items the caller's own code runs with autograd on and no hooks left behind.
    assert torch.is_grad_enabled()
    assert not any(m._forward_pre_hooks for m in model.modules())
    stream.close()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_model_is_left_untouched():
    model = tiny_llama()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    collect_input_statistics(
        model, token_batches(), weight_modules(model), fisher=True, progress=False
    )
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_covariance_and_second_moment():
    model = tiny_llama()
    batches = token_batches()
    name = "model.layers.2.mlp.down_proj"
    stats = collect_input_statistics(model, batches, [name], progress=False)[name]
    x = reference_rows(model, batches, [name])[name]
    torch.testing.assert_close(stats.covariance(), torch.cov(x.T, correction=0))
    torch.testing.assert_close(stats.second_moment(), x.T @ x / x.shape[0])
    assert stats.n_features == 64


def test_output_statistics_of_modules_and_blocks():
    model = tiny_llama()
    batches = token_batches()
    names = ["model.layers.1", "model.layers.2.mlp.act_fn", "model.layers.0.self_attn.v_proj"]
    stats = collect_activation_statistics(model, batches, names, where="output", progress=False)
    assert_matches_reference(stats, reference_rows(model, batches, names, where="output"))
    assert stats["model.layers.1"].n_features == 32
    assert stats["model.layers.0.self_attn.v_proj"].n_features == 16
    assert all(s.where == "output" for s in stats.values())


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv1 = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
        self.conv2 = nn.Conv2d(5, 6, (3, 2), padding="same", dilation=2, padding_mode="reflect")
        self.conv3 = nn.Conv1d(6, 4, 3, stride=2, padding=2, dilation=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x)))
        x = self.conv3(x.flatten(2))
        return self.head(x.mean(-1))


def test_conv_gram_matches_unfold_and_reproduces_the_output():
    model = TinyCNN().eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 9, 8, generator=generator) for _ in range(2)]
    names = ["conv1", "conv2", "conv3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no blocks: the whole-model pass is the normal route
        stats = collect_input_statistics(model, batches, names, progress=False)

    def conv1_rows(m, x):
        return F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)

    ref = reference_rows(model, batches, ["conv1"], rows=conv1_rows)["conv1"]
    torch.testing.assert_close(stats["conv1"].gram, ref.T @ ref, rtol=1e-12, atol=1e-12)
    assert stats["conv1"].n_samples == 2 * 2 * 5 * 4
    # Features are in weight.reshape(out, -1) order: tr(W G Wᵀ) = ‖conv(x) − b‖² (the conv
    # runs in float32, hence the tolerance; a wrong feature order is off by far more).
    outputs = reference_rows(
        model,
        batches,
        names,
        where="output",
        rows=lambda m, y: (
            (y - m.bias.view(1, -1, *[1] * (y.dim() - 2))).movedim(1, -1).flatten(0, -2)
        ),
    )
    for name in names:
        w = model.get_submodule(name).weight.detach().double().flatten(1)
        expected = (outputs[name] ** 2).sum()
        torch.testing.assert_close(
            torch.trace(w @ stats[name].gram @ w.T), expected, rtol=1e-5, atol=0
        )
        assert stats[name].n_samples == outputs[name].shape[0]


def test_conv_output_statistics_use_channels_as_features():
    model = TinyCNN().eval()
    batches = [torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(5))]
    stats = collect_activation_statistics(model, batches, ["conv2"], where="output", progress=False)
    y = reference_rows(
        model, batches, ["conv2"], where="output", rows=lambda m, y: y.movedim(1, -1).flatten(0, -2)
    )["conv2"]
    assert stats["conv2"].n_features == 6
    torch.testing.assert_close(stats["conv2"].gram, y.T @ y, rtol=1e-12, atol=1e-12)


def test_fisher_diagonal_matches_autograd():
    model = tiny_gpt2()
    batches = token_batches(n=2)
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    stats = collect_input_statistics(model, batches, names, fisher=True, progress=False)
    expected = {n: 0.0 for n in names}
    for ids in batches:
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        for n in names:
            expected[n] = expected[n] + model.get_submodule(n).weight.grad.double().T ** 2
    model.zero_grad(set_to_none=True)
    for n in names:
        fisher = stats[n].fisher
        assert fisher is not None and fisher.shape[1] == stats[n].n_features
        # float32 rounding: the loss gradient is formed by chunks, not by autograd's softmax
        torch.testing.assert_close(fisher, expected[n], rtol=1e-4, atol=1e-14)
    # HF Conv1D stores in × out; the Fisher diagonal is out × in like every weight matrix.
    assert stats[names[0]].fisher.shape == (96, 32)


def test_fisher_diagonal_of_a_frozen_llama_restores_requires_grad():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    name = "model.layers.0.mlp.down_proj"
    fisher = collect_fisher_diagonal(model, token_batches(n=1), [name], progress=False)[name]
    assert fisher.shape == (32, 64) and bool((fisher > 0).any())
    assert not any(p.requires_grad for p in model.parameters())


def test_nan_activations_name_the_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(NumericalError, match=r"^1: "):
        collect_input_statistics(model, [torch.randn(3, 4)], ["1"], progress=False)


def test_bad_module_names_are_refused():
    model = tiny_llama(layers=2)
    with pytest.raises(TargetSelectionError, match="no module named"):
        collect_input_statistics(model, token_batches(n=1), ["model.nope"], progress=False)
    # A container is never called itself, so it can have no statistics.
    with pytest.raises(TargetSelectionError, match="never called"):
        collect_input_statistics(model, token_batches(n=1), ["model.layers"], progress=False)
    with pytest.raises(TargetSelectionError, match="int64"):
        collect_input_statistics(
            model, token_batches(n=1), ["model.embed_tokens"], blockwise=False, progress=False
        )


class ScaledStack(nn.Module):
    """Blocks whose inputs are not the previous block's outputs (scaled in between)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = 2 * layer(x)
        return x


def test_unchained_blocks_fall_back_to_a_whole_model_pass_with_a_warning():
    model = ScaledStack().eval()
    batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    names = [f"layers.{i}.0" for i in range(3)]
    with pytest.warns(UserWarning, match="not block 0's output"):
        stats = collect_input_statistics(model, batches, names, progress=False)
    assert_matches_reference(stats, reference_rows(model, batches, names))


@pytest.mark.parametrize("saved", [False, True])
def test_the_causal_lm_gradient_by_chunks_equals_autograd_through_cross_entropy(saved):
    # Against autograd through torch's cross-entropy, on two windows whose length is
    # not a multiple of the chunk; ``saved``: the logits come from an operation that keeps its result
    # for its backward pass (tanh), so they must not be overwritten.
    torch.manual_seed(0)
    z = torch.randn(2, 23, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (2, 23))

    def logits_of(z):
        return torch.tanh(z) * 3 if saved else z * 3

    expected = torch.nn.functional.cross_entropy(
        logits_of(z)[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1)
    )
    (want,) = torch.autograd.grad(expected, z)
    logits = logits_of(z)
    loss, grad = causal_lm_gradient(logits, ids, chunk=5)
    (got,) = torch.autograd.grad(logits, z, grad_outputs=grad)
    assert loss == pytest.approx(float(expected), rel=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
