"""Compressed folders load with transformers' Auto classes and ``trust_remote_code=True``.

The folders are written here with laserrmt; a child process in which ``import laserrmt`` fails
(a ``sys.meta_path`` blocker) loads each with the Auto class of its architecture, and its logits
must equal what ``laserrmt.load`` gives in this process. The modelling code's layers are also
checked one by one against laserrmt's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from laserrmt.surgery.io import load, save_compressed
from laserrmt.surgery.lowbit import (
    LowBitLinear,
    LowBitLowRankLinear,
    quantize_model_lowbit,
    quantize_with_correction,
)
from laserrmt.surgery.lowrank import LowRankConv1d, LowRankConv2d, LowRankLinear
from laserrmt.surgery.quantize import Int8Linear, Int8LowRankLinear, quantize_model_int8
from laserrmt.surgery.sparse import LowRankSparseLinear, factorize_sparse
from laserrmt.surgery.width import (
    ReducedSelfAttention,
    ResizedBatchNorm2d,
    ResizedConv2d,
    ResizedLinear,
    slice_residual_stream,
)
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 1, 8], [5, 6, 7, 8, 9, 10, 11, 12]])
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])  # the second sequence padded after 5 tokens


def _factorized(model: nn.Module) -> nn.Module:
    for layer in model.model.layers:
        for part in ("q_proj", "o_proj"):
            setattr(
                layer.self_attn, part, LowRankLinear.from_linear(getattr(layer.self_attn, part), 8)
            )
        layer.mlp.down_proj = LowRankLinear.from_linear(layer.mlp.down_proj, 16)
    return model


def _int8_low_rank(model: nn.Module) -> nn.Module:
    attention = model.model.layers[0].self_attn
    attention.v_proj = Int8LowRankLinear.from_low_rank(
        LowRankLinear.from_linear(attention.v_proj, 4)
    )
    attention.k_proj = Int8Linear.from_linear(attention.k_proj)
    return model


def _low_rank_sparse(model: nn.Module) -> nn.Module:
    """Block 0's query and block 1's down projection: low rank plus 30 % / 50 % sparse."""
    attention = model.model.layers[0].self_attn
    attention.q_proj = factorize_sparse(attention.q_proj, 8, 0.3)
    mlp = model.model.layers[1].mlp
    mlp.down_proj = factorize_sparse(mlp.down_proj, 16, 0.5)
    return model


def _lowbit(model: nn.Module, bits: int) -> nn.Module:
    """Every linear layer at ``bits`` bits with its RMT-chosen int8 correction (plain SVD)."""
    ranks = quantize_model_lowbit(model, bits, group_size=48, progress=False)
    assert any(ranks.values()) and not all(ranks.values())  # both layer types are saved
    return model


def _mlp_cut(model: nn.Module) -> nn.Module:
    """Block 1's MLP cut from 128 to 96 units."""
    mlp = model.model.layers[1].mlp
    d = mlp.down_proj.out_features
    with torch.no_grad():
        for name, rows, cols in (("gate_proj", 96, d), ("up_proj", 96, d), ("down_proj", d, 96)):
            layer = ResizedLinear(cols, rows, bias=False)
            layer.weight.copy_(getattr(mlp, name).weight[:rows, :cols])
            setattr(mlp, name, layer)
    return model


def _residual_cut(model: nn.Module) -> nn.Module:
    """The residual stream sliced from 64 to 48 directions (config ``hidden_size`` changes)."""
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(4))
    slice_residual_stream(model, x.T @ x / 200, 48)
    return model


def _bert_classifier() -> nn.Module:
    """Block 0's attention with query/key heads of 6 and value heads of 5 (of 8), int8 FFN."""
    model = tiny_bert(num_labels=3)
    attention = model.bert.encoder.layer[0].attention
    torch.manual_seed(1)
    attention.self = ReducedSelfAttention(32, 4, 6, 5, 8**-0.5).eval()
    attention.output.dense = ResizedLinear(4 * 5, 32)
    layer = model.bert.encoder.layer[1]
    layer.intermediate.dense = Int8Linear.from_linear(layer.intermediate.dense)
    return model


