"""`laserrmt export --format gguf`: a Llama-style causal LM as one GGUF file.

Every written file is read back by transformers' own GGUF loader (no laserrmt) and compared
with the compressed model as ``laserrmt.load`` rebuilds it; the rotary reordering is checked
against the two rotary conventions written out here from their definitions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import laserrmt
from laserrmt.cli import main
from laserrmt.errors import TargetSelectionError
from laserrmt.export.gguf import export_gguf, to_gguf_rotary_order
from laserrmt.plan import CompressionPlan
from laserrmt.surgery.lowrank import LowRankLinear, denoise_
from laserrmt.surgery.quantize import quantize_model_int8
from laserrmt.surgery.replace import set_submodule
from laserrmt.surgery.width.modules import ResizedLinear
from laserrmt.surgery.width.residual import slice_residual_stream
from tests.tiny_models import EOS_TOKEN, TINY_VOCAB_SIZE, tiny_gemma, tiny_llama, tiny_tokenizer

gguf = pytest.importorskip("gguf")

TEXT = "the rain in the plain stays mainly in the train, then the main rain trains"


def bpe_tokenizer() -> Any:
    """A byte-level BPE with learned merges (GGUF needs them), 2 ids short of the model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE - 2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS_TOKEN],
        show_progress=False,
    )
    backend.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN)


