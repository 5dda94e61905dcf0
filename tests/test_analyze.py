"""The analyze pipeline and its outputs, on tiny models with planted low-rank weights."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from laserrmt.analyze import add_whitened_ranks, analyze_model, write_analysis
from laserrmt.errors import OutputExistsError
from laserrmt.models.targets import find_targets, set_weight_matrix, weight_matrix
from tests.tiny_models import tiny_gpt2, tiny_llama

PLANTED_RANK = 3


def plant_low_rank(
    model: torch.nn.Module, rank: int = PLANTED_RANK, sigma: float = 0.02, seed: int = 0
):
    """Replace every target by U diag(θ) Vᵀ + σZ with spikes far above the BBP point."""
    gen = torch.Generator().manual_seed(seed)
    for target in find_targets(model):
        m, n = target.shape
        u, _ = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))
        edge = sigma * (math.sqrt(max(m, n)) + math.sqrt(min(m, n)))
        theta = torch.tensor([6.0, 4.5, 3.0][:rank], dtype=torch.float64) * edge
        w = u @ torch.diag(theta) @ v.T + sigma * torch.randn(
            m, n, generator=gen, dtype=torch.float64
        )
        with torch.no_grad():
            set_weight_matrix(model.get_submodule(target.name), w.float())
    return model


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("threshold", ["mp", "tw", "gd"])
def test_planted_ranks_are_found(build, threshold):
    model = plant_low_rank(build())
    result = analyze_model(model, threshold=threshold, progress=False)
    assert len(result.records) == len(find_targets(model))
    assert {r["rank_kept"] for r in result.records} == {PLANTED_RANK}
    for r in result.records:
        assert r["n_spikes"] == PLANTED_RANK
        assert r["sigma"] == pytest.approx(
            0.02, rel=0.2
        )  # small matrices: median matching is biased by the spikes
        assert 0.3 < r["snr"] < 2  # three strong spikes against a bulk of ~60 noise values


def test_analysis_does_not_modify_the_model():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyze_model(model, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_targets_restrict_the_analysis():
    model = tiny_llama()
    result = analyze_model(model, targets=["role:mlp.down"], progress=False)
    assert [r["module"] for r in result.records] == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_vectors_kept_reproduce_the_weight():
    model = tiny_llama()
    result = analyze_model(
        model, targets=["model.layers.0.self_attn.q_proj"], keep_vectors=True, progress=False
    )
    u, s, vh = result.svd_cache()["model.layers.0.self_attn.q_proj"]
    w = weight_matrix(model.get_submodule("model.layers.0.self_attn.q_proj")).double()
    assert torch.allclose(u @ torch.diag(s) @ vh, w, atol=1e-10)


def test_nan_weights_are_reported_and_the_others_analysed():
    model = tiny_llama()
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.up_proj").weight[0, 0] = float("nan")
    result = analyze_model(model, progress=False)
    assert [f.module for f in result.failures] == ["model.layers.1.mlp.up_proj"]
    assert "NaN or Inf" in result.failures[0].reason
    assert len(result.records) == len(find_targets(model)) - 1


def test_outputs_are_written_and_consistent(tmp_path):
    model = plant_low_rank(tiny_llama())
    result = analyze_model(model, progress=False)
    out = write_analysis(result, tmp_path / "analysis", model_source="tiny llama")
    records = json.loads((out / "spectra.json").read_text())
    with open(out / "spectra.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["module"] for r in records] == [r["module"] for r in rows]
    required = {
        "module",
        "shape",
        "rank_full",
        "rank_kept",
        "threshold",
        "sigma",
        "edge",
        "snr",
        "spectral_entropy",
        "stable_rank",
        "alpha",
        "n_spikes",
    }
    assert required <= set(records[0])
    assert all(int(r["rank_kept"]) == PLANTED_RANK for r in rows)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "heatmap_snr.png" in pngs and "heatmap_kept_fraction.png" in pngs
    assert sum(p.startswith("esd_") for p in pngs) == 6
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "model.layers.0.mlp.down_proj" in html
    # No temporary folder is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["analysis"]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    result = analyze_model(tiny_llama(), progress=False)
    out = tmp_path / "a"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        write_analysis(result, out, model_source="tiny")
    assert (out / "keep.txt").read_text() == "mine"
    write_analysis(result, out, model_source="tiny", overwrite=True)
    assert (out / "report.html").exists() and not (out / "keep.txt").exists()


def test_whitened_ranks_follow_the_calibration_inputs():
    """With inputs confined to a 5-dimensional subspace, W·S has at most 5 directions: the
    whitened rank sees what the weight alone cannot."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40))
    basis = torch.randn(5, 48)
    calibration = (torch.randn(4, 200, 5) @ basis) + 1e-4 * torch.randn(4, 200, 48)
    result = analyze_model(model, progress=False)
    assert result.records[0]["rank_kept"] == 0  # a random init is pure noise to the MP rule
    add_whitened_ranks(result, model, calibration, whiten="svdllm", progress=False)
    assert result.records[0]["whitened_rank_kept"] == 5
    assert result.summary()["whitened_rank_kept_fraction"] == 5 / 40