CASES = {
    # name: (build, Auto class, save options)
    "factorized": (lambda: _factorized(tiny_llama()), "AutoModelForCausalLM", {}),
    "int8": (lambda: _int8(tiny_llama()), "AutoModelForCausalLM", {}),
    "int8-low-rank": (lambda: _int8_low_rank(tiny_llama()), "AutoModelForCausalLM", {}),
    "int8-head": (lambda: _int8(tiny_llama(), ["lm_head"]), "AutoModelForCausalLM", {}),
    "low-rank-sparse": (lambda: _low_rank_sparse(tiny_llama()), "AutoModelForCausalLM", {}),
    "int3-corrected": (lambda: _lowbit(tiny_llama(), 3), "AutoModelForCausalLM", {}),
    "int2-corrected": (lambda: _lowbit(tiny_llama(), 2), "AutoModelForCausalLM", {}),
    "mlp-cut": (lambda: _mlp_cut(tiny_llama()), "AutoModelForCausalLM", {}),
    "residual-cut": (lambda: _residual_cut(tiny_llama()), "AutoModelForCausalLM", {}),
    "residual-and-mlp-cut": (
        lambda: _mlp_cut(_residual_cut(tiny_llama())),
        "AutoModelForCausalLM",
        {},
    ),
    "gpt2-factorized-sharded": (
        lambda: _gpt2_factorized(tiny_gpt2()),
        "AutoModelForCausalLM",
        {"max_shard_size": 40_000},
    ),
    "untied-but-config-ties": (lambda: _untied(tiny_llama()), "AutoModelForCausalLM", {}),
    "int8-low-rank-sharded": (
        lambda: _int8_low_rank(_factorized(tiny_llama())),
        "AutoModelForCausalLM",
        {"max_shard_size": 30_000},
    ),
    "bert-classifier": (_bert_classifier, "AutoModelForSequenceClassification", {}),
}


def _untied(model: nn.Module) -> nn.Module:
    """A head that differs from the embedding while the config still says they are tied."""
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() * 3)
    return model


def _int8(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    quantize_model_int8(model, names)
    return model


def _gpt2_factorized(model: nn.Module) -> nn.Module:
    for block in model.transformer.h:
        block.mlp.c_fc = LowRankLinear.from_linear(block.mlp.c_fc, 8)
    return model


_CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "laserrmt" or name.startswith("laserrmt."):
                raise ImportError(f"{name} is blocked: the folder must load without laserrmt")
            return None

    sys.meta_path.insert(0, Blocker())
    import torch
    import transformers

    cases = json.loads(sys.argv[1])
    ids, mask = torch.load(sys.argv[2])
    results = {}
    for name, case in cases.items():
        auto = getattr(transformers, case["auto"])
        model = auto.from_pretrained(case["folder"], trust_remote_code=True)
        assert not model.training
        with torch.no_grad():
            results[name] = model(ids, attention_mask=mask).logits
        if case.get("resave"):
            model.save_pretrained(case["resave"])
            again = auto.from_pretrained(case["resave"], trust_remote_code=True)
            with torch.no_grad():
                results[name + "/resaved"] = again(ids, attention_mask=mask).logits
    assert not any(m == "laserrmt" or m.startswith("laserrmt.") for m in sys.modules)
    torch.save(results, sys.argv[3])
    """
)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, attention_mask=MASK).logits


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    """Where transformers copies a folder's code before importing it (a package it imports
    once per process, so one folder for the whole module), instead of the user's cache."""
    from transformers import dynamic_module_utils

    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("hf_modules")
        patch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(folder))
        yield folder


@pytest.mark.parametrize("name", list(CASES))
def test_folder_loads_with_its_auto_class(tmp_path, modules_cache, name):
    import transformers

    build, auto, options = CASES[name]
    model = build()
    folder = save_compressed(model, tmp_path / name, **options)
    assert ("sharded" in name) == (folder / "model.safetensors.index.json").is_file()
    expected = _logits(load(folder)[0])
    assert (expected - _logits(model)).abs().max().item() <= 1e-5
    loaded = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == type(model).__name__ and not loaded.training
    assert (_logits(loaded) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["int8-head", "bert-classifier"])