def _rotate_half(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding: feature i turns with feature i + half."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def _rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """llama.cpp's rotary embedding: feature 2i turns with feature 2i + 1."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)


def test_reordered_rows_make_llama_cpp_rotary_equal_transformers_rotary() -> None:
    heads, head_dim, width = 3, 8, 5
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(heads * head_dim, width, generator=generator, dtype=torch.float64)
    x = torch.randn(width, generator=generator, dtype=torch.float64)
    angles = torch.rand(head_dim // 2, generator=generator, dtype=torch.float64) * 6
    hf = _rotate_half((weight @ x).reshape(heads, head_dim), angles)
    cpp = _rotate_pairs((to_gguf_rotary_order(weight, heads) @ x).reshape(heads, head_dim), angles)
    # The same rotated features, each at the row its reordering moved it to.
    order = [j * head_dim // 2 + i for i in range(head_dim // 2) for j in range(2)]
    torch.testing.assert_close(cpp, hf[:, order], rtol=0, atol=1e-12)
    assert not torch.allclose(_rotate_pairs((weight @ x).reshape(heads, head_dim), angles), hf)


def _factorize(model: nn.Module, rank: int = 8) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in name:
            set_submodule(model, name, LowRankLinear.from_linear(module, rank, name=name))


def _cut_mlp(model: nn.Module, widths: list[int]) -> None:
    """Keep the first ``widths[i]`` units of block i's MLP."""
    for layer, width in zip(model.model.layers, widths, strict=True):
        for attr, rows in (("gate_proj", True), ("up_proj", True), ("down_proj", False)):
            old = getattr(layer.mlp, attr)
            shape = (old.in_features, width) if rows else (width, old.out_features)
            new = ResizedLinear(*shape, bias=False)
            with torch.no_grad():
                new.weight.copy_(old.weight[:width] if rows else old.weight[:, :width])
            setattr(layer.mlp, attr, new)


def _saved(
    tmp_path: Path,
    change: Callable[[nn.Module], object],
    *,
    plan: CompressionPlan | None = None,
    untied: bool = False,
    **config: Any,
) -> Path:
    model = tiny_llama(tie_word_embeddings=not untied, **config)
    change(model)
    folder = tmp_path / "compressed"
    laserrmt.save(model, folder, tokenizer=bpe_tokenizer(), plan=plan)
    return folder


def _export(folder: Path, out: Path, *extra: str) -> dict:
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out), "-q", *extra]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.gguf"]
    return json.loads((out / "export.json").read_text())


def _logit_diff(folder: Path, out: Path) -> float:
    """Largest logit difference between transformers' read of the GGUF file and laserrmt.load."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(
        out, gguf_file="model.gguf", dtype=torch.float32
    ).eval()
    model, _ = laserrmt.load(folder)
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return float((plain(input_ids=ids).logits - model(input_ids=ids).logits).abs().max())


def _tensor_types(out: Path) -> dict[str, str]:
    reader = gguf.GGUFReader(out / "model.gguf")
    return {t.name: t.tensor_type.name for t in reader.tensors}


def test_denoise_and_residual_cut_round_trip_in_float32(tmp_path: Path) -> None:
    def change(model: nn.Module) -> None:
        for layer in model.model.layers:
            denoise_(layer.mlp.down_proj, 4)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(256, 64, generator=generator, dtype=torch.float64)
        x[:, :16] *= 5  # a planted dominant subspace
        slice_residual_stream(model, x.T @ x / 256, 48)

    denoised = {"shape": [64, 128], "rank": 4, "mode": "denoise"}
    plan = CompressionPlan.from_dict(
        {"modules": {f"model.layers.{i}.mlp.down_proj": denoised for i in range(2)}}
    )
    folder = _saved(tmp_path, change, plan=plan)
    out = tmp_path / "gguf"
    report = _export(folder, out, "--dtype", "float32")
    assert _logit_diff(folder, out) <= 1e-4
    assert report["survives"][0] == "denoise of 2 layers (same shapes)"
    assert any("embedding_length 48" in line for line in report["survives"])
    assert report["lost"] == []
    reader = gguf.GGUFReader(out / "model.gguf")
    assert int(reader.fields["llama.embedding_length"].contents()) == 48
    assert int(reader.fields["llama.rope.dimension_count"].contents()) == 16  # 64 / 4 heads
    assert set(_tensor_types(out).values()) == {"F32"}
    assert "output.weight" in _tensor_types(out)  # the cut folds the final norm into the head


def test_budget_folder_factors_and_int8_are_multiplied_back_in_float16(tmp_path: Path) -> None:
    def change(model: nn.Module) -> None:
        _cut_mlp(model, [96, 96])
        _factorize(model)
        quantize_model_int8(model, ["model.layers.0.self_attn.o_proj"])

    folder = _saved(tmp_path, change, untied=True)
    out = tmp_path / "gguf"
    report = _export(folder, out)
    # float16 matrices round each weight by up to 2^-11 of itself; on these logits (|z| < 3)
    # that moves them by a few 1e-4, far below the 1e-2 a wrong tensor or layout costs.
    assert _logit_diff(folder, out) <= 2e-3
    assert report["dtype"] == "float16"
    assert report["layers_densified"] == {"int8": 1, "factorized": 14, "resized": 0}
    assert any("multiplied back" in line for line in report["lost"])
    assert any("feed_forward_length 96" in line for line in report["survives"])
    types = _tensor_types(out)
    assert types["blk.0.ffn_up.weight"] == "F16" and types["output.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    reader = gguf.GGUFReader(out / "model.gguf")
    assert int(reader.fields["llama.feed_forward_length"].contents()) == 96


def test_bfloat16_matrices(tmp_path: Path) -> None:
    folder = _saved(tmp_path, lambda m: None)
    out = tmp_path / "gguf"
    _export(folder, out, "--dtype", "bfloat16")
    assert _tensor_types(out)["blk.1.attn_q.weight"] == "BF16"
    assert _logit_diff(folder, out) <= 2e-2  # bfloat16 keeps 8 bits of each weight


def test_tokenizer_and_hyper_parameters_travel_in_the_file(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    def sharpen(model: nn.Module) -> None:
        # Random init leaves attention nearly uniform, blind to positions and so to rope_theta.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight *= 30
                layer.self_attn.k_proj.weight *= 30

    # Hyper-parameters away from LlamaConfig's defaults, which a reader could fall back on.
    folder = _saved(tmp_path, sharpen, rope_theta=5e5, rms_norm_eps=1e-2)
    out = tmp_path / "gguf"
    _export(folder, out, "--dtype", "float32")
    assert "output.weight" not in _tensor_types(out)  # the tied head is the embedding
    assert _logit_diff(folder, out) <= 1e-4
    read = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    original = bpe_tokenizer()
    text = "the main train: Ünïcode, 3 spaces   and <|endoftext|> inside."
    ids = original(text)["input_ids"]
    assert any(len(original.convert_ids_to_tokens(i)) > 1 for i in ids)  # merges were used
    assert read(text)["input_ids"] == ids
    assert read.eos_token == EOS_TOKEN
    reader = gguf.GGUFReader(out / "model.gguf")
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == TINY_VOCAB_SIZE  # padded


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    return err


def test_refuses_per_block_widths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _saved(tmp_path, lambda m: _cut_mlp(m, [96, 80]))
    out = tmp_path / "gguf"
    err = _one_line_error(["export", str(folder), "--format", "gguf", "--out", str(out)], capsys)
    assert "MLP widths differ" in err and "80, 96" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("model", "tokenizer", "message"),
    [
        (lambda: tiny_gemma(), bpe_tokenizer, "LlamaForCausalLM) only, not GemmaForCausalLM"),
        (lambda: tiny_llama(attention_bias=True), bpe_tokenizer, "attention or MLP biases"),
        (lambda: tiny_llama(hidden_act="gelu"), bpe_tokenizer, "hidden_act 'gelu'"),
        (lambda: tiny_llama(), lambda: None, "has no tokenizer"),
        (lambda: tiny_llama(), tiny_tokenizer, "BPE has no merges"),
    ],
)
def test_refuses_what_the_llama_keys_cannot_hold(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: Callable[[], nn.Module],
    tokenizer: Callable[[], object],
    message: str,
) -> None:
    folder = tmp_path / "m"
    laserrmt.save(model(), folder, tokenizer=tokenizer())
    out = tmp_path / "gguf"
    err = _one_line_error(["export", str(folder), "--format", "gguf", "--out", str(out)], capsys)
    assert message in err
    assert not out.exists()


def test_refuses_a_tokenizer_that_is_not_byte_level_bpe(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    words = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(TargetSelectionError, match="not a byte-level BPE tokenizer"):
        export_gguf(tiny_llama(), tmp_path / "gguf", tokenizer=words)
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "hf", "--dtype", "float16"], "--dtype applies to --format gguf only"),
        (["--format", "gguf", "--dtype", "int4"], "unknown --dtype 'int4'"),
        (["--format", "gguf", "--quantize", "int8"], "--quantize applies to --format onnx only"),
    ],
)
def test_cli_option_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "out"
    err = _one_line_error(["export", str(tmp_path), *argv, "--out", str(out)], capsys)
    assert message in err
    assert not out.exists()


@pytest.mark.slow
def test_default_model_round_trip(default_model, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gguf"
    report = export_gguf(default_model.model, out, tokenizer=default_model.tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(
        out, gguf_file="model.gguf", dtype=torch.float32
    ).eval()
    ids = default_model.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = plain(input_ids=ids).logits.numpy()
        expected = default_model.model(input_ids=ids).logits.float().numpy()
    # float16 matrices move the tiny models' logits by 2e-4 of their largest; 30 blocks are
    # allowed 1e-2 of it.
    np.testing.assert_allclose(got, expected, atol=1e-2 * np.abs(expected).max(), rtol=0)
    assert report["check"]["max_abs_logit_diff_vs_same_weights"] <= report["check"]["tolerance"]
    assert np.argmax(got[0, -1]) == np.argmax(expected[0, -1])
