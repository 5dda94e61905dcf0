"""`laserrmt export --format onnx --quantize int8`: ORT's weight-only int8 MatMuls.

The int8 graph is read back with ONNX Runtime alone and compared with the model run in torch
without a cache (full sequence), and its nodes are inspected with ``onnx``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from laserrmt.errors import InvalidOptionError
from laserrmt.export.onnx import INT8_BLOCK, export_onnx
from tests.tiny_models import TINY_VOCAB_SIZE, tiny_llama

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _full_sequence_logits(folder: Path, ids: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {
        "input_ids": ids.numpy(),
        "attention_mask": np.ones(ids.shape, dtype=np.int64),
        "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
    }
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    return np.asarray(session.run(["logits"], feed)[0])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    model = tiny_llama().eval()
    root = tmp_path_factory.mktemp("onnx")
    export_onnx(model, root / "float", prompt_tokens=4, decode_steps=1)
    export_onnx(model, root / "int8", quantize="int8", prompt_tokens=4, decode_steps=1)
    return model, root / "float", root / "int8"


def test_every_constant_matmul_becomes_an_8_bit_matmulnbits(
    exported: tuple[torch.nn.Module, Path, Path],
) -> None:
    _, _, folder = exported
    graph = onnx.load(str(folder / "model.onnx")).graph
    constants = {t.name for t in graph.initializer}
    quantized = [n for n in graph.node if n.op_type == "MatMulNBits"]
    # 2 blocks × 7 projections, and the head, which is tied to the embedding in tiny_llama.
    assert len(quantized) == 2 * 7 + 1
    for node in quantized:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["bits"] == 8 and attributes["block_size"] == INT8_BLOCK
        assert attributes["accuracy_level"] == 4
    # What stays float: attention's two activation products per block, and the embedding.
    float_matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(float_matmuls) == 2 * 2
    assert not any(n.input[1] in constants for n in float_matmuls)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in constants]
    assert len(gathers) == 1
    assert not {"MatMulInteger", "DynamicQuantizeLinear"} & {n.op_type for n in graph.node}
    report = json.loads((folder / "export.json").read_text())
    assert report["int8"]["quantized_matmuls"] == 15
    assert report["int8"]["tied_weights_untied"] == 1


def test_int8_logits_stay_close_to_float32(exported: tuple[torch.nn.Module, Path, Path]) -> None:
    """8-bit blocks of 32 weights round each weight by at most 1/510 of its block's range
    and each activation block by 1/254 of its largest value; summed over 64-128 inputs and
    15 products, the logits move by about 1 % of their scale. A wrong block layout or scale
    moves them by their whole scale, so 5 % separates the two with room on either side."""
    model, float_folder, int8_folder = exported
    ids = torch.randint(0, TINY_VOCAB_SIZE, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    float32 = _full_sequence_logits(float_folder, ids)
    int8 = _full_sequence_logits(int8_folder, ids)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(float32, expected, atol=1e-4 * max(1.0, scale), rtol=0)
    error = np.abs(int8 - expected).max()
    assert 0 < error <= 0.05 * scale  # quantized (not the float graph), and close
    agreement = np.mean(int8.argmax(-1) == expected.argmax(-1))
    assert agreement >= 0.9


def test_int8_weights_take_one_byte_each_plus_a_scale_and_zero_point_per_block(
    exported: tuple[torch.nn.Module, Path, Path],
) -> None:
    model, _, folder = exported
    graph = onnx.load(str(folder / "model.onnx")).graph
    sizes = {t.name: len(t.raw_data) for t in graph.initializer}
    quantized_weights = 0
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n, k = attributes["N"], attributes["K"]
        blocks = n * -(-k // INT8_BLOCK)
        weight, scales, zero_points = node.input[1:4]
        assert sizes[weight] == blocks * INT8_BLOCK  # one byte per weight (K padded to blocks)
        assert sizes[scales] == blocks * 4  # a float32 scale per block
        assert sizes[zero_points] == blocks  # an 8-bit zero point per block
        quantized_weights += n * k
    # Every linear weight of the blocks, and the tied head once more.
    linear = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    assert quantized_weights == linear + model.lm_head.weight.numel()


def test_unknown_quantize_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="unknown --quantize 'int4'") as caught:
        export_onnx(tiny_llama(), tmp_path / "out", quantize="int4")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
