"""End to end on the real default model (SmolLM2-135M): analysis, compression, save and reload."""

from __future__ import annotations

import json

import pytest
import torch

import laserrmt
from laserrmt.cli import main
from laserrmt.data.text import evaluation_windows
from laserrmt.evaluate import count_parameters, perplexity
from laserrmt.models.loading import load_model
from laserrmt.pipeline import compress
from laserrmt.surgery.io import weight_bytes
from laserrmt.surgery.lowrank import LowRankLinear

pytestmark = pytest.mark.slow


def test_analyze_cli_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["--quiet", "analyze", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "210 matrices, 106,168,320 parameters" in stdout
    records = json.loads((out / "spectra.json").read_text())
    assert len(records) == 210
    by_name = {r["module"]: r for r in records}
    down = by_name["model.layers.10.mlp.down_proj"]
    assert down["shape"] == [576, 1536] and down["rank_full"] == 576
    assert 0 < down["rank_kept"] < 576 and down["sigma"] > 0
    assert {r["role"] for r in records} == {
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.o",
        "mlp.gate",
        "mlp.up",
        "mlp.down",
    }
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 8


def test_compress_save_reload_and_evaluate(default_model, tmp_path):
    copy = load_model(default_model.path)
    windows = evaluation_windows(copy.tokenizer, n_windows=2)
    targets = ["block:29"]
    model, result = compress(
        copy.model, copy.tokenizer, targets=targets, threshold="gd", progress=False
    )
    factorized = [d.module for d in result.plan if d.mode == "factorize"]
    assert factorized and all(isinstance(model.get_submodule(n), LowRankLinear) for n in factorized)
    names = list(result.plan.decisions)
    dense_params = count_parameters(default_model.model, names)["params_targets"]
    assert (
        dense_params - count_parameters(model, names)["params_targets"]
        == result.plan.params_removed()
        > 0
    )

    out = laserrmt.save(model, tmp_path / "out", tokenizer=copy.tokenizer, plan=result.plan)
    reloaded, _ = laserrmt.load(out)
    with torch.no_grad():
        before = model(windows[:1]).logits
        after = reloaded(windows[:1]).logits
    assert (before - after).abs().max().item() <= 1e-5
    # Smaller on disk by the removed parameters (fp32), up to the file's header.
    expected = weight_bytes(default_model.model) - 4 * result.plan.params_removed()
    assert abs((out / "model.safetensors").stat().st_size - expected) < 1_000_000

    dense = perplexity(default_model.model, windows, progress=False).perplexity
    compressed = perplexity(reloaded, windows, progress=False).perplexity
    assert 5 < dense < 40
    # Weight-space thresholds cut deep into this model (its bulk carries signal): a real loss,
    # measured on text, but a finite one.
    assert dense < compressed < 20 * dense


def test_budget_compression_with_whitening(default_model):
    copy = load_model(default_model.path)
    model, result = compress(
        copy.model,
        copy.tokenizer,
        method="budget",
        whiten="svdllm",
        target_params=0.2,
        targets=["block:28-29"],
        calibration_windows=2,
        progress=False,
    )
    assert result.plan.params_removed() >= 0.2 * result.plan.params_before()
    windows = evaluation_windows(copy.tokenizer, n_windows=2)
    assert (
        perplexity(model, windows, progress=False).perplexity
        < 1.5 * perplexity(default_model.model, windows, progress=False).perplexity
    )
