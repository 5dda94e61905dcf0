"""Target discovery, roles, blocks, weight views and selection on tiny models of each family."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from laserrmt.errors import TargetSelectionError
from laserrmt.models.architectures import (
    ROLES,
    block_index,
    encoder_self_attentions,
    is_embedding_or_head,
    mlp_layouts,
    module_role,
    residual_layout,
)
from laserrmt.models.targets import (
    Target,
    find_targets,
    select_targets,
    set_weight_matrix,
    unsupported_modules,
    weight_matrix,
)
from tiny_models import tiny_bert, tiny_cnn, tiny_gemma, tiny_gpt2, tiny_llama, tiny_qwen2

LLAMA_ROLES = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
}


def by_name(targets: list[Target]) -> dict[str, Target]:
    return {t.name: t for t in targets}


@pytest.mark.parametrize(
    "build", [tiny_llama, tiny_gemma, tiny_qwen2], ids=["llama", "gemma", "qwen2"]
)
def test_llama_style_families_have_seven_roles_per_block(build):
    targets = by_name(find_targets(build()))
    assert len(targets) == 14
    for block in (0, 1):
        for suffix, role in LLAMA_ROLES.items():
            target = targets[f"model.layers.{block}.{suffix}"]
            assert (target.role, target.block, target.kind) == (role, block, "linear")
    assert targets["model.layers.1.mlp.down_proj"].shape == (64, 128)
    assert targets["model.layers.0.mlp.up_proj"].shape == (128, 64)


def test_gpt2_conv1d_roles_and_out_by_in_shapes():
    targets = by_name(find_targets(tiny_gpt2()))
    expected = {
        "transformer.h.1.attn.c_attn": ("attn.qkv", (192, 64)),
        "transformer.h.1.attn.c_proj": ("attn.o", (64, 64)),
        "transformer.h.1.mlp.c_fc": ("mlp.fc_in", (256, 64)),
        "transformer.h.1.mlp.c_proj": ("mlp.fc_out", (64, 256)),
    }
    for name, (role, shape) in expected.items():
        assert (targets[name].role, targets[name].shape, targets[name].block) == (role, shape, 1)
        assert targets[name].kind == "hf_conv1d"
    assert len(targets) == 8


def test_bert_roles_distinguish_attention_output_from_block_output():
    targets = by_name(find_targets(tiny_bert()))
    prefix = "encoder.layer.0."
    assert targets[prefix + "attention.self.query"].role == "attn.q"
    assert targets[prefix + "attention.self.key"].role == "attn.k"
    assert targets[prefix + "attention.self.value"].role == "attn.v"
    assert targets[prefix + "attention.output.dense"].role == "attn.o"
    assert targets[prefix + "intermediate.dense"].role == "mlp.fc_in"
    assert targets[prefix + "output.dense"].role == "mlp.fc_out"
    assert targets[prefix + "output.dense"].shape == (32, 64)
    # The pooler is a generic target: no block, no role.
    assert (targets["pooler.dense"].block, targets["pooler.dense"].role) == (None, None)


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("model.layers.3.mlp.down_proj", 3),
        ("transformer.h.11.attn.c_attn", 11),
        ("bert.encoder.layer.7.output.dense", 7),
        ("blocks.3", 3),
        ("vit.blocks.12.attn.qkv", 12),
        ("encoder.block.2.layer.1.DenseReluDense.wi", 2),
        ("model.decoder.layers.0.fc1", 0),
        ("lm_head", None),
        ("features.0", None),
        ("model.layers_norm.3", None),
    ],
)
def test_block_index(name, block):
    assert block_index(name) == block


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("model.layers.0.self_attn.q_proj", "attn.q"),
        ("model.decoder.layers.0.self_attn.out_proj", "attn.o"),
        ("model.decoder.layers.0.encoder_attn.k_proj", "xattn.k"),
        ("model.decoder.layers.0.fc1", "mlp.fc_in"),
        ("model.decoder.layers.0.fc2", "mlp.fc_out"),
        ("model.layers.0.self_attn.qkv_proj", "attn.qkv"),
        ("model.layers.0.mlp.gate_up_proj", "mlp.gate_up"),
        ("gpt_neox.layers.0.attention.query_key_value", "attn.qkv"),
        ("gpt_neox.layers.0.attention.dense", "attn.o"),
        ("gpt_neox.layers.0.mlp.dense_h_to_4h", "mlp.fc_in"),
        ("gpt_neox.layers.0.mlp.dense_4h_to_h", "mlp.fc_out"),
        ("encoder.block.0.layer.0.SelfAttention.q", "attn.q"),
        ("encoder.block.0.layer.1.DenseReluDense.wo", "mlp.fc_out"),
        ("layers.0.feed_forward.w1", "mlp.gate"),
        ("layers.0.feed_forward.w3", "mlp.up"),
        ("layers.0.feed_forward.w2", "mlp.down"),
        ("vit.encoder.layer.0.attention.attention.query", "attn.q"),
        ("lm_head", None),
        ("features.0", None),
        ("model.layers.0.mlp", None),
    ],
)
def test_module_role_table(name, role):
    assert module_role(name) == role
    assert role is None or role in ROLES


@pytest.mark.parametrize(
    "build, block, producers, consumer, width",
    [
        (tiny_llama, "model.layers.1", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", 128),
        (tiny_gemma, "model.layers.1", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", 128),
        (
            lambda: tiny_bert(num_labels=3),
            "bert.encoder.layer.1",
            ("intermediate.dense",),
            "output.dense",
            64,
        ),
    ],
)
def test_mlp_layouts_name_producers_and_consumer(build, block, producers, consumer, width):
    layouts = mlp_layouts(build())
    assert [m.name for m in layouts] == [block[:-1] + "0", block]
    last = layouts[-1]
    assert last.producers == tuple(f"{block}.{p}" for p in producers)
    assert (last.consumer, last.width) == (f"{block}.{consumer}", width)


def test_gpt2_conv1d_mlp_is_not_a_width_layout():
    # GPT-2's Conv1D is not an nn.Linear: its width cannot be cut by row selection.
    assert mlp_layouts(tiny_gpt2()) == []


def test_residual_and_attention_layouts_by_family():
    llama = tiny_llama()
    layout = residual_layout(llama)
    assert layout.width == 64 and len(layout.norms) == 4 and len(layout.writers) == 4
    assert layout.head is llama.lm_head
    with pytest.raises(TargetSelectionError, match="pre-RMSNorm"):
        residual_layout(tiny_bert())
    assert encoder_self_attentions(llama) == []
    [first, _] = encoder_self_attentions(tiny_bert())
    assert first.self_name.endswith("layer.0.attention.self")
    assert first.output_name.endswith("layer.0.attention.output.dense")
    assert (first.heads, first.qk_head_size, first.v_head_size) == (4, 8, 8)


def test_tied_and_named_heads_excluded_by_default_and_included_on_request():
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" not in by_name(find_targets(model))
    with_heads = by_name(find_targets(model, include_heads=True))
    assert with_heads["lm_head"].is_head
    assert with_heads["lm_head"].shape == (264, 64)
    assert not with_heads["model.layers.0.mlp.down_proj"].is_head

    classifier = tiny_bert(num_labels=3)
    assert "classifier" not in by_name(find_targets(classifier))
    assert by_name(find_targets(classifier, include_heads=True))["classifier"].shape == (3, 32)


def test_a_layer_tied_to_the_embedding_is_a_head_whatever_its_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.hidden = nn.Linear(4, 4)
            self.readout = nn.Linear(4, 10, bias=False)
            self.readout.weight = self.embed.weight

    model = Tied()
    assert [t.name for t in find_targets(model)] == ["hidden"]
    assert is_embedding_or_head("readout", model.readout, model)
    assert is_embedding_or_head("embed", model.embed, model)
    assert not is_embedding_or_head("hidden", model.hidden, model)


def test_only_the_last_matrix_of_a_classifier_container_is_a_head():
    targets = by_name(find_targets(tiny_cnn(), include_heads=True))
    assert not targets["classifier.1"].is_head
    assert targets["classifier.3"].is_head
    assert list(by_name(find_targets(tiny_cnn()))) == ["features.0", "features.2", "classifier.1"]


def test_gpt2_weight_matrix_is_transposed_view_and_round_trips():
    model = tiny_gpt2()
    module = model.get_submodule("transformer.h.0.mlp.c_fc")
    w = weight_matrix(module)
    assert w.shape == (256, 64)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    # The out × in matrix must act like the layer itself: y = x Wᵀ + b.
    torch.testing.assert_close(module(x), x @ w.T + module.bias)
    new = torch.arange(256 * 64, dtype=torch.float32).reshape(256, 64)
    set_weight_matrix(module, new)
    torch.testing.assert_close(weight_matrix(module), new)
    torch.testing.assert_close(module.weight, new.T)


def test_conv_weight_matrix_reshapes_kernels_and_round_trips():
    model = tiny_cnn()
    conv = model.features[2]
    w = weight_matrix(conv)
    assert w.shape == (16, 8 * 3 * 3)
    torch.testing.assert_close(w[5], conv.weight[5].flatten())
    new = torch.randn(16, 72, generator=torch.Generator().manual_seed(1))
    set_weight_matrix(conv, new)
    torch.testing.assert_close(conv.weight, new.reshape(16, 8, 3, 3))
    assert conv.weight.dtype == torch.float32

    conv1d = nn.Conv1d(4, 6, kernel_size=5)
    target = find_targets(nn.Sequential(conv1d))[0]
    assert (target.kind, target.shape) == ("conv1d", (6, 20))


def test_set_weight_matrix_rejects_a_wrong_shape():
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 4\)"):
        set_weight_matrix(layer, torch.zeros(4, 3))


def test_grouped_convs_and_multihead_attention_are_reported_not_targets():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Conv2d(8, 8, 1, groups=2),
        nn.MultiheadAttention(8, 2),
        nn.ConvTranspose2d(8, 4, 2),
    )
    assert [t.name for t in find_targets(model)] == ["0"]
    reasons = dict(unsupported_modules(model))
    assert "depthwise" in reasons["1"]
    assert "grouped" in reasons["2"]
    assert "in_proj_weight" in reasons["3"]
    assert "reads this weight directly" in reasons["3.out_proj"]
    assert "transposed" in reasons["4"]


def test_target_to_dict_is_json_ready():
    target = by_name(find_targets(tiny_llama()))["model.layers.1.mlp.down_proj"]
    record = json.loads(json.dumps(target.to_dict()))
    assert record == {
        "name": "model.layers.1.mlp.down_proj",
        "kind": "linear",
        "shape": [64, 128],
        "block": 1,
        "role": "mlp.down",
        "is_head": False,
        "params": 64 * 128,
    }
    assert target.params == 8192


def names(targets: list[Target]) -> list[str]:
    return [t.name for t in targets]


@pytest.fixture(scope="module")
def llama_targets() -> list[Target]:
    return find_targets(tiny_llama())


def test_select_none_or_empty_selects_all(llama_targets):
    assert select_targets(llama_targets, None) == llama_targets
    assert select_targets(llama_targets, []) == llama_targets


def test_select_by_exact_name_and_parent_module(llama_targets):
    assert names(select_targets(llama_targets, ["model.layers.1.mlp.down_proj"])) == [
        "model.layers.1.mlp.down_proj"
    ]
    assert names(select_targets(llama_targets, ["model.layers.0.mlp"])) == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
    ]


def test_parent_module_pattern_never_matches_a_longer_index():
    targets = [Target(f"layers.{i}.fc", "linear", (2, 2), i, None) for i in (1, 10, 11)]
    assert names(select_targets(targets, ["layers.1"])) == ["layers.1.fc"]


def test_select_by_regex_uses_search(llama_targets):
    assert names(select_targets(llama_targets, [r"down_proj$"])) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert len(select_targets(llama_targets, [r"\.(q|k)_proj"])) == 4


def test_select_by_role_glob(llama_targets):
    assert len(select_targets(llama_targets, ["role:mlp.down"])) == 2
    attention = select_targets(llama_targets, ["role:attn.*"])
    assert {t.role for t in attention} == {"attn.q", "attn.k", "attn.v", "attn.o"}
    assert len(attention) == 8


def test_select_by_block_and_block_range(llama_targets):
    assert {t.block for t in select_targets(llama_targets, ["block:1"])} == {1}
    assert len(select_targets(llama_targets, ["block:1"])) == 7
    assert len(select_targets(llama_targets, ["block:0-1"])) == 14


def test_several_patterns_union_in_model_order(llama_targets):
    chosen = select_targets(llama_targets, ["role:mlp.down", "model.layers.0.self_attn.q_proj"])
    assert names(chosen) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (
            "model.layers.7.mlp.down_proj",
            r"'model\.layers\.7\.mlp\.down_proj' matches none of the 14",
        ),
        ("role:mlp.fc_in", r"roles in this model: attn\.k"),
        ("block:5", r"blocks in this model: 0-1"),
        ("block:x", r"block:<i> or block:<i>-<j>"),
        ("block:3-1", r"empty range"),
        ("lm_head", r"--include-heads"),
        ("([", r"nor a valid regular expression"),
    ],
)
def test_selection_errors_name_the_pattern(llama_targets, pattern, message):
    with pytest.raises(TargetSelectionError, match=message) as info:
        select_targets(llama_targets, [pattern])
    assert "\n" not in str(info.value)


def test_no_match_error_shows_example_names(llama_targets):
    with pytest.raises(TargetSelectionError, match=r"e\.g\. model\.layers\.0\.self_attn\.q_proj"):
        select_targets(llama_targets, ["nothing_like_this"])
