"""Oracle tests for width cuts: planted unit structure, closed-form errors and counts.

Every expected value here is built into the data (which units are independent, which are copies
of which, which are dead) or computed from first principles (least squares on the samples, the
Schur complement of the second moment), never read back from the code under test.

The planted structure: of ``d`` hidden units, a random set ``S`` of ``k`` (not the first ``k``)
are independent; every other unit is a copy of one unit of ``S`` scaled by ``|a| < 1``, or dead
(always 0). Then

- the units that best span the activations are exactly ``S``: a copy never carries more signal
  than its original, so any subset rule that prefers the unexplained signal picks ``S``;
- the dropped units are exactly ``M h_S`` (``M`` known), so keeping ``S`` and folding ``M`` into
  the consumer reproduces the uncut model, while keeping ``S`` without folding does not;
- the copies are chosen so that some copy is larger than some unit of ``S``, so the ``k`` units
  of largest energy are *not* ``S`` either.

The copies are planted through the producer weights so that they survive the nonlinearity: a
duplicated row gives an identical unit after any unit-wise activation; ReLU, max pooling and
BatchNorm's affine part commute with positive scaling; a gated MLP ``act(g) ⊙ u`` scales with
its up row by any factor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from laserrmt.surgery.width import (
    SiteStatistics,
    WidthCut,
    WidthSite,
    activation_rank,
    attention_head_ranks,
    collect_site_statistics,
    cut_width,
    find_width_sites,
    query_key_maps,
    reconstruction_matrix,
    select_units,
    site_rank,
)
from tiny_models import tiny_llama

# ---------------------------------------------------------------------------------------------
# The planted structure


@dataclass(frozen=True)
class Planted:
    """``h = M h_S``: ``kept`` are the independent units, ``parent[j]``/``scale[j]`` say that
    unit ``j`` is ``scale[j] · h[parent[j]]`` (``parent[j] = -1``: dead, always 0)."""

    d: int
    kept: list[int]
    parent: np.ndarray
    scale: np.ndarray

    @property
    def k(self) -> int:
        return len(self.kept)

    def mixing(self) -> np.ndarray:
        """``M`` (d × k): column ``i`` belongs to ``kept[i]``."""
        m = np.zeros((self.d, self.k))
        column = {u: i for i, u in enumerate(self.kept)}
        for j in range(self.d):
            if self.parent[j] >= 0:
                m[j, column[int(self.parent[j])]] = self.scale[j]
        return m


def plant(d: int, k: int, seed: int, *, dead: int = 2, positive: bool = True) -> Planted:
    """``k`` random independent units; of the rest ``dead`` are dead and the others copies of a
    random kept unit scaled by ``±U(0.3, 0.8)`` (``+`` only when ``positive``)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(d)
    kept = sorted(int(u) for u in order[:k])
    parent = np.full(d, -1)
    scale = np.zeros(d)
    parent[kept] = kept
    scale[kept] = 1.0
    for j in order[k + dead :]:
        parent[j] = kept[int(rng.integers(k))]
        sign = 1.0 if positive else rng.choice([-1.0, 1.0])
        scale[j] = sign * rng.uniform(0.3, 0.8)
    planted = Planted(d, kept, parent, scale)
    assert planted.kept != list(range(k)), "the planted units must not be the first k"
    return planted


def unit_magnitudes(k: int, seed: int) -> np.ndarray:
    """Scales of the independent units, spread over an order of magnitude, so that a copy of a
    large unit (scaled by ≥ 0.3) outweighs the smallest kept units."""
    return np.random.default_rng(seed + 1000).uniform(0.1, 1.5, size=k)


def assert_energy_does_not_give_kept(c: torch.Tensor, kept: list[int]) -> None:
    """The planted set is not simply the ``k`` units of largest ``E[h_j²]``."""
    top = sorted(torch.argsort(torch.diagonal(c), descending=True)[: len(kept)].tolist())
    assert top != kept, "planting error: the largest units already are the kept ones"