def test_auto_loaded_model_saves_a_folder_that_loads_again(tmp_path, modules_cache, name):
    import transformers

    build, auto, _ = CASES[name]
    model = build()
    expected = _logits(model)
    auto_class = getattr(transformers, auto)
    loaded = auto_class.from_pretrained(
        save_compressed(model, tmp_path / "a"), trust_remote_code=True
    )
    loaded.save_pretrained(tmp_path / "b")
    # Still refused without the code, so never filled with random layers.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        auto_class.from_pretrained(tmp_path / "b", trust_remote_code=False)
    again = auto_class.from_pretrained(tmp_path / "b", trust_remote_code=True)
    assert (_logits(again) - expected).abs().max().item() <= 1e-5


def test_laserrmt_refuses_to_save_a_model_loaded_with_the_folder_code(tmp_path, modules_cache):
    import transformers

    from laserrmt.errors import ModelLoadError

    folder = save_compressed(_factorized(tiny_llama()), tmp_path / "a")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    # Saved as it was, plain transformers would fill the factorized layers at random.
    with pytest.raises(ModelLoadError, match=r"laserrmt\.load"):
        save_compressed(loaded, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_auto_loaded_model_generates_as_laserrmt_load_does(tmp_path, modules_cache):
    import transformers

    folder = save_compressed(_int8_low_rank(_factorized(tiny_llama())), tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = load(folder)[0].generate(IDS[:1], **options)
    assert torch.equal(loaded.generate(IDS[:1], **options), expected)


@pytest.mark.slow
def test_every_folder_loads_with_auto_classes_without_laserrmt(tmp_path):
    cases, expected = {}, {}
    for name, (build, auto, options) in CASES.items():
        model = build()
        folder = save_compressed(model, tmp_path / name, **options)
        reference, _ = load(folder)
        expected[name] = _logits(reference)
        # The folder itself is right: laserrmt.load gives the compressed model's logits.
        assert (expected[name] - _logits(model)).abs().max().item() <= 1e-5, name
        cases[name] = {"folder": str(folder), "auto": auto}
    for sharded in ("gpt2-factorized-sharded", "int8-low-rank-sharded"):
        assert len(list((tmp_path / sharded).glob("model-*.safetensors"))) > 1
    cases["factorized"]["resave"] = str(tmp_path / "resaved")
    expected["factorized/resaved"] = expected["factorized"]
    torch.save((IDS, MASK), tmp_path / "ids.pt")

    src = Path(__file__).resolve().parents[1] / "src"
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != src]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
    }
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            json.dumps(cases),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "out.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert set(got) == set(expected)
    for name, logits in expected.items():
        assert got[name].shape == logits.shape, name
        assert (got[name] - logits).abs().max().item() <= 1e-5, name


def test_auto_map_names_the_architectures_auto_classes(tmp_path):
    llama = json.loads(
        (save_compressed(_mlp_cut(tiny_llama()), tmp_path / "a") / "config.json").read_text()
    )
    bert = json.loads(
        (save_compressed(_bert_classifier(), tmp_path / "b") / "config.json").read_text()
    )
    assert "AutoModelForCausalLM" in llama["auto_map"] and "AutoModel" not in llama["auto_map"]
    assert "AutoModelForSequenceClassification" in bert["auto_map"]
    assert "AutoModelForCausalLM" not in bert["auto_map"]


