"""Width-reducing surgery: exact when nothing is cut, exact on planted subspaces, truly smaller."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from laserrmt.errors import PlanError, TargetSelectionError
from laserrmt.evaluate import count_parameters
from laserrmt.models.widths import WidthSite
from laserrmt.surgery.io import load, load_into, save_compressed
from laserrmt.surgery.width import (
    ReducedSelfAttention,
    ResizedConv2d,
    ResizedLinear,
    activation_rank,
    collect_site_statistics,
    cut_width,
    find_width_sites,
    query_key_maps,
    reconstruction_matrix,
    rotate_residual_stream,
    select_units,
    site_rank,
)
from tiny_models import tiny_bert, tiny_cnn, tiny_llama


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


class BNCNN(nn.Module):
    """conv → BN → ReLU → conv → BN → ReLU → pool → flatten → linear: both consumer kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _bn_cnn() -> BNCNN:
    torch.manual_seed(0)
    model = BNCNN()
    with torch.no_grad():  # non-trivial running statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


IMAGES = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def test_channel_sites_follow_the_chain() -> None:
    sites = find_width_sites(_bn_cnn())
    assert [(s.name, s.followers, s.consumer, s.width) for s in sites] == [
        ("features.0", ("features.1",), "features.3", 8),
        ("features.3", ("features.4",), "head.1", 12),
    ]


@pytest.mark.parametrize("build", [_bn_cnn, tiny_cnn])
def test_keeping_every_channel_reproduces_the_outputs(build) -> None:
    model = build()
    reference = model(IMAGES[0])
    sites = find_width_sites(model)
    stats = collect_site_statistics(model, IMAGES, sites, progress=False)
    for site in sites:
        cut_width(model, site, stats[site.name], site.width)
    assert _rel(model(IMAGES[0]), reference) <= 1e-5
    assert isinstance(model.get_submodule(sites[0].producers[0]), ResizedConv2d)


def test_channel_cut_removes_the_parameters_it_should() -> None:
    model = _bn_cnn()
    sites = find_width_sites(model)
    stats = collect_site_statistics(model, IMAGES, sites, progress=False)
    before = count_parameters(model)["params_total"]
    cut = cut_width(model, sites[1], stats[sites[1].name], 5)
    # Conv 8→12 loses 7 filters (8·9 + 1 each), BN 2 per channel, Linear 7·16 inputs per output.
    removed = 7 * (8 * 9 + 1) + 7 * 2 + 10 * 7 * 16
    assert cut.parameters_before == before
    assert (
        before - cut.parameters_after == removed == before - count_parameters(model)["params_total"]
    )
    assert model(IMAGES[0]).shape == (8, 10)