def second_moment(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.to(torch.float64)
    return rows.T @ rows / rows.shape[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def schur_error(rows: torch.Tensor, w: torch.Tensor, kept: list[int], *, centred: bool) -> float:
    """``E‖W (h − ĥ)‖²`` over the sample ``rows`` of ``h`` at the least-squares ``ĥ`` from
    ``h_S``: ``tr(W (C − C_{:S} C_SS⁻¹ C_{S:}) Wᵀ)``, with ``C`` the second moment (regression
    through the origin) or, ``centred``, the covariance (regression with an intercept)."""
    rows = rows.to(torch.float64)
    if centred:
        rows = rows - rows.mean(0)
    c = second_moment(rows)
    w = w.to(torch.float64)
    residual = c - c[:, kept] @ torch.linalg.solve(c[kept][:, kept], c[kept, :])
    return float(torch.trace(w @ residual @ w.T))


def with_intercept(statistics: SiteStatistics) -> bool:
    """Whether a cut read by an ``nn.Linear`` regresses with an intercept (folded into its
    bias): it can when the statistics carry the units' mean. Both are least squares; they
    differ in what the dropped units are regressed on."""
    return getattr(statistics, "mean", None) is not None


# ---------------------------------------------------------------------------------------------
# select_units and reconstruction_matrix on planted activations


def planted_activations(planted: Planted, n: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    """``n`` samples (rows) of ``h = M h_S`` with independent, differently scaled ``h_S``."""
    rng = np.random.default_rng(seed)
    h_s = rng.standard_normal((n, planted.k)) * unit_magnitudes(planted.k, seed)
    h = h_s @ planted.mixing().T + noise * rng.standard_normal((n, planted.d))
    return torch.from_numpy(h)


@pytest.mark.parametrize("seed", range(6))
def test_select_units_recovers_the_planted_units(seed: int) -> None:
    planted = plant(24, 7, seed, positive=False)
    c = second_moment(planted_activations(planted, 400, seed))
    assert_energy_does_not_give_kept(c, planted.kept)
    assert select_units(c, planted.k) == planted.kept  # sorted, as documented


@pytest.mark.parametrize("seed", range(3))
def test_select_units_recovers_the_planted_units_under_small_noise(seed: int) -> None:
    """Full-rank activations (a little noise on every unit): the planted units still stand out."""
    planted = plant(24, 7, seed)
    c = second_moment(planted_activations(planted, 2000, seed, noise=1e-3))
    assert select_units(c, planted.k) == planted.kept


@pytest.mark.parametrize("seed", range(3))
def test_reconstruction_matrix_is_the_planted_mixing(seed: int) -> None:
    planted = plant(24, 7, seed, positive=False)
    c = second_moment(planted_activations(planted, 400, seed))
    r = reconstruction_matrix(c, planted.kept)
    assert r.shape == (24, 7)
    assert torch.allclose(r, torch.from_numpy(planted.mixing()), atol=1e-9)
    # Given in another order, the columns follow that order.
    shuffled = list(reversed(planted.kept))
    r = reconstruction_matrix(c, shuffled)
    assert torch.allclose(r, torch.from_numpy(planted.mixing()[:, ::-1].copy()), atol=1e-9)


def test_reconstruction_matrix_of_general_combinations() -> None:
    """Dropped units that mix several kept units (not copies): ``R`` is still the mixing."""
    rng = np.random.default_rng(5)
    d, kept = 10, [1, 4, 6, 9]
    m = rng.standard_normal((d, len(kept)))
    m[kept] = np.eye(len(kept))
    h = torch.from_numpy(rng.standard_normal((300, len(kept))) @ m.T)
    r = reconstruction_matrix(second_moment(h), kept)
    assert torch.allclose(r, torch.from_numpy(m), atol=1e-9)


def test_reconstruction_matrix_is_the_least_squares_regression_on_full_rank_data() -> None:
    """No exact structure: ``R`` regresses every unit on the kept ones (``lstsq`` on the samples,
    no intercept)."""
    rng = np.random.default_rng(6)
    h = rng.standard_normal((500, 9)) @ rng.standard_normal((9, 9)) + 0.7  # a mean, too
    kept = [7, 2, 5]
    expected = np.linalg.lstsq(h[:, kept], h, rcond=None)[0].T
    r = reconstruction_matrix(second_moment(torch.from_numpy(h)), kept)
    assert torch.allclose(r, torch.from_numpy(expected), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# A plain MLP: fc1 → ReLU/GELU → fc2, found as an MLP site of a block


class _MLP(nn.Module):
    def __init__(self, n: int, d: int, m: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n, d)
        self.act = act
        self.fc2 = nn.Linear(d, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, n: int, d: int, act: nn.Module) -> None:
        super().__init__()
        self.mlp = _MLP(n, d, n, act)


class OneBlockNet(nn.Module):
    """``x → x + fc2(act(fc1(x))) → head``: one block, named so the MLP is found as a site."""

    def __init__(self, n: int, d: int, m: int, act: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(n, d, act)])
        self.out = nn.Linear(n, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + self.layers[0].mlp(x))


def planted_mlp(planted: Planted, act: nn.Module, n: int = 10, m: int = 3) -> OneBlockNet:
    """fc1's rows of the copies are copies of their parents' rows, scaled by ``scale`` (ReLU is
    positively homogeneous; GELU needs ``scale = 1``); dead units have zero weights and a
    negative bias (ReLU) or zero weights and bias (GELU(0) = 0)."""
    torch.manual_seed(0)
    net = OneBlockNet(n, planted.d, m, act).eval()
    fc1 = net.layers[0].mlp.fc1
    magnitudes = unit_magnitudes(planted.k, 0)
    with torch.no_grad():
        for i, u in enumerate(planted.kept):
            fc1.weight[u] *= float(magnitudes[i])
            fc1.bias[u] *= float(magnitudes[i])
        for j in range(planted.d):
            p = int(planted.parent[j])
            if p < 0:
                fc1.weight[j] = 0.0
                fc1.bias[j] = -1.0 if isinstance(act, nn.ReLU) else 0.0
            elif p != j:
                fc1.weight[j] = planted.scale[j] * fc1.weight[p]
                fc1.bias[j] = planted.scale[j] * fc1.bias[p]
    return net


def inputs(n: int, seed: int, count: int = 4, rows: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, n, generator=g) for _ in range(count)]


def mlp_site(net: OneBlockNet) -> WidthSite:
    (site,) = find_width_sites(net, ["mlp"])
    assert (site.producers, site.consumer) == (("layers.0.mlp.fc1",), "layers.0.mlp.fc2")
    return site


@pytest.mark.parametrize("seed", range(3))
def test_relu_mlp_cut_to_the_planted_width_is_exact(seed: int) -> None:
    planted = plant(32, 6, seed, dead=3)
    net = planted_mlp(planted, nn.ReLU())
    site = mlp_site(net)
    calibration, fresh = inputs(10, seed), inputs(10, seed + 100, count=1)[0]
    stats = collect_site_statistics(net, calibration, [site], progress=False)[site.name]
    assert_energy_does_not_give_kept(stats.second_moment, planted.kept)
    reference = net(fresh)
    before = sum(p.numel() for p in net.parameters())
    cut = cut_width(net, site, stats, planted.k)
    assert cut.kept == planted.kept and cut.width_after == planted.k
    mlp = net.layers[0].mlp
    assert (mlp.fc1.out_features, mlp.fc2.in_features) == (planted.k, planted.k)
    # fc1 loses (d − k) rows of 10 weights + 1 bias, fc2 (d − k) columns of 10.
    removed = (planted.d - planted.k) * (10 + 1 + 10)
    assert (cut.parameters_before, cut.parameters_after) == (before, before - removed)
    assert sum(p.numel() for p in net.parameters()) == before - removed
    assert rel(net(fresh), reference) < 1e-5


@pytest.mark.parametrize("extra", [3, 25])
def test_relu_mlp_cut_above_the_planted_width_keeps_the_planted_units_and_is_exact(
    extra: int,
) -> None:
    """More units than independent ones: the kept set then holds copies of kept units (their
    block of ``C`` is singular up to float32 rounding), and the cut must still be exact."""
    planted = plant(32, 6, 1, dead=3)
    net = planted_mlp(planted, nn.ReLU())
    site = mlp_site(net)
    stats = collect_site_statistics(net, inputs(10, 1), [site], progress=False)[site.name]
    fresh = inputs(10, 101, count=1)[0]
    reference = net(fresh)
    cut = cut_width(net, site, stats, planted.k + extra)
    assert set(planted.kept) <= set(cut.kept) and len(cut.kept) == planted.k + extra
    assert rel(net(fresh), reference) < 1e-5


def test_gelu_mlp_with_duplicated_units_is_cut_exactly() -> None:
    """GELU is not homogeneous: the copies are exact duplicates, and any one of each group of
    duplicates may be kept."""
    scaled = plant(24, 5, 3, dead=2)
    planted = Planted(scaled.d, scaled.kept, scaled.parent, (scaled.parent >= 0).astype(float))
    net = planted_mlp(planted, nn.GELU())
    site = mlp_site(net)
    calibration, fresh = inputs(10, 7), inputs(10, 8, count=1)[0]
    stats = collect_site_statistics(net, calibration, [site], progress=False)[site.name]
    reference = net(fresh)
    cut = cut_width(net, site, stats, planted.k)
    assert sorted({int(planted.parent[u]) for u in cut.kept}) == planted.kept
    assert rel(net(fresh), reference) < 1e-5


def test_keeping_the_planted_units_without_folding_is_not_exact() -> None:
    """The test above needs the fold: the consumer's kept columns alone lose the copies."""
    planted = plant(32, 6, 0, dead=3)
    net = planted_mlp(planted, nn.ReLU())
    fresh = inputs(10, 100, count=1)[0]
    mlp = net.layers[0].mlp
    hidden = mlp.act(mlp.fc1(fresh))
    full = mlp.fc2(hidden)
    sliced = hidden[:, planted.kept] @ mlp.fc2.weight[:, planted.kept].T + mlp.fc2.bias
    assert rel(sliced, full) > 0.05


@pytest.mark.parametrize(("k", "seed"), [(3, 0), (4, 1), (1, 2)])
def test_relu_mlp_cut_below_the_planted_width_has_the_least_squares_error(
    k: int, seed: int
) -> None:
    """Keeping fewer units than are independent: the consumer's output error on the calibration
    inputs is the least-squares error of the dropped units (:func:`schur_error`), computed from
    activations collected here, for the units the cut chose and for units given by hand."""
    planted = plant(20, 6, seed, dead=2)
    net = planted_mlp(planted, nn.ReLU())
    site = mlp_site(net)
    calibration = inputs(10, seed)
    mlp = net.layers[0].mlp
    with torch.no_grad():
        hidden = torch.cat([mlp.act(mlp.fc1(x)) for x in calibration]).to(torch.float64)
        reference = [mlp.fc2(mlp.act(mlp.fc1(x))) for x in calibration]
    c = second_moment(hidden)
    w = mlp.fc2.weight.detach().clone()
    stats = collect_site_statistics(net, calibration, [site], progress=False)[site.name]
    assert stats.n_samples == hidden.shape[0]
    assert torch.allclose(stats.second_moment, c, rtol=1e-5, atol=1e-7)
    by_hand = sorted(np.random.default_rng(seed).choice(planted.kept, k, replace=False).tolist())
    for kept in (None, by_hand):
        cut_net = copy.deepcopy(net)
        cut = cut_width(cut_net, site, stats, k, kept=kept)
        mlp_cut = cut_net.layers[0].mlp
        with torch.no_grad():
            outputs = [mlp_cut(x) for x in calibration]
        error = torch.cat([(o - r).double() for o, r in zip(outputs, reference, strict=True)])
        measured = float((error**2).sum(1).mean())
        expected = schur_error(hidden, w, cut.kept, centred=with_intercept(stats))
        assert expected > 1e-4  # something really is lost
        assert measured == pytest.approx(expected, rel=1e-3)
        if kept is not None:
            assert cut.kept == by_hand


# ---------------------------------------------------------------------------------------------
# A Llama-style gated MLP: down(silu(gate x) ⊙ up x)

LLAMA_TOKENS = [
    torch.randint(0, 264, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)
]
FRESH_TOKENS = torch.randint(0, 264, (2, 16), generator=torch.Generator().manual_seed(99))


def planted_llama(planted: Planted) -> nn.Module:
    """Block 0's MLP: the copies duplicate their parent's gate row and scale its up row (any
    sign: ``silu(g) ⊙ (a u) = a (silu(g) ⊙ u)``); dead units have a zero up row."""
    model = tiny_llama()
    mlp = model.model.layers[0].mlp
    magnitudes = unit_magnitudes(planted.k, 1)
    with torch.no_grad():
        for i, u in enumerate(planted.kept):
            mlp.up_proj.weight[u] *= float(magnitudes[i])
        for j in range(planted.d):
            p = int(planted.parent[j])
            if p < 0:
                mlp.up_proj.weight[j] = 0.0
            elif p != j:
                mlp.gate_proj.weight[j] = mlp.gate_proj.weight[p]
                mlp.up_proj.weight[j] = planted.scale[j] * mlp.up_proj.weight[p]
    return model


def test_gated_mlp_cut_to_the_planted_width_is_exact() -> None:
    planted = plant(128, 16, 11, dead=10, positive=False)
    model = planted_llama(planted)
    site = find_width_sites(model, ["mlp"])[0]
    assert site.consumer == "model.layers.0.mlp.down_proj"
    stats = collect_site_statistics(model, LLAMA_TOKENS, [site], progress=False)[site.name]
    assert_energy_does_not_give_kept(stats.second_moment, planted.kept)
    reference = model(FRESH_TOKENS).logits
    before = sum(p.numel() for p in model.parameters())
    cut = cut_width(model, site, stats, planted.k)
    assert cut.kept == planted.kept
    # gate and up lose (d − k) rows of 64, down (d − k) columns of 64; down gains a bias of 64
    # when the cut regresses with an intercept (the Llama MLP has none).
    gained = 64 if with_intercept(stats) else 0
    assert model.model.layers[0].mlp.down_proj.in_features == planted.k
    assert before - sum(p.numel() for p in model.parameters()) == (128 - 16) * 3 * 64 - gained
    assert rel(model(FRESH_TOKENS).logits, reference) < 1e-5


def test_gated_mlp_cut_below_the_planted_width_has_the_least_squares_error() -> None:
    planted = plant(128, 16, 12, dead=10, positive=False)
    model = planted_llama(planted)
    site = find_width_sites(model, ["mlp"])[0]
    down = model.get_submodule(site.consumer)
    inputs_seen: list[torch.Tensor] = []
    outputs: dict[str, list[torch.Tensor]] = {"before": [], "after": []}

    def record(key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor], out: torch.Tensor) -> None:
            if key == "before":
                inputs_seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
            outputs[key].append(out.detach().reshape(-1, out.shape[-1]).double())

        return hook

    handle = down.register_forward_hook(record("before"))
    with torch.no_grad():
        for batch in LLAMA_TOKENS:
            model(batch)
    handle.remove()
    hidden = torch.cat(inputs_seen)
    w = down.weight.detach().clone()
    stats = collect_site_statistics(model, LLAMA_TOKENS, [site], progress=False)[site.name]
    cut = cut_width(model, site, stats, 9)
    handle = model.get_submodule(site.consumer).register_forward_hook(record("after"))
    with torch.no_grad():
        for batch in LLAMA_TOKENS:
            model(batch)
    handle.remove()
    error = torch.cat(outputs["after"]) - torch.cat(outputs["before"])
    measured = float((error**2).sum(1).mean())
    expected = schur_error(hidden, w, cut.kept, centred=with_intercept(stats))
    assert expected > 1e-3 * float(torch.cat(outputs["before"]).pow(2).sum(1).mean())
    assert measured == pytest.approx(expected, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Convolution chains: conv → BN → ReLU (→ max pool) → conv, and → flatten → Linear


class ConvChain(nn.Module):
    def __init__(self, d: int, *, pool: bool, head: str, kernel: int = 3, out: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(2, d, 3, padding=1), nn.BatchNorm2d(d), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = 4 if pool else 8
        self.reader: nn.Module = (
            nn.Conv2d(d, out, kernel, padding=kernel // 2)
            if head == "conv"
            else nn.Sequential(nn.Flatten(), nn.Linear(d * side * side, 5))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reader(self.features(x))


def planted_chain(
    planted: Planted, seed: int, *, pool: bool, head: str, kernel: int = 3, out: int = 5
) -> ConvChain:
    """Copies duplicate their parent's filter and running statistics and scale its BN affine
    part (ReLU and max pooling commute with a positive scale); dead channels have BN weight 0
    and a negative shift. Zero padding of the reading convolution stays exact (0 = a · 0)."""
    torch.manual_seed(seed)
    net = ConvChain(planted.d, pool=pool, head=head, kernel=kernel, out=out)
    conv, bn = net.features[0], net.features[1]
    magnitudes = unit_magnitudes(planted.k, seed)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.5)
        for i, u in enumerate(planted.kept):
            bn.weight[u] *= float(magnitudes[i])
            bn.bias[u] *= float(magnitudes[i])
        for j in range(planted.d):
            p = int(planted.parent[j])
            if p < 0:
                bn.weight[j], bn.bias[j] = 0.0, -0.5
            elif p != j:
                conv.weight[j], conv.bias[j] = conv.weight[p], conv.bias[p]
                bn.running_mean[j], bn.running_var[j] = bn.running_mean[p], bn.running_var[p]
                bn.weight[j] = planted.scale[j] * bn.weight[p]
                bn.bias[j] = planted.scale[j] * bn.bias[p]
    return net.eval()


def images(seed: int, count: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 2, 8, 8, generator=g) for _ in range(count)]


def cut_planted_chain(net: ConvChain, planted: Planted, k: int) -> WidthCut:
    """Cut the chain's one site on :func:`images` ``(0)``, checking its statistics first:
    spatial positions are samples and channels are units."""
    (site,) = find_width_sites(net)
    assert (site.producers, site.followers) == (("features.0",), ("features.1",))
    with torch.no_grad():
        hidden = torch.cat([net.features(x) for x in images(0)])
    rows = hidden.movedim(1, -1).reshape(-1, planted.d)
    stats = collect_site_statistics(net, images(0), [site], progress=False)[site.name]
    assert stats.n_samples == rows.shape[0]
    assert torch.allclose(stats.second_moment, second_moment(rows), rtol=1e-5, atol=1e-7)
    assert_energy_does_not_give_kept(stats.second_moment, planted.kept)
    return cut_width(net, site, stats, k)


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("seed", range(2))
def test_conv_chain_cut_to_the_planted_width_is_exact(pool: bool, seed: int) -> None:
    planted = plant(16, 5, seed, dead=2)
    net = planted_chain(planted, seed, pool=pool, head="conv")
    fresh = images(50, count=1)[0]
    reference = net(fresh)
    before = sum(p.numel() for p in net.parameters())
    cut = cut_planted_chain(net, planted, planted.k)
    assert cut.kept == planted.kept
    assert net.features[0].out_channels == net.features[1].num_features == net.reader.in_channels
    assert net.reader.in_channels == planted.k
    # Each dropped channel: a 2×3×3 filter + bias, BN weight + bias, 5 reader filters of 3×3.
    removed = (16 - planted.k) * (2 * 9 + 1 + 2 + 5 * 9)
    assert before - sum(p.numel() for p in net.parameters()) == removed
    assert rel(net(fresh), reference) < 1e-5


@pytest.mark.parametrize("seed", range(2))
def test_conv_into_flatten_linear_cut_to_the_planted_width_is_exact(seed: int) -> None:
    planted = plant(12, 4, seed + 7, dead=2)
    net = planted_chain(planted, seed, pool=True, head="linear")
    fresh = images(51, count=1)[0]
    reference = net(fresh)
    before = sum(p.numel() for p in net.parameters())
    cut = cut_planted_chain(net, planted, planted.k)
    assert cut.kept == planted.kept
    assert net.reader[1].in_features == planted.k * 16
    removed = (12 - planted.k) * (2 * 9 + 1 + 2 + 5 * 16)
    assert before - sum(p.numel() for p in net.parameters()) == removed
    assert rel(net(fresh), reference) < 1e-5


def test_conv_chain_cut_below_the_planted_width_has_the_least_squares_error() -> None:
    """A 1×1 reading convolution is ``W`` applied at every position (positions are samples):
    the output error on the calibration images is the Schur-complement trace."""
    planted = plant(16, 6, 4, dead=2)
    net = planted_chain(planted, 4, pool=True, head="conv", kernel=1)
    calibration = images(0)
    with torch.no_grad():
        hidden = torch.cat([net.features(x) for x in calibration])
        reference = torch.cat([net(x) for x in calibration])
    rows = hidden.movedim(1, -1).reshape(-1, 16)
    w = net.reader.weight.detach()[:, :, 0, 0].clone()
    cut = cut_planted_chain(net, planted, 3)
    with torch.no_grad():
        error = (torch.cat([net(x) for x in calibration]) - reference).double()
    measured = float((error**2).sum(1).mean())
    # Zero padding is not the mean: a convolution reader regresses through the origin.
    expected = schur_error(rows, w, cut.kept, centred=False)
    assert expected > 1e-3 * float((reference.double() ** 2).sum(1).mean())
    assert measured == pytest.approx(expected, rel=1e-3)


def test_two_planted_sites_cut_one_after_the_other_are_exact() -> None:
    """As the RMT-KD loop does: cut one site, collect the next one's statistics on the cut model
    (its producer is now the folded consumer of the first cut), cut it too."""
    first, second = plant(12, 4, 20, dead=2), plant(10, 3, 21, dead=1)
    chain = planted_chain(first, 20, pool=True, head="conv", out=second.d)
    net = nn.Sequential(chain, nn.ReLU(), nn.Flatten(), nn.Linear(second.d * 16, 3)).eval()
    reader = chain.reader
    assert isinstance(reader, nn.Conv2d)
    with torch.no_grad():  # the reader's channels: positive copies of its filters, or dead
        for j in range(second.d):
            p = int(second.parent[j])
            if p < 0:
                reader.weight[j], reader.bias[j] = 0.0, -1.0
            elif p != j:
                reader.weight[j] = second.scale[j] * reader.weight[p]
                reader.bias[j] = second.scale[j] * reader.bias[p]
    fresh = images(52, count=1)[0]
    reference = net(fresh)
    before = sum(p.numel() for p in net.parameters())
    kept = []
    for planted in (first, second):
        site = find_width_sites(net)[0 if planted is first else 1]
        stats = collect_site_statistics(net, images(0), [site], progress=False)[site.name]
        kept.append(cut_width(net, site, stats, planted.k).kept)
    assert kept == [first.kept, second.kept]
    # First cut: 8 filters of 2×3×3 + bias, 8 BN pairs, 8 input channels of the reader's 10
    # filters; second: 7 reader filters (now 4×3×3) + bias, 7 × 16 inputs of the 3 outputs.
    removed = 8 * (2 * 9 + 1) + 8 * 2 + 10 * 8 * 9 + 7 * (4 * 9 + 1) + 3 * 7 * 16
    assert before - sum(p.numel() for p in net.parameters()) == removed
    assert rel(net(fresh), reference) < 1e-5


# ---------------------------------------------------------------------------------------------
# The width decision: planted spikes above the Marchenko–Pastur bulk


def spiked(d: int, n: int, strengths: list[float], seed: int, sigma: float = 1.0) -> torch.Tensor:
    """``C`` of ``n`` samples: isotropic noise of entry scale ``sigma`` plus one independent
    Gaussian factor of standard deviation ``strengths[i]`` along each of ``len(strengths)``
    random orthonormal directions."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.standard_normal((d, len(strengths))))[0]
    factors = rng.standard_normal((n, len(strengths))) * np.asarray(strengths)
    x = sigma * rng.standard_normal((n, d)) + factors @ directions.T
    return torch.from_numpy(x.T @ x / n)


# A spike of variance θ² moves an eigenvalue far past the edge σ²(1 + √(d/n))² once
# θ² ≫ σ² √(d/n) (the BBP transition); these are 4–40 times that.
SPIKES = [6.0, 4.0, 3.0, 2.5]


@pytest.mark.parametrize(("d", "n"), [(60, 3000), (200, 800), (300, 150)])
@pytest.mark.parametrize("seed", range(3))
def test_activation_rank_finds_planted_spikes(d: int, n: int, seed: int) -> None:
    """Also with fewer samples than units (``C`` has ``d − n`` zero eigenvalues)."""
    c = spiked(d, n, SPIKES, seed, sigma=0.5)
    choice = activation_rank(c, n)
    assert choice.rank == len(SPIKES)
    assert choice.sigma == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_activation_rank_is_scale_free(scale: float) -> None:
    c = spiked(80, 1000, SPIKES[:3], 0)
    choice = activation_rank(scale * c, 1000)
    assert choice.rank == 3
    assert choice.sigma == pytest.approx(np.sqrt(scale), rel=0.05)


def test_activation_rank_on_pure_noise_keeps_almost_nothing() -> None:
    """No spike: the fitted σ is the noise's, and the largest eigenvalue, which fluctuates
    around the edge, is kept at most occasionally (the plain MP edge has no error-rate
    guarantee) and never more than two."""
    ranks = []
    for seed in range(10):
        choice = activation_rank(spiked(64, 2000, [], seed, sigma=2.0), 2000)
        assert choice.sigma == pytest.approx(2.0, rel=0.03)
        ranks.append(int(choice.rank))
    assert max(ranks) <= 2 and sum(r > 0 for r in ranks) <= 4


def test_site_rank_of_a_unit_site_is_the_activation_rank() -> None:
    n = 1500
    c = spiked(48, n, SPIKES[:2], 3, sigma=0.2)
    site = WidthSite(name="layers.0", kind="mlp", width=48, producers=("p",), consumer="c")
    decision = site_rank(nn.Identity(), site, SiteStatistics(site.name, c, n))
    assert (decision.rank, decision.width) == (2, 48)
    assert decision.sigma == pytest.approx(0.2, rel=0.05)
    # The edge separates: the kept eigenvalues' singular values √(nλ) lie above it, the rest below.
    singular = np.sqrt(n * np.clip(np.linalg.eigvalsh(c.numpy())[::-1], 0, None))
    assert singular[1] > decision.edge > singular[2]


@pytest.mark.parametrize("k", range(1, 6))
def test_query_key_maps_reach_the_eckart_young_error(k: int) -> None:
    """Over all query-key pairs of the samples, ``mean (qᵀk − qᵀ A Bᵀ k)²`` is at least the
    squared singular values of ``Q Kᵀ / n`` beyond ``k``, and the maps attain it."""
    rng = np.random.default_rng(k)
    d, n = 6, 300
    q = torch.from_numpy(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)))
    key = torch.from_numpy(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.5)
    a, b = query_key_maps(second_moment(q), second_moment(key), k)
    assert a.shape == b.shape == (d, k)
    products = q @ key.T
    measured = float(((products - (q @ a) @ (key @ b).T) ** 2).mean())
    tail = torch.linalg.svdvals(products)[k:]
    assert measured == pytest.approx(float((tail**2).sum()) / n**2, rel=1e-6)


def test_attention_head_ranks_count_each_head_and_take_the_smaller_of_query_and_key() -> None:
    """Three heads of 40 with planted spike counts; a query-key head can keep no more than the
    smaller of its query and key counts (``rank(Q Kᵀ) ≤ min``)."""
    n, heads = 2000, 3
    query_spikes, key_spikes = [1, 3, 2], [2, 1, 2]

    def moment(counts: list[int], seed: int) -> torch.Tensor:
        return torch.block_diag(
            *[spiked(40, n, SPIKES[:c], seed + h, sigma=0.3) for h, c in enumerate(counts)]
        )

    vo = WidthSite(name="a.vo", kind="attn_vo", width=120, producers=("a",), consumer="o")
    stats = SiteStatistics(vo.name, moment(query_spikes, 0), n)
    ranks = attention_head_ranks(vo, stats, heads, tau=0.5, estimator="mp_fit")
    assert [r[0] for r in ranks] == query_spikes
    assert all(r[1] == pytest.approx(0.3, rel=0.05) for r in ranks)
    qk = WidthSite(name="a.qk", kind="attn_qk", width=120, producers=("a",), consumer="a")
    stats = SiteStatistics(qk.name, moment(query_spikes, 0), n, key_moment=moment(key_spikes, 10))
    ranks = attention_head_ranks(qk, stats, heads, tau=0.5, estimator="mp_fit")
    assert [r[0] for r in ranks] == [1, 1, 2]


# ---------------------------------------------------------------------------------------------
# The residual stream: planted in a k-dimensional subspace


def test_residual_stream_in_a_planted_subspace_is_sliced_exactly() -> None:
    """Embedding rows and every write to the stream (``o_proj``, ``down_proj``) lie in a random
    12-dimensional subspace, so the stream does too: slicing to 12 directions must keep the
    logits, and every matrix touching the stream loses ``64 − 12`` rows or columns."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(64, 12, generator=g))[0]
    projection = basis @ basis.T
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight
        embedding.copy_(embedding @ projection)
        for layer in model.model.layers:
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                writer.weight.copy_(projection @ writer.weight)
    reference = model(FRESH_TOKENS).logits
    before = sum(p.numel() for p in model.parameters())
    (site,) = find_width_sites(model, ["residual"])
    stats = collect_site_statistics(model, LLAMA_TOKENS, [site], progress=False)[site.name]
    cut = cut_width(model, site, stats, 12)
    assert cut.width_after == model.config.hidden_size == 12
    assert rel(model(FRESH_TOKENS).logits, reference) < 1e-5
    gone = 64 - 12
    # q (64 out), k and v (32 out) and gate/up (128 out) lose columns; o_proj and down rows
    # (64 and 128 wide); two norms per block, the final norm; the tied 264 × 64 embedding
    # becomes an embedding and a separate head of 264 × 12 each.
    per_block = gone * (64 + 32 + 32) + gone * 64 + gone * 2 * 128 + gone * 128 + 2 * gone
    removed = 2 * per_block + gone + 264 * 64 - 2 * 264 * 12
    assert before - sum(p.numel() for p in model.parameters()) == removed


def test_a_site_of_noise_free_rank_above_half_is_left_whole_and_says_why() -> None:
    # 12 independent units and 4 copies of 16: the activations have no noise bulk at all, and
    # a median read off signal values would cut real units.
    planted = plant(16, 12, 0, dead=0)
    net = planted_mlp(planted, nn.ReLU())
    site = mlp_site(net)
    calibration = inputs(10, 0)
    stats = collect_site_statistics(net, calibration, [site], progress=False)[site.name]
    decision = site_rank(net, site, stats)
    assert (decision.status, decision.rank) == ("no_bulk", 16)

    from laserrmt.methods.rmt_kd import rmt_kd

    batches = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calibration]
    result = rmt_kd(
        net, batches, batches, lambda m: 0.0, task="classification", steps_per_cut=0,
        tolerance=float("inf"), floor=0.0, progress=False,
    )  # fmt: skip
    (record,) = result.records
    assert (record.status, record.rank_status, record.k) == ("unjudged", "no_bulk", 16)
    assert len(result.plan) == 0
