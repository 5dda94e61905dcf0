"""`laserrmt export`: ONNX graphs with a key/value cache and standard transformers folders.

Each exported artefact is read back by its own runtime (ONNX Runtime; plain transformers
without laserrmt) and compared with the compressed model as ``laserrmt.load`` rebuilds it,
run in the test without a cache (full sequence), so neither side is the exporter's own check.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import laserrmt
from laserrmt.cli import main
from laserrmt.errors import TargetSelectionError
from laserrmt.export import export_hf
from laserrmt.plan import CompressionPlan
from laserrmt.surgery.lowrank import LowRankLinear, denoise_
from laserrmt.surgery.quantize import quantize_model_int8
from laserrmt.surgery.replace import set_submodule
from laserrmt.surgery.width.modules import ResizedLinear
from laserrmt.surgery.width.residual import slice_residual_stream
from tests.tiny_models import tiny_llama

ort = pytest.importorskip("onnxruntime")


def _factorize(model: nn.Module, rank: int = 8) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in name:
            set_submodule(model, name, LowRankLinear.from_linear(module, rank, name=name))


def _cut_mlp(model: nn.Module, widths: list[int]) -> None:
    """Keep the first ``widths[i]`` units of block i's MLP (an exact function of the cut)."""
    for layer, width in zip(model.model.layers, widths, strict=True):
        mlp = layer.mlp
        for attr, rows in (("gate_proj", True), ("up_proj", True), ("down_proj", False)):
            old = getattr(mlp, attr)
            shape = (old.in_features, width) if rows else (width, old.out_features)
            new = ResizedLinear(*shape, bias=False)
            with torch.no_grad():
                new.weight.copy_(old.weight[:width] if rows else old.weight[:, :width])
            setattr(mlp, attr, new)


def _residual_cut(model: nn.Module, k: int) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=generator, dtype=torch.float64)
    x[:, :16] *= 5  # a planted dominant subspace
    slice_residual_stream(model, x.T @ x / 256, k)


def _saved(tmp_path: Path, name: str, change: Callable[[nn.Module], object]) -> Path:
    model = tiny_llama()
    change(model)
    folder = tmp_path / name
    laserrmt.save(model, folder)
    return folder


