"""`laserrmt export --format onnx` of BERT-style encoders and sequence classifiers.

Each graph is run with ONNX Runtime alone and compared with the model run in torch in the test
(not with the exporter's own check): on right-padded batches with an attention mask, on a batch
and sequence length other than those the graph was traced with, and row by row against the same
rows unpadded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import laserrmt
from laserrmt.cli import main
from laserrmt.errors import TargetSelectionError
from laserrmt.export.onnx import export_onnx
from laserrmt.surgery.lowrank import LowRankLinear
from laserrmt.surgery.replace import set_submodule
from laserrmt.surgery.width import collect_site_statistics, cut_width, find_width_sites
from tests.tiny_models import TINY_VOCAB_SIZE, tiny_bert, tiny_cnn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

#: Per-block widths of the RMT-KD-style cut: (attention value/output, query/key, MLP).
CUT_WIDTHS = [(24, 28, 40), (32, 20, 56)]
RANK = 8


def _classifier() -> nn.Module:
    """A tiny classifier whose logits are of order 1 (a random head gives ~0.01, too small
    for a 1e-4 comparison or a label to mean anything)."""
    model = tiny_bert(num_labels=3)
    with torch.no_grad():
        model.classifier.weight.mul_(100.0)
    return model


def _factorized() -> nn.Module:
    model = _classifier()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".encoder." in name:
            set_submodule(model, name, LowRankLinear.from_linear(module, RANK, name=name))
    return model


def _width_cut() -> nn.Module:
    """Every attention and MLP width cut as RMT-KD cuts it, to other widths in each block."""
    model = _classifier()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, TINY_VOCAB_SIZE, (4, 16), generator=g)}]
    widths = [w for block in CUT_WIDTHS for w in block]
    for site, width in zip(find_width_sites(model), widths, strict=True):
        stats = collect_site_statistics(model, batches, [site], progress=False)[site.name]
        cut_width(model, site, stats, width)
    return model


BUILDS: dict[str, Callable[[], nn.Module]] = {
    "encoder": tiny_bert,
    "classifier": _classifier,
    "factorized": _factorized,
    "width_cut": _width_cut,
}


def _output(model: nn.Module) -> str:
    return "logits" if hasattr(model, "classifier") else "last_hidden_state"


@pytest.fixture(scope="module", params=list(BUILDS))
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, nn.Module, Path]:
    model = BUILDS[request.param]()
    folder = tmp_path_factory.mktemp(request.param) / "onnx"
    export_onnx(model, folder, check_rows=4, check_tokens=12)
    return request.param, model, folder


def _batch(rows: int, lengths: list[int], seed: int) -> dict[str, np.ndarray]:
    """Right-padded rows (pad id 0, mask 0) with random token types."""
    g = np.random.default_rng(seed)
    tokens = max(lengths)
    mask = (np.arange(tokens)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return {
        "input_ids": g.integers(1, TINY_VOCAB_SIZE, (rows, tokens)) * mask,
        "attention_mask": mask,
        "token_type_ids": g.integers(0, 2, (rows, tokens)) * mask,
    }


def _ort(folder: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feed)[0])


def _torch(model: nn.Module, feed: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    return np.asarray(getattr(out, _output(model)).numpy())


def test_onnx_runtime_equals_torch_on_a_padded_batch(
    exported: tuple[str, nn.Module, Path],
) -> None:
    _, model, folder = exported
    # 5 rows, 17 tokens: neither the traced example's sizes (2 × 3) nor the check's (4 × 12).
    feed = _batch(5, [17, 9, 3, 17, 1], seed=1)
    got, expected = _ort(folder, feed), _torch(model, feed)
    assert got.shape == expected.shape
    if expected.ndim == 3:  # hidden states where the mask is 1; padding has no meaning
        got, expected = got[feed["attention_mask"] == 1], expected[feed["attention_mask"] == 1]
    assert np.abs(expected).max() > 0.5  # the outputs are large enough to tell 1e-4 apart
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_a_padded_batch_equals_each_row_alone(exported: tuple[str, nn.Module, Path]) -> None:
    _, _, folder = exported
    lengths = [14, 6, 2]
    feed = _batch(3, lengths, seed=2)
    padded = _ort(folder, feed)
    for row, n in enumerate(lengths):
        alone = _ort(folder, {k: v[row : row + 1, :n] for k, v in feed.items()})[0]
        got = padded[row, :n] if padded.ndim == 3 else padded[row]
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)


def test_the_graph_has_dynamic_axes_and_reports_its_check(
    exported: tuple[str, nn.Module, Path],
) -> None:
    name, model, folder = exported
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(isinstance(d, str) for shape in inputs.values() for d in shape)
    report = json.loads((folder / "export.json").read_text())
    expected_kind = "encoder" if name == "encoder" else "sequence-classifier"
    assert report["kind"] == expected_kind
    assert report["outputs"] == [_output(model)]
    assert report["check"]["rows"] == 4 and report["check"]["padded_rows"] == 3
    assert report["check"]["max_abs_diff_vs_torch"] <= 1e-4


def _constant_matmul_weights(folder: Path) -> list[tuple[int, ...]]:
    graph = onnx.load(str(folder / "model.onnx")).graph
    constants = {t.name: tuple(t.dims) for t in graph.initializer}
    return [
        constants[n.input[1]]
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in constants
    ]


def test_factorized_layers_are_two_matmuls_and_cut_widths_stay(
    exported: tuple[str, nn.Module, Path],
) -> None:
    name, _, folder = exported
    weights = _constant_matmul_weights(folder)
    if name == "factorized":
        # 2 blocks × 6 linear layers (q, k, v, attention output, MLP in and out), each two
        # products through the rank: in × 8, then 8 × out.
        assert len(weights) == 2 * 6 * 2
        assert sum(RANK in shape for shape in weights) == len(weights)
    elif name == "width_cut":
        # Per block: q, k (32 × qk), v (32 × vo), attention output (vo × 32), MLP (32 × m, m × 32).
        expected = []
        for vo, qk, mlp in CUT_WIDTHS:
            expected += [(32, qk), (32, qk), (32, vo), (vo, 32), (32, mlp), (mlp, 32)]
        assert sorted(weights) == sorted(expected)


def test_int8_uses_ort_weight_only_kernels_and_keeps_the_labels(tmp_path: Path) -> None:
    model = _classifier()
    report = export_onnx(model, tmp_path / "int8", quantize="int8", check_rows=16, check_tokens=24)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 * 6  # every linear layer of the blocks
    feed = _batch(8, [20, 17, 13, 11, 8, 5, 3, 2], seed=3)
    int8, expected = _ort(tmp_path / "int8", feed), _torch(model, feed)
    error = np.abs(int8 - expected).max()
    # 8-bit blocks move logits of order 1 by about 1e-3 (see test_export_onnx_quant); a wrong
    # block layout or scale moves them by their whole size.
    assert 0 < error <= 0.01 * np.abs(expected).max()
    # The labels' margins here are ≥ 0.08, far above that error: every label must survive.
    assert np.array_equal(int8.argmax(-1), expected.argmax(-1))
    reported = report["int8"]["max_abs_diff_vs_float32_onnx"]
    assert error / 10 < reported < error * 10  # the report measures the same kind of error
    assert report["int8"]["label_agreement_vs_float32_onnx"] == 1.0


def test_cli_exports_a_saved_width_cut_classifier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "cut"
    laserrmt.save(_width_cut(), folder)
    out = tmp_path / "onnx"
    assert main(["export", str(folder), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "float32 logits on 16 padded rows" in printed
    model, _ = laserrmt.load(folder)
    feed = _batch(2, [10, 4], seed=4)
    np.testing.assert_allclose(_ort(out, feed), _torch(model, feed), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "build",
    [tiny_cnn, lambda: _masked_lm()],
    ids=["cnn", "masked_lm"],
)
def test_what_cannot_be_exported_is_refused_in_one_line(
    tmp_path: Path, build: Callable[[], nn.Module]
) -> None:
    with pytest.raises(TargetSelectionError, match="ONNX export covers those three") as caught:
        export_onnx(build(), tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def _masked_lm() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    return BertForMaskedLM(config).eval()
