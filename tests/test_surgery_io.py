"""save_compressed / load: identical logits, smaller files, atomic writes, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import nn
from transformers import PreTrainedTokenizerFast

from laserrmt.errors import ModelLoadError, OutputExistsError
from laserrmt.plan import CompressionPlan, ModuleDecision
from laserrmt.surgery import shards
from laserrmt.surgery.apply import apply_plan
from laserrmt.surgery.io import load, load_into, save_compressed, write_compressed
from laserrmt.surgery.lowrank import LowRankConv2d, LowRankLinear
from test_surgery_apply import block_plan, tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.tensor([[3, 17, 99, 4, 50, 1, 127, 8, 8, 60]])


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "noise": 3}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


BUILDS = {
    "llama": tiny_llama,
    "llama_tied": lambda: tiny_llama(tied=True),
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
}


@pytest.mark.parametrize("kind", list(BUILDS))
def test_save_load_gives_identical_logits(tmp_path, kind):
    model = BUILDS[kind]()
    plan = block_plan(model)
    apply_plan(model, plan, progress=False)
    before = _logits(model)
    out = save_compressed(model, tmp_path / "out", plan=plan, settings={"seed": 0})
    loaded, tokenizer = load(out)
    assert tokenizer is None
    assert type(loaded) is type(model)
    assert not loaded.training
    assert (_logits(loaded) - before).abs().max().item() <= 1e-5
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    for d in plan:
        assert isinstance(loaded.get_submodule(d.module), LowRankLinear) == (d.mode == "factorize")
    meta = json.loads((out / "laserrmt.json").read_text())
    assert meta["architecture"] == type(model).__name__
    assert meta["format_version"] == 1
    assert set(meta["modules"]) == {d.module for d in plan if d.mode == "factorize"}
    assert CompressionPlan.from_dict(meta["plan"]).decisions == plan.decisions
    assert meta["settings"] == {"seed": 0}
    if kind == "llama_tied":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_write_compressed_fills_an_existing_folder(tmp_path):
    model = tiny_gpt2()
    apply_plan(model, block_plan(model), progress=False)
    folder = tmp_path / "staging"
    folder.mkdir()
    (folder / "report.html").write_text("kept")
    write_compressed(model, folder, settings={"k": 1})
    loaded, _ = load(folder)
    assert (_logits(loaded) - _logits(model)).abs().max().item() <= 1e-5
    assert (folder / "report.html").read_text() == "kept"
    with pytest.raises(FileNotFoundError):
        write_compressed(model, tmp_path / "absent")


def test_tied_embedding_is_stored_once(tmp_path):
    from safetensors import safe_open

    model = tiny_llama(tied=True)
    out = save_compressed(model, tmp_path / "tied")
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert metadata["lm_head.weight"] == "model.embed_tokens.weight"


def test_weights_untied_before_saving_stay_untied(tmp_path):
    model = tiny_llama(tied=True)  # the config keeps saying tie_word_embeddings=True
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() * 3)
    before = _logits(model)
    loaded, _ = load(save_compressed(model, tmp_path / "out"))
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert (_logits(loaded) - before).abs().max().item() <= 1e-5


def test_file_shrinks_by_the_removed_parameters(tmp_path):
    dense = tiny_llama()
    compressed = tiny_llama()
    plan = block_plan(compressed)
    apply_plan(compressed, plan, progress=False)
    dense_size = (save_compressed(dense, tmp_path / "dense") / "model.safetensors").stat().st_size
    small_size = (
        (save_compressed(compressed, tmp_path / "small") / "model.safetensors").stat().st_size
    )
    removed_bytes = plan.params_removed() * 4  # float32
    assert removed_bytes > 100_000
    # Only the safetensors JSON header differs besides the tensors themselves.
    assert abs((dense_size - small_size) - removed_bytes) < 4096


def test_tokenizer_is_saved_and_loaded(tmp_path):
    model = tiny_gpt2()
    tokenizer = _tokenizer()
    out = save_compressed(model, tmp_path / "out", tokenizer=tokenizer)
    _, loaded_tok = load(out)
    assert loaded_tok is not None
    assert loaded_tok("hello noise world")["input_ids"] == [1, 3, 2]


def test_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_compressed(tiny_llama(), out)
    assert (out / "keep.txt").read_text() == "mine"
    save_compressed(tiny_llama(), out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "laserrmt.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup left


def test_output_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        save_compressed(tiny_llama(), target, overwrite=True)


def _boom(*args, **kwargs):
    raise RuntimeError("disk full")


def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(shards.shutil, "copyfileobj", _boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(tiny_llama(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_overwrite_keeps_the_old_output(tmp_path, monkeypatch):
    out = save_compressed(tiny_gpt2(), tmp_path / "out")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(shards.shutil, "copyfileobj", _boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(tiny_llama(), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_errors_are_one_line(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ModelLoadError, match=r"no laserrmt\.json.*from_pretrained") as info:
        load(plain)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="is not a folder"):
        load(tmp_path / "absent")

    out = save_compressed(tiny_llama(), tmp_path / "out")
    meta = json.loads((out / "laserrmt.json").read_text())
    meta["format_version"] = 99
    (out / "laserrmt.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="format_version 99"):
        load(out)

    meta["format_version"] = 1
    meta["architecture"] = "os.system"
    (out / "laserrmt.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="not a transformers model class"):
        load(out)

    meta["architecture"] = "LlamaForCausalLM"
    meta["modules"] = {"model.layers.0.mlp.up_proj": {"type": "MadeUpLinear", "config": {}}}
    (out / "laserrmt.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="unknown compressed module type 'MadeUpLinear'"):
        load(out)


def test_shape_mismatch_is_a_model_load_error(tmp_path):
    model = tiny_llama()
    apply_plan(model, block_plan(model), progress=False)
    out = save_compressed(model, tmp_path / "out")
    meta = json.loads((out / "laserrmt.json").read_text())
    name = next(iter(meta["modules"]))
    meta["modules"][name]["config"]["rank"] = 5  # shell no longer fits the stored factors
    (out / "laserrmt.json").write_text(json.dumps(meta))
    shapes = r"A has shape \(\d+, 8\).*\(\d+, 5\)|B has shape \(8, \d+\).*\(5, \d+\)"
    with pytest.raises(ModelLoadError, match=rf"tensor {name}\.({shapes})"):
        load(out)


def test_load_into_a_model_without_transformers_config(tmp_path):
    torch.manual_seed(0)

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)
        )

    model = build()
    model[0] = LowRankConv2d.from_conv(model[0], 3)
    model[3] = LowRankLinear.from_linear(model[3], 4)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    out = save_compressed(model, tmp_path / "cnn")
    assert not (out / "config.json").exists()
    with pytest.raises(ModelLoadError, match="load_into"):
        load(out)
    fresh = load_into(build(), out)
    assert isinstance(fresh[0], LowRankConv2d) and isinstance(fresh[3], LowRankLinear)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_load_with_dtype_casts(tmp_path):
    out = save_compressed(tiny_llama(), tmp_path / "out")
    model, _ = load(out, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Plain transformers: a folder it cannot rebuild is refused, never filled with random layers
# (test_hf_remote_code: with trust_remote_code=True it loads)


def _factorized(model: nn.Module) -> nn.Module:
    apply_plan(model, block_plan(model), progress=False)
    return model


def _int8(model: nn.Module) -> nn.Module:
    from laserrmt.surgery.quantize import quantize_model_int8

    quantize_model_int8(model)
    return model


def _width_cut(model: nn.Module) -> nn.Module:
    """One MLP of the tiny Llama cut from 128 to 96 units (registered resized layers)."""
    import laserrmt.surgery.width  # noqa: F401 - registers the resized layers
    from laserrmt.surgery.registry import registered_modules

    resized = registered_modules()["ResizedLinear"]
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for name, rows, cols in (("gate_proj", 96, 64), ("up_proj", 96, 64), ("down_proj", 64, 96)):
            layer = resized(cols, rows, bias=False)
            layer.weight.copy_(getattr(mlp, name).weight[:rows, :cols])
            setattr(mlp, name, layer)
    return model


def _untied(model: nn.Module) -> nn.Module:
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() * 3)
    return model


@pytest.mark.parametrize(
    ("change", "tied"),
    [(_factorized, False), (_int8, False), (_width_cut, False), (_untied, True)],
    ids=["factorized", "int8", "width-cut", "untied-but-config-ties"],
)
def test_plain_transformers_refuses_a_folder_it_would_fill_at_random(tmp_path, change, tied):
    import transformers

    model = change(tiny_llama(tied=tied))
    out = save_compressed(model, tmp_path / "out")
    model_type = json.loads((out / "config.json").read_text())["model_type"]
    assert model_type not in transformers.CONFIG_MAPPING
    for auto in (
        transformers.AutoConfig,
        transformers.AutoModelForCausalLM,
        transformers.AutoModel,
    ):
        # The folder's own modelling code runs only when the user trusts it.
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            auto.from_pretrained(out, trust_remote_code=False)
    loaded, _ = load(out)
    assert type(loaded.config) is type(model.config)
    assert (_logits(loaded) - _logits(model)).abs().max().item() <= 1e-5


def test_plain_transformers_loads_a_denoised_folder(tmp_path):
    import transformers

    model = tiny_llama()
    decisions = [
        ModuleDecision(name, tuple(m.weight.shape), min(m.weight.shape), 4, "denoise")
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in name
    ]
    apply_plan(model, CompressionPlan.from_decisions(decisions, method="test"), progress=False)
    out = save_compressed(model, tmp_path / "out")
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = _logits(model)
    assert (_logits(plain) - expected).abs().max().item() <= 1e-5
    assert (_logits(load(out)[0]) - expected).abs().max().item() <= 1e-5