def _full_logits(model: nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()


def _ort_decode_logits(folder: Path, ids: torch.Tensor, prompt: int) -> list[np.ndarray]:
    """Prompt, then one token at a time through the graph's cache, with ONNX Runtime alone."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    past = {}
    for i in session.get_inputs():
        if i.name in past_names:
            past[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    logits, done = [], 0
    chunks = [ids[:, :prompt]] + [ids[:, t : t + 1] for t in range(prompt, ids.shape[1])]
    for chunk in chunks:
        n = chunk.shape[1]
        feed = {
            "input_ids": chunk.numpy(),
            "attention_mask": np.ones((1, done + n), dtype=np.int64),
            "position_ids": np.arange(done, done + n, dtype=np.int64)[None],
            **past,
        }
        out = session.run(None, feed)
        logits.append(out[0])
        past = dict(zip(past_names, out[1:], strict=True))
        done += n
    return logits


CHANGES = {
    "dense": lambda m: None,
    "factorized": _factorize,
    "int8_low_rank": lambda m: (_factorize(m), quantize_model_int8(m)),
    "mlp_cut": lambda m: _cut_mlp(m, [96, 80]),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CHANGES))
def test_onnx_decodes_with_cache_like_torch(tmp_path: Path, kind: str) -> None:
    folder = _saved(tmp_path, kind, CHANGES[kind])
    out = tmp_path / "onnx"
    assert main(["export", str(folder), "--format", "onnx", "--out", str(out), "-q"]) == 0
    model, _ = laserrmt.load(folder)
    ids = torch.randint(0, 264, (1, 12), generator=torch.Generator().manual_seed(3))
    prompt = 9
    expected = _full_logits(model, ids)
    got = _ort_decode_logits(out, ids, prompt)
    np.testing.assert_allclose(got[0], expected[:, :prompt], atol=1e-4, rtol=0)
    for step, logits in enumerate(got[1:]):  # three decode steps through the cache
        np.testing.assert_allclose(logits[:, 0], expected[:, prompt + step], atol=1e-4, rtol=0)
    report = json.loads((out / "export.json").read_text())
    assert report["check"]["max_abs_logit_diff_vs_torch"] <= 1e-4
    assert report["check"]["decode_steps"] == 3
    if kind == "factorized":  # two MatMuls per factorized layer: 7 per block, 2 blocks
        import onnx

        graph = onnx.load(str(out / "model.onnx")).graph
        assert sum(node.op_type == "MatMul" for node in graph.node) >= 2 * 2 * 7


@pytest.mark.slow
def test_onnx_int8_runs_and_reports_its_error(tmp_path: Path) -> None:
    folder = _saved(tmp_path, "factorized", _factorize)
    out = tmp_path / "onnx8"
    assert (
        main(
            [
                "export",
                str(folder),
                "--format",
                "onnx",
                "--quantize",
                "int8",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    import onnx

    ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops  # ORT's weight-only int8 kernels
    report = json.loads((out / "export.json").read_text())
    error = report["int8"]["max_abs_logit_diff_vs_float32_onnx"]
    assert 0 < error < 0.5  # int8 rounding shows, and stays small on logits of order 1
    model, _ = laserrmt.load(folder)
    ids = torch.randint(0, 264, (1, 8), generator=torch.Generator().manual_seed(4))
    got = _ort_decode_logits(out, ids, 8)[0]
    assert np.abs(got - _full_logits(model, ids)).max() < 0.5


def _hf_matches(folder: Path, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    assert main(["export", str(folder), "--format", "hf", "--out", str(out), "-q"]) == 0
    assert not (out / "laserrmt.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    model, _ = laserrmt.load(folder)
    ids = torch.randint(0, 264, (2, 10), generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(
        _full_logits(plain, ids), _full_logits(model, ids), atol=1e-5, rtol=0
    )
    return json.loads((out / "export.json").read_text())


def test_hf_factorized_and_int8_are_multiplied_back(tmp_path: Path) -> None:
    report = _hf_matches(
        _saved(
            tmp_path,
            "i8",
            lambda m: (
                _factorize(m),
                quantize_model_int8(
                    m, ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
                ),
            ),
        ),
        tmp_path / "hf",
    )
    assert report["layers_densified"] == {"int8": 2, "factorized": 14, "resized": 0}
    assert any("multiplied back" in line for line in report["lost"])
    assert any("dequantized" in line for line in report["lost"])


def test_hf_int8_dense_layers(tmp_path: Path) -> None:
    report = _hf_matches(_saved(tmp_path, "q", quantize_model_int8), tmp_path / "hf")
    assert report["layers_densified"]["int8"] == 14
    assert report["weight_bytes"] > report["source_weight_bytes"]


def test_hf_denoise_and_residual_cut_survive(tmp_path: Path) -> None:
    def change(model: nn.Module) -> None:
        for layer in model.model.layers:
            denoise_(layer.mlp.down_proj, 4)
        _residual_cut(model, 48)

    model = tiny_llama()
    change(model)
    denoised = {"shape": [64, 128], "rank": 4, "mode": "denoise"}
    plan = CompressionPlan.from_dict(
        {"modules": {f"model.layers.{i}.mlp.down_proj": denoised for i in range(2)}}
    )
    folder = tmp_path / "res"
    laserrmt.save(model, folder, plan=plan)
    report = _hf_matches(folder, tmp_path / "hf")
    assert report["survives"][0] == "denoise of 2 layers (same shapes)"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == 48
    assert report["lost"] == []
    assert any("hidden_size 48" in line for line in report["survives"])


def test_hf_uniform_mlp_width_goes_into_the_config(tmp_path: Path) -> None:
    _hf_matches(_saved(tmp_path, "u", lambda m: _cut_mlp(m, [96, 96])), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["intermediate_size"] == 96


def test_hf_refuses_per_block_mlp_widths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _saved(tmp_path, "cut", lambda m: _cut_mlp(m, [96, 80]))
    out = tmp_path / "hf"
    assert main(["export", str(folder), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "80, 96" in err and "--format onnx" in err
    assert not out.exists()
    model, _ = laserrmt.load(folder)
    with pytest.raises(TargetSelectionError, match="MLP widths differ"):
        export_hf(model, out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "gif"], "unknown --format 'gif'"),
        (["--format", "hf", "--quantize", "int8"], "--quantize applies to --format onnx only"),
        (["--format", "onnx", "--quantize", "int4"], "unknown --quantize 'int4'"),
    ],
)
def test_cli_option_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "out"
    assert main(["export", str(tmp_path), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not out.exists()


def test_cli_refuses_an_existing_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    assert main(["export", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_missing_onnxruntime_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    out = tmp_path / "out"
    assert main(["export", str(tmp_path), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'laserrmt[export]'" in err and err.count("\n") == 0