def test_a_planted_channel_subspace_is_reconstructed_exactly() -> None:
    """conv1's 12 channels are combinations of 3 filters: keeping 3 channels loses nothing."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1, bias=False), nn.Conv2d(12, 4, 3, padding=1)
    )
    with torch.no_grad():
        base = torch.randn(3, 1, 3, 3)
        mixing = torch.randn(12, 3)
        model[0].weight.copy_(torch.einsum("cr,rihw->cihw", mixing, base))
    model.eval()
    reference = model(IMAGES[0])
    site = find_width_sites(model)[0]
    stats = collect_site_statistics(model, IMAGES, [site], progress=False)
    kept = select_units(stats.__getitem__(site.name).second_moment, 3)
    cut_width(model, site, stats[site.name], 3, kept=kept)
    assert model[0].out_channels == 3 and model[1].in_channels == 3
    assert _rel(model(IMAGES[0]), reference) <= 1e-5


def test_the_mp_rule_finds_a_planted_activation_dimension() -> None:
    rng = np.random.default_rng(0)
    d, n, r = 64, 4000, 5
    signal = rng.standard_normal((d, r)) @ (rng.standard_normal((r, n)) * 3.0)
    x = signal + 0.5 * rng.standard_normal((d, n))
    second_moment = torch.from_numpy(x @ x.T / n)
    for estimator in ("mp_fit", "veraart"):
        assert activation_rank(second_moment, n, estimator=estimator).rank == r


def test_units_in_an_affine_subspace_are_rebuilt_exactly_through_the_linear_consumer_bias() -> None:
    """16 units = W z + b with z in 3 dimensions: a 3-dimensional subspace shifted off the
    origin. The covariance has rank 3 and a Linear consumer takes the intercept in its bias, so
    3 kept units rebuild all 16 exactly (through the origin it would take 4)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 16), nn.Identity(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].bias.uniform_(1.0, 2.0)
    site = WidthSite("units", "mlp", 16, producers=("0",), consumer="2")
    batches = [torch.randn(64, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    reference = model(batches[0])
    stats = collect_site_statistics(model, batches, [site], progress=False)["units"]
    cut_width(model, site, stats, 3)
    assert model[2].in_features == 3
    assert _rel(model(batches[0]), reference) <= 1e-5


def test_a_convolution_consumer_needs_one_more_channel_for_the_mean() -> None:
    """A zero-padded convolution cannot take an intercept: channels in a 3-dimensional subspace
    shifted off the origin are rebuilt exactly from 4 kept channels, not from 3."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.Conv2d(12, 4, 3, padding=1))
    with torch.no_grad():
        mixing, base = torch.randn(12, 3), torch.randn(3, 1, 3, 3)
        model[0].weight.copy_(torch.einsum("cr,rihw->cihw", mixing, base))
        model[0].bias.uniform_(1.0, 2.0)
    model.eval()
    site = find_width_sites(model)[0]
    stats = collect_site_statistics(model, IMAGES, [site], progress=False)[site.name]
    reference = model(IMAGES[0])
    three, four = copy.deepcopy(model), model
    cut_width(three, site, stats, 3)
    cut_width(four, site, stats, 4)
    assert _rel(three(IMAGES[0]), reference) > 1e-3
    assert _rel(four(IMAGES[0]), reference) <= 1e-5


@pytest.mark.parametrize(("consumer", "expected"), [("conv", 4), ("linear", 3)])
def test_the_mean_costs_a_kept_channel_only_where_no_bias_can_take_it(consumer, expected) -> None:
    """64 channels: 3 planted directions + unit noise + a mean of 0.5, independent pixels. The
    MP count on the covariance is 3; a convolution reader keeps one more for the mean."""
    rng = np.random.default_rng(4)
    basis = np.linalg.qr(rng.standard_normal((64, 3)))[0]
    images = []
    for _ in range(4):
        x = rng.standard_normal((16, 16, 16, 64)) + 0.5
        x += 3.0 * rng.standard_normal((16, 16, 16, 3)) @ basis.T
        images.append(torch.from_numpy(x).float().movedim(-1, 1))
    reader = nn.Conv2d(64, 2, 3, padding=1) if consumer == "conv" else nn.Linear(64 * 256, 2)
    head = [reader] if consumer == "conv" else [nn.Flatten(), reader]
    model = nn.Sequential(nn.Identity(), *head).eval()
    site = WidthSite("planted", "channels", 64, producers=("0",), consumer=str(len(head)))
    stats = collect_site_statistics(model, images, [site], progress=False)["planted"]
    assert stats.n_effective == pytest.approx(16384, rel=0.02)  # independent pixels
    assert site_rank(model, site, stats).rank == expected


def test_reconstruction_is_identity_when_everything_is_kept() -> None:
    c = torch.randn(6, 6, dtype=torch.float64)
    c = c @ c.T
    assert torch.equal(reconstruction_matrix(c, range(6)), torch.eye(6, dtype=torch.float64))
    r = reconstruction_matrix(c, [1, 4])
    assert torch.allclose(r[[1, 4]], torch.eye(2, dtype=torch.float64))


def test_bad_widths_are_refused() -> None:
    model = tiny_cnn()
    site = find_width_sites(model)[0]
    stats = collect_site_statistics(model, IMAGES, [site], progress=False)
    with pytest.raises(PlanError):
        cut_width(model, site, stats[site.name], 0)
    with pytest.raises(PlanError):
        cut_width(model, site, stats[site.name], 2, kept=[0, 0])


TOKENS = [
    torch.randint(0, 264, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)
]


@pytest.mark.parametrize(
    ("build", "per_unit", "new_bias"),
    # Llama's down projection has no bias: the cut gives it one (the reconstruction's intercept).
    [(tiny_llama, 3 * 64, 64), (lambda: tiny_bert(num_labels=3), 2 * 32 + 1, 0)],
)
def test_mlp_width_exact_when_kept_and_smaller_when_cut(
    build, per_unit: int, new_bias: int
) -> None:
    model = build()
    reference = model(TOKENS[0]).logits
    sites = find_width_sites(model, ["mlp"])
    assert len(sites) == 2 and all(s.kind == "mlp" for s in sites)
    stats = collect_site_statistics(model, TOKENS, sites, progress=False)
    full = copy.deepcopy(model)
    for site in sites:
        cut_width(full, site, stats[site.name], site.width)
    assert _rel(full(TOKENS[0]).logits, reference) <= 1e-5
    site = sites[0]
    cut = cut_width(model, site, stats[site.name], site.width - 10)
    assert cut.parameters_before - cut.parameters_after == 10 * per_unit - new_bias
    assert isinstance(model.get_submodule(site.consumer), ResizedLinear)
    assert model(TOKENS[0]).logits.shape == reference.shape


def test_residual_rotation_alone_leaves_outputs_unchanged() -> None:
    model = tiny_llama()
    reference = model(TOKENS[0]).logits
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    rotate_residual_stream(model, q)
    assert _rel(model(TOKENS[0]).logits, reference) <= 1e-5
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_residual_slicing_shrinks_the_stream_and_reloads(tmp_path) -> None:
    model = tiny_llama(tie_word_embeddings=False)
    reference = model(TOKENS[0]).logits
    sites = find_width_sites(model, ["residual"])
    stats = collect_site_statistics(model, TOKENS, sites, progress=False)
    full = copy.deepcopy(model)
    cut_width(full, sites[0], stats["residual_stream"], 64)
    assert _rel(full(TOKENS[0]).logits, reference) <= 1e-5
    before = count_parameters(model)["params_total"]
    cut = cut_width(model, sites[0], stats["residual_stream"], 48)
    assert model.config.hidden_size == 48
    # Every matrix touching the stream loses 16 columns or rows; norms lose 16 entries each.
    per_block = 16 * (64 + 32 + 32) + 16 * 64 + 16 * (128 + 128) + 16 * 128 + 2 * 16
    assert before - cut.parameters_after == 2 * per_block + 2 * 264 * 16 + 16
    out = model(TOKENS[0]).logits
    save_compressed(model, tmp_path / "sliced")
    loaded, _ = load(tmp_path / "sliced")
    assert torch.allclose(loaded(TOKENS[0]).logits, out, atol=1e-6, rtol=0)


def test_residual_slicing_refuses_unsupported_families() -> None:
    with pytest.raises(TargetSelectionError):
        find_width_sites(tiny_bert(), ["residual"])


def test_a_width_reduced_cnn_saves_and_loads_back_identically(tmp_path) -> None:
    model = _bn_cnn()
    sites = find_width_sites(model)
    stats = collect_site_statistics(model, IMAGES, sites, progress=False)
    cut_width(model, sites[0], stats[sites[0].name], 5)
    cut_width(model, sites[1], stats[sites[1].name], 7)
    expected = model(IMAGES[1])
    save_compressed(model, tmp_path / "cnn")
    loaded = load_into(BNCNN(), tmp_path / "cnn").eval()
    assert torch.equal(loaded(IMAGES[1]), expected)
    assert count_parameters(loaded)["params_total"] == count_parameters(model)["params_total"]


def test_a_width_reduced_transformer_saves_and_loads_back_identically(tmp_path) -> None:
    model = tiny_llama()
    sites = find_width_sites(model)
    stats = collect_site_statistics(model, TOKENS, sites, progress=False)
    cut_width(model, sites[1], stats[sites[1].name], 40)
    expected = model(TOKENS[1]).logits
    save_compressed(model, tmp_path / "llama")
    loaded, _ = load(tmp_path / "llama")
    assert torch.equal(loaded(TOKENS[1]).logits, expected)


# ---------------------------------------------------------------------------------------------
# Attention widths (tiny BERT: hidden 32, 4 heads of 8)

MASKED = {
    "input_ids": TOKENS[0],
    "attention_mask": torch.tensor([[1] * 12, [1] * 9 + [0] * 3]),
}


def test_attention_sites_come_in_forward_order() -> None:
    sites = find_width_sites(tiny_bert(num_labels=3))
    assert [s.kind for s in sites] == ["attn_vo", "attn_qk", "mlp"] * 2
    assert [s.width for s in sites[:2]] == [32, 32]
    assert sites[0].consumer.endswith("layer.0.attention.output.dense")


def test_attention_cuts_keeping_every_direction_reproduce_the_outputs() -> None:
    model = tiny_bert(num_labels=3)
    reference = model(**MASKED).logits
    sites = [s for s in find_width_sites(model) if s.kind != "mlp"]
    stats = collect_site_statistics(model, TOKENS, sites, progress=False)
    for site in sites:
        cut = cut_width(model, site, stats[site.name], site.width)
        assert cut.width_after == site.width
    assert isinstance(
        model.get_submodule("bert.encoder.layer.1.attention.self"), ReducedSelfAttention
    )
    # Rotated heads, masked padding: the same function.
    assert _rel(model(**MASKED).logits, reference) <= 1e-5


def test_query_key_maps_keep_the_products_at_full_rank_and_on_a_subspace() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(500, 8, generator=g, dtype=torch.float64)
    k = torch.randn(500, 8, generator=g, dtype=torch.float64) @ torch.randn(
        8, 8, generator=g, dtype=torch.float64
    )
    a, b = query_key_maps(q.T @ q / 500, k.T @ k / 500, 8)
    assert torch.allclose(a @ b.T, torch.eye(8, dtype=torch.float64), atol=1e-9)
    # Queries in a 3-dimensional subspace: 3 directions give every product exactly.
    q3 = torch.randn(500, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 8, generator=g, dtype=torch.float64
    )
    a, b = query_key_maps(q3.T @ q3 / 500, k.T @ k / 500, 3)
    assert torch.allclose((q3 @ a) @ (k @ b).T, q3 @ k.T, atol=1e-8 * float((q3 @ k.T).abs().max()))


def _plant_value_subspace(model: nn.Module, rank: int, *, affine: bool = False) -> None:
    """Make every head's values span only ``rank`` directions (a rank-``rank`` V per head);
    ``affine``: leave the bias alone, so the values lie in ``bias + span`` (a subspace that
    does not contain the origin)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            value = layer.attention.self.value
            heads = value.weight.view(4, 8, 32)
            for h in range(4):
                basis = torch.linalg.qr(torch.randn(8, rank, generator=g))[0]
                heads[h] = basis @ basis.T @ heads[h]
                if not affine:
                    value.bias.view(4, 8)[h] = basis @ basis.T @ value.bias.view(4, 8)[h]
                else:
                    value.bias.view(4, 8)[h] += 0.5


@pytest.mark.parametrize("affine", [False, True])
def test_a_planted_value_subspace_is_found_and_cut_exactly(affine: bool) -> None:
    model = tiny_bert(num_labels=3)
    _plant_value_subspace(model, 3, affine=affine)
    reference = model(**MASKED).logits
    before = count_parameters(model)["params_total"]
    for site in [s for s in find_width_sites(model) if s.kind == "attn_vo"]:
        stats = collect_site_statistics(model, TOKENS, [site], progress=False)[site.name]
        decision = site_rank(model, site, stats)
        assert decision.per_head == [3, 3, 3, 3]
        assert decision.rank == 12
        cut_width(model, site, stats, decision.rank)
    assert _rel(model(**MASKED).logits, reference) <= 1e-5
    # Per block: value loses 4 heads × 5 rows (32 weights + 1 bias), output 20 columns of 32.
    assert before - count_parameters(model)["params_total"] == 2 * (20 * 33 + 20 * 32)


def test_query_key_cut_removes_the_hand_counted_parameters_and_reloads(tmp_path) -> None:
    model = tiny_bert(num_labels=3)
    site = [s for s in find_width_sites(model) if s.kind == "attn_qk"][1]
    stats = collect_site_statistics(model, TOKENS, [site], progress=False)[site.name]
    cut = cut_width(model, site, stats, 8)  # 2 per head
    # query and key: 4 heads × 6 rows of (32 weights + 1 bias) each.
    assert cut.parameters_before - cut.parameters_after == 2 * 24 * 33
    assert model.bert.encoder.layer[1].attention.self.qk_head_size == 2
    expected = model(**MASKED).logits
    save_compressed(model, tmp_path / "bert")
    loaded, _ = load(tmp_path / "bert")
    assert torch.allclose(loaded(**MASKED).logits, expected, atol=1e-6, rtol=0)


def test_activation_analysis_reports_the_planted_widths_and_writes_a_report(tmp_path) -> None:
    from laserrmt.activations import analyze_activations, write_activation_report

    model = tiny_bert(num_labels=3)
    _plant_value_subspace(model, 3)
    records = analyze_activations(model, TOKENS, progress=False)
    assert [r["kind"] for r in records] == ["attn_vo", "attn_qk", "mlp"] * 2
    vo = [r for r in records if r["kind"] == "attn_vo"]
    assert all(r["per_head"] == [3, 3, 3, 3] and r["k"] == 12 and r["d"] == 32 for r in vo)
    assert all(0 < r["k_over_d"] <= 1 and r["edge"] > 0 for r in records)
    out = write_activation_report(records, tmp_path / "act", model_source="tiny bert")
    assert (out / "report.html").stat().st_size > 1000
    saved = json.loads((out / "activations.json").read_text())
    assert [s["k"] for s in saved["sites"]] == [r["k"] for r in records]
    assert (out / "kept_fraction.png").is_file()


# ---------------------------------------------------------------------------------------------
# The activation-rank rule: centred covariance, effective sample size of correlated tokens


def _identity_site(d: int) -> tuple[nn.Module, WidthSite]:
    """A model whose single "MLP" site sees its input unchanged: planted activations go in."""
    model = nn.Sequential(nn.Identity(), nn.Linear(d, 2)).eval()
    return model, WidthSite("planted", "mlp", d, producers=("0",), consumer="1")


def _ar1_tokens(rng: np.random.Generator, batches: int, tokens: int, d: int, rho: float):
    """Unit-variance AR(1) noise along the tokens, independent across units and sequences."""
    from scipy.signal import lfilter

    shocks = rng.standard_normal((batches, 4, tokens, d)) * np.sqrt(1 - rho**2)
    shocks[:, :, 0] /= np.sqrt(1 - rho**2)  # a stationary start
    x = lfilter([1.0], [1.0, -rho], shocks, axis=2)
    return [torch.from_numpy(b).float() for b in x]


D, TOKENS_PER_SEQUENCE = 256, 512  # 8 batches × 4 sequences × 512 tokens = 16384 rows


def test_a_mean_is_not_a_signal_direction() -> None:
    """Pure unit noise plus a mean of 0.5 per unit: the uncentred second moment has a spike at
    1 + 0.25·256 = 65 (far above the MP edge ≈ 1.27); the covariance has none."""
    model, site = _identity_site(D)
    rng = np.random.default_rng(0)
    batches = [
        torch.from_numpy(rng.standard_normal((4, TOKENS_PER_SEQUENCE, D)) + 0.5).float()
        for _ in range(8)
    ]
    stats = collect_site_statistics(model, batches, [site], progress=False)["planted"]
    assert torch.allclose(stats.mean, torch.full((D,), 0.5, dtype=torch.float64), atol=0.03)
    assert site_rank(model, site, stats).rank == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlated_tokens_of_pure_noise_keep_no_direction(seed: int) -> None:
    """AR(1) tokens (ρ = 0.6), independent units: treated as 16384 independent rows, mp_fit
    keeps dozens of the 256 noise directions; with the effective sample size none (asserted
    for each of three seeds; 0 in 5 of 5 seeds when the bound was chosen)."""
    model, site = _identity_site(D)
    batches = _ar1_tokens(np.random.default_rng(seed), 8, TOKENS_PER_SEQUENCE, D, 0.6)
    stats = collect_site_statistics(model, batches, [site], progress=False)["planted"]
    # Bartlett's small-d/n limit is n / 2.125; the MP edge of d/n = 1/64 asks a little more.
    assert 16384 / 2.4 < stats.n_effective < 16384 / 2.125
    assert site_rank(model, site, stats).rank == 0


def test_planted_signal_directions_are_recovered_above_noise_with_a_mean() -> None:
    model, site = _identity_site(D)
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.standard_normal((D, 5)))[0]
    batches = [
        torch.from_numpy(
            rng.standard_normal((4, TOKENS_PER_SEQUENCE, D))
            + 2.0 * rng.standard_normal((4, TOKENS_PER_SEQUENCE, 5)) @ basis.T
            + 0.5
        ).float()
        for _ in range(8)
    ]
    stats = collect_site_statistics(model, batches, [site], progress=False)["planted"]
    assert stats.n_effective == pytest.approx(16384, rel=0.01)  # independent tokens
    assert site_rank(model, site, stats).rank == 5


def test_effective_sample_size_reduces_to_bartlett_and_to_n() -> None:
    from laserrmt.rmt.activations import effective_sample_size, truncated_autocorrelation

    rho = 0.6 ** np.arange(1, 40)
    # d/n → 0: the MP edge's excess 2·sqrt(d·Σρ²/n) is Bartlett's variance factor (1+ρ²)/(1−ρ²).
    n = 10**9
    assert effective_sample_size(n, 16, [rho]) == pytest.approx(n / 2.125, rel=0.01)
    assert effective_sample_size(5000, 64, []) == 5000
    # Lags within two standard errors of zero are noise: the sequence stops at the first one.
    kept = truncated_autocorrelation([0.5, 0.2, 0.001, 0.3], [10**4] * 4)
    assert kept.tolist() == [0.5, 0.2]
