"""apply_plan on tiny transformers models: exact parameter arithmetic, validation, revert."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from laserrmt.errors import NumericalError, PlanError
from laserrmt.plan import CompressionPlan, ModuleDecision, resolve_mode
from laserrmt.surgery.apply import apply_plan, revert_changes
from laserrmt.surgery.lowrank import LowRankLinear, truncated_svd, weight_as_matrix


def tiny_llama(tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def block_plan(model: nn.Module, rank: int = 8, *, denoise_every: int = 3) -> CompressionPlan:
    """Every linear inside the transformer blocks: factorized at ``rank`` where it pays, every
    ``denoise_every``-th denoised instead, to exercise all three modes."""
    decisions = []
    for i, (name, module) in enumerate(
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | Conv1D) and (".layers." in n or ".h." in n or ".layer." in n)
    ):
        m, n = weight_as_matrix(module).shape
        requested = "denoise" if i % denoise_every == denoise_every - 1 else "factorize"
        mode, reason = resolve_mode((m, n), rank, requested)
        decisions.append(ModuleDecision(name, (m, n), min(m, n), rank, mode, reason))
    return CompressionPlan.from_decisions(decisions, method="test")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_parameter_count_drops_by_the_plans_arithmetic(build):
    model = build()
    plan = block_plan(model)
    counts = plan.counts()
    assert counts["factorize"] > 0 and counts["denoise"] > 0
    before = count_params(model)
    changes = apply_plan(model, plan, progress=False)
    assert count_params(model) == before - plan.params_removed()
    assert plan.params_removed() > 0
    assert [c.module for c in changes] == [d.module for d in plan if d.mode != "keep"]
    for d in plan:
        module = model.get_submodule(d.module)
        assert isinstance(module, LowRankLinear) == (d.mode == "factorize")
        if d.mode == "factorize":
            assert module.rank == d.rank
    # still runs
    with torch.no_grad():
        out = model(input_ids=torch.arange(10)[None])
    assert torch.isfinite(out.logits).all()


def test_keep_modules_are_untouched_and_denoised_ones_change():
    model = tiny_llama()
    keep_name = "model.layers.0.mlp.up_proj"
    den_name = "model.layers.1.mlp.up_proj"
    keep_before = model.get_submodule(keep_name)
    keep_weight = keep_before.weight.detach().clone()
    plan = CompressionPlan.from_decisions(
        [
            ModuleDecision(keep_name, (128, 64), 64, 8, "keep"),
            ModuleDecision(den_name, (128, 64), 64, 8, "denoise"),
        ]
    )
    changes = apply_plan(model, plan, progress=False)
    assert [c.module for c in changes] == [den_name]
    assert model.get_submodule(keep_name) is keep_before
    assert torch.equal(keep_before.weight, keep_weight)
    assert (
        torch.linalg.matrix_rank(model.get_submodule(den_name).weight.double(), atol=1e-5).item()
        == 8
    )


def test_svd_cache_is_used():
    model = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    module = model.get_submodule(name)
    u, s, vh = truncated_svd(module.weight)
    plan = CompressionPlan.from_decisions([ModuleDecision(name, (64, 128), 64, 4, "factorize")])
    # A cache entry with doubled singular values: if it is used, the dense product doubles.
    expected = 2 * ((u[:, :4] * s[:4]) @ vh[:4])
    apply_plan(model, plan, svd_cache={name: (u, 2 * s, vh)}, progress=False)
    assert torch.allclose(model.get_submodule(name).to_dense().double(), expected, atol=1e-5)


def test_missing_module_or_wrong_shape_raises_before_any_change():
    model = tiny_llama()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    good = ModuleDecision("model.layers.0.mlp.up_proj", (128, 64), 64, 8, "factorize")
    missing = ModuleDecision("model.layers.9.mlp.up_proj", (128, 64), 64, 8, "factorize")
    with pytest.raises(
        PlanError, match=r"model.layers.9.mlp.up_proj named in the plan does not exist"
    ):
        apply_plan(model, CompressionPlan.from_decisions([good, missing]), progress=False)
    wrong = ModuleDecision("model.layers.1.mlp.up_proj", (64, 128), 64, 8, "denoise")
    with pytest.raises(PlanError, match=r"has a 128×64 weight but the plan says 64×128"):
        apply_plan(model, CompressionPlan.from_decisions([good, wrong]), progress=False)
    norm = ModuleDecision("model.norm", (64, 64), 64, 8, "denoise")
    with pytest.raises(PlanError, match="LlamaRMSNorm"):
        apply_plan(model, CompressionPlan.from_decisions([norm]), progress=False)
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), nn.Linear)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_tied_weight_is_refused():
    model = tiny_llama(tied=True)
    plan = CompressionPlan.from_decisions(
        [ModuleDecision("lm_head", (128, 64), 64, 8, "factorize")]
    )
    with pytest.raises(PlanError, match=r"shares its weight with model\.embed_tokens\.weight"):
        apply_plan(model, plan, progress=False)


def test_factorizing_multihead_attention_projection_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(16, 2))
    plan = CompressionPlan.from_decisions(
        [ModuleDecision("0.out_proj", (16, 16), 16, 4, "factorize")]
    )
    with pytest.raises(PlanError, match="use mode 'denoise'"):
        apply_plan(model, plan, progress=False)


def test_numerical_error_lists_modules_already_changed():
    model = tiny_llama()
    bad = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(bad).weight[0, 0] = float("inf")
    plan = CompressionPlan.from_decisions(
        [
            ModuleDecision("model.layers.0.mlp.up_proj", (128, 64), 64, 8, "factorize"),
            ModuleDecision(bad, (128, 64), 64, 8, "factorize"),
        ]
    )
    with pytest.raises(
        NumericalError,
        match=r"up_proj contains NaN or Inf.*already changed: model.layers.0.mlp.up_proj",
    ):
        apply_plan(model, plan, progress=False)


def test_revert_restores_the_model_bit_for_bit():
    model = tiny_gpt2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.arange(12)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    plan = block_plan(model, rank=4)
    changes = apply_plan(model, plan, progress=False, keep_originals=True)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, logits)
    revert_changes(model, changes)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert set(model.state_dict()) == set(state)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_revert_without_originals_is_refused():
    model = tiny_llama()
    changes = apply_plan(model, block_plan(model), progress=False)
    with pytest.raises(PlanError, match="keep_originals=True"):
        revert_changes(model, changes)