def _remote_layers():
    from laserrmt.surgery.hf_code import modeling_laserrmt

    return modeling_laserrmt


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda: LowRankLinear.from_linear(nn.Linear(12, 10), 3), (2, 5, 12)),
        (lambda: LowRankLinear.from_linear(nn.Linear(12, 10, bias=False), 3), (4, 12)),
        (lambda: Int8Linear.from_linear(nn.Linear(12, 10)), (2, 5, 12)),
        (lambda: Int8Linear.from_linear(nn.Linear(32, 10, bias=False)), (3, 32)),
        (
            lambda: Int8LowRankLinear.from_low_rank(
                LowRankLinear.from_linear(nn.Linear(12, 10), 4)
            ),
            (5, 12),
        ),
        (lambda: LowBitLinear.from_linear(nn.Linear(37, 10), 3, 16), (2, 5, 37)),
        (lambda: LowBitLinear.from_linear(nn.Linear(32, 10, bias=False), 2), (3, 32)),
        (lambda: LowBitLinear.from_linear(nn.Linear(37, 10), 5, 16), (2, 5, 37)),
        (lambda: LowBitLinear.from_linear(nn.Linear(37, 10), 6, 16), (2, 5, 37)),
        (lambda: _corrected_layer(nn.Linear(40, 12)), (4, 40)),
        (lambda: LowRankConv1d.from_conv(nn.Conv1d(4, 6, 3, padding=1), 2), (2, 4, 9)),
        (
            lambda: LowRankConv2d.from_conv(nn.Conv2d(3, 6, 3, stride=2, padding="valid"), 2),
            (2, 3, 9, 9),
        ),
        (lambda: LowRankSparseLinear.from_linear(nn.Linear(12, 10), 3, 20), (2, 5, 12)),
        (lambda: LowRankSparseLinear.from_linear(nn.Linear(12, 10, bias=False), 2, 9), (4, 12)),
        (lambda: ResizedLinear(7, 5), (3, 7)),
        (lambda: ResizedConv2d(3, 4, (3, 2), padding=(1, 0), groups=1), (2, 3, 6, 6)),
        (lambda: ResizedBatchNorm2d(3), (2, 3, 4, 4)),
    ],
    ids=[
        "lowrank",
        "lowrank-nobias",
        "int8",
        "int8-nobias",
        "int8-lowrank",
        "lowbit3",
        "lowbit2-nobias",
        "lowbit5",
        "lowbit6",
        "lowbit4-corrected",
        "lowrank-conv1d",
        "lowrank-conv2d",
        "lowrank-sparse",
        "lowrank-sparse-nobias",
        "resized-linear",
        "resized-conv2d",
        "resized-bn",
    ],
)
def test_remote_layer_computes_what_laserrmt_layer_does(build, shape):
    torch.manual_seed(0)
    layer = build().eval()
    if isinstance(layer, nn.BatchNorm2d):
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            layer.weight.uniform_(0.5, 2)
    elif not isinstance(layer, Int8Linear | Int8LowRankLinear | LowBitLinear | LowBitLowRankLinear):
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
    remote = _remote_layers()._build(type(layer).__name__, layer.laserrmt_config()).eval()
    remote.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(shape)
    with torch.no_grad():
        assert (remote(x) - layer(x)).abs().max().item() <= 1e-6


def _corrected_layer(linear: nn.Linear) -> LowBitLowRankLinear:
    corrected = quantize_with_correction(linear.weight, 4, 16, max_rank=0)
    rank_two = torch.randn(12, 2, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    return LowBitLowRankLinear.from_correction(
        type(corrected)(corrected.quantized, *rank_two, 2, corrected.choice, corrected.spectrum),
        linear,
    )


def test_remote_reduced_attention_computes_what_laserrmt_does():
    torch.manual_seed(0)
    layer = ReducedSelfAttention(16, 4, 3, 2, 4**-0.5).eval()
    remote = _remote_layers()._build("ReducedSelfAttention", layer.laserrmt_config()).eval()
    remote.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 5, 16)
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, :, :, 3:] = float("-inf")  # the second sequence is padded after 3 tokens
    with torch.no_grad():
        assert (remote(x, mask)[0] - layer(x, mask)[0]).abs().max().item() <= 1e-6


def test_unknown_layer_type_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"laserrmt\.load"):
        _remote_layers()._build("FancyLinear", {})
