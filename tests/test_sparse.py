"""Low rank plus sparse, ``W ≈ A B + S``: the chosen entries, the budget, the layer, its saving,
loading and export, and the budget method's ``--sparse-share``.

Oracles are computed here independently: the whitened truncation through a Cholesky factor
(SVD-LLM's own construction), the top entries by sorting every score in Python, the dense
``S`` by writing each CSR entry in a loop, and the stored size from the safetensors file.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import laserrmt
from laserrmt.errors import InvalidOptionError, TargetSelectionError
from laserrmt.evaluate import count_parameters
from laserrmt.methods.heal import factor_parameters
from laserrmt.pipeline import CompressSettings, compress
from laserrmt.surgery.io import weight_bytes
from laserrmt.surgery.lowrank import LowRankLinear
from laserrmt.surgery.sparse import (
    LowRankSparseLinear,
    factorize_sparse,
    input_gram_diagonals,
    lowrank_plus_sparse,
    split_budget,
)
from tests.small_text import small_calibration_split
from tests.tiny_models import tiny_llama, tiny_tokenizer


def _gram(n: int, seed: int = 0) -> torch.Tensor:
    """A full-rank input Gram whose channels differ in scale by up to 30×."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=generator, dtype=torch.float64)
    x *= torch.logspace(0, 1.5, n, dtype=torch.float64)[torch.randperm(n, generator=generator)]
    return x.T @ x


def _whitened_truncation(w: torch.Tensor, gram: torch.Tensor, k: int) -> torch.Tensor:
    """SVD-LLM: truncate ``W L`` (``G = L Lᵀ``, Cholesky) at rank k, then undo ``L``."""
    lower = torch.linalg.cholesky(gram)
    u, s, vh = torch.linalg.svd(w @ lower)
    return torch.linalg.solve_triangular(
        lower, (u[:, :k] * s[:k] @ vh[:k]), upper=False, left=False
    )


def _entries(sparse: torch.Tensor) -> dict[tuple[int, int], float]:
    crow = sparse.crow_indices().tolist()
    col = sparse.col_indices().tolist()
    values = sparse.values().tolist()
    return {
        (i, col[e]): values[e] for i in range(len(crow) - 1) for e in range(crow[i], crow[i + 1])
    }


def _top(score: torch.Tensor, count: int) -> set[tuple[int, int]]:
    cells = [
        (float(score[i, j]), (i, j)) for i in range(score.shape[0]) for j in range(score.shape[1])
    ]
    return {cell for _, cell in sorted(cells, reverse=True)[:count]}


@pytest.mark.parametrize("weighted", [True, False])
def test_sparse_entries_are_the_top_of_the_weighted_residual(weighted):
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(12, 20, generator=generator, dtype=torch.float64)
    gram = _gram(20)
    k, nnz = 3, 17
    parts = lowrank_plus_sparse(w, k, nnz, gram=gram if weighted else None)
    if weighted:
        low_rank = _whitened_truncation(w, gram, k)
    else:
        u, s, vh = torch.linalg.svd(w)
        low_rank = u[:, :k] * s[:k] @ vh[:k]
    torch.testing.assert_close(parts.A @ parts.B, low_rank, atol=1e-9, rtol=0)
    residual = w - low_rank
    channel = gram.diagonal().sqrt() if weighted else torch.ones(20, dtype=torch.float64)
    chosen = _entries(parts.S)
    assert set(chosen) == _top(residual.abs() * channel, nnz)
    for (i, j), value in chosen.items():
        assert value == pytest.approx(float(residual[i, j]), abs=1e-9)
    # The weighting changes the choice, so the test would see it ignored.
    assert _top(residual.abs() * gram.diagonal().sqrt(), nnz) != _top(residual.abs(), nnz)


def test_planted_low_rank_plus_spikes_is_recovered_where_plain_rank_is_not():
    generator = torch.Generator().manual_seed(2)
    m, n, r = 40, 60, 2
    w = torch.zeros(m, n, dtype=torch.float64)
    # A rank-2 block with singular values ≥ 10, and 10 unit spikes outside its rows and columns.
    w[:20, :30] = torch.randn(20, r, generator=generator, dtype=torch.float64) @ torch.randn(
        r, 30, generator=generator, dtype=torch.float64
    )
    w[:20, :30] *= 10 / float(torch.linalg.svdvals(w[:20, :30])[r - 1])
    for s in range(10):
        w[20 + 2 * s, 30 + 3 * s] = 1.0 + 0.05 * s
    planned = 4  # the plain factorization's rank: 400 parameters
    rank, nnz = split_budget((m, n), planned * (m + n), 0.5)
    assert rank == r and nnz >= 10
    parts = lowrank_plus_sparse(w, rank, nnz)
    hybrid_error = float((w - parts.A @ parts.B - parts.S.to_dense()).norm())
    u, s, vh = torch.linalg.svd(w)
    plain_error = float((w - u[:, :planned] * s[:planned] @ vh[:planned]).norm())
    assert hybrid_error < 1e-9
    assert plain_error > 2.0  # 8 spikes of size ≥ 1 are left out


def _stored_bytes(module: nn.Module, tmp_path) -> int:
    """Bytes of every tensor but the bias, as the safetensors file holds them."""
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(tmp_path / "layer.safetensors"))
    read = load_file(str(tmp_path / "layer.safetensors"))
    return sum(t.numel() * t.element_size() for name, t in read.items() if name != "bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("share", [0.1, 0.3, 0.6])
def test_split_budget_counts_what_the_saved_layer_stores(dtype, share, tmp_path):
    m, n, planned = 24, 40, 6
    linear = nn.Linear(n, m).to(dtype)
    layer = factorize_sparse(linear, planned, share)
    assert isinstance(layer, LowRankSparseLinear)
    rank, nnz = split_budget((m, n), planned * (m + n), share, dtype=dtype)
    assert (layer.rank, layer.nnz) == (rank, nnz)
    element = torch.finfo(dtype).bits // 8
    budget = element * planned * (m + n)
    stored = _stored_bytes(layer, tmp_path)
    assert stored == element * rank * (m + n) + (element + 4) * nnz + 4 * (m + 1)
    # Within budget, and the budget is used up to less than one more entry.
    assert budget - (element + 4) < stored <= budget
    assert _stored_bytes(LowRankLinear.from_linear(linear, planned), tmp_path) == budget
    assert weight_bytes(layer) == stored + element * m
    # Every stored number counts, indices included: as many as the bytes in float32.
    numbers = count_parameters(layer)["params_total"] - m
    assert numbers == rank * (m + n) + 2 * nnz + m + 1


def test_split_budget_edges():
    assert split_budget((24, 40), 6 * 64, 0.0) == (6, 0)
    # One rank less frees 64 · 4 bytes: 19 entries after the 25 row pointers.
    assert split_budget((24, 40), 6 * 64, 0.05) == (5, 19)
    # In bfloat16 it frees 128 bytes, less than the 41 row pointers: the rank keeps it all.
    assert split_budget((40, 24), 6 * 64, 0.05, dtype=torch.bfloat16) == (6, 0)
    # Rank 1 cannot give up part of itself.
    assert split_budget((24, 40), 64, 0.5) == (1, 0)
    with pytest.raises(InvalidOptionError, match="rank 1"):
        split_budget((24, 40), 63, 0.5)


@pytest.mark.parametrize("share", [0.9, -0.1, 1.5, float("nan"), True, "0.2"])
def test_a_bad_share_is_one_line(share):
    with pytest.raises(InvalidOptionError) as error:
        CompressSettings(method="budget", target_params=0.2, sparse_share=share).validate()
    assert "--sparse-share" in str(error.value) and "\n" not in str(error.value)


def test_share_needs_the_budget_method_and_no_int8():
    with pytest.raises(InvalidOptionError, match="--method budget"):
        CompressSettings(sparse_share=0.2).validate()
    with pytest.raises(InvalidOptionError, match="--quantize"):
        CompressSettings(
            method="budget", target_params=0.2, sparse_share=0.2, quantize="int8"
        ).validate()


def _layer(bias: bool = True, seed: int = 0) -> LowRankSparseLinear:
    torch.manual_seed(seed)
    return LowRankSparseLinear.from_linear(nn.Linear(20, 12, bias=bias), 3, 30)


def _dense_weight(layer: LowRankSparseLinear) -> torch.Tensor:
    """``A B`` plus every CSR entry written into a zero matrix one at a time."""
    dense = (layer.A @ layer.B).detach().clone()
    crow, col = layer.S_crow_indices.tolist(), layer.S_col_indices.tolist()
    for i in range(layer.out_features):
        for e in range(crow[i], crow[i + 1]):
            dense[i, col[e]] += layer.S_values[e].item()
    return dense


@pytest.mark.parametrize("shape", [(7, 20), (2, 5, 20)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_the_dense_product(shape, bias):
    layer = _layer(bias)
    x = torch.randn(shape)
    expected = nn.functional.linear(x, _dense_weight(layer), layer.bias)
    with torch.no_grad():
        assert (layer(x) - expected).abs().max().item() <= 1e-5
        assert (layer.to_dense() - _dense_weight(layer)).abs().max().item() <= 1e-6


def test_bfloat16_layer_runs_and_matches_its_dense_weight():
    layer = _layer().to(torch.bfloat16)
    x = torch.randn(4, 20, dtype=torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        expected = nn.functional.linear(x.float(), _dense_weight(layer).float(), layer.bias.float())
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


def test_gradients_reach_the_factors_and_the_sparse_values():
    layer = _layer()
    x = torch.randn(2, 5, 20)
    layer(x).sum().backward()
    # d(Σ y)/d S_e = Σ over tokens of x[:, col_e] (each output's gradient is 1).
    expected = x.reshape(-1, 20).sum(0)[layer.S_col_indices.long()]
    torch.testing.assert_close(layer.S_values.grad, expected, atol=1e-5, rtol=1e-5)
    assert layer.A.grad.abs().sum() > 0 and layer.B.grad.abs().sum() > 0
    names = {id(p) for p in factor_parameters(nn.Sequential(layer))}
    assert id(layer.S_values) in names


def _sparse_llama() -> nn.Module:
    model = tiny_llama()
    gram = _gram(64, seed=3)
    for layer in model.model.layers:
        attention = layer.self_attn
        attention.q_proj = factorize_sparse(attention.q_proj, 8, 0.4, gram=gram)
        layer.mlp.down_proj = factorize_sparse(layer.mlp.down_proj, 16, 0.3)
    return model


def test_save_and_load_give_the_same_outputs(tmp_path):
    model = _sparse_llama()
    assert sum(isinstance(m, LowRankSparseLinear) for m in model.modules()) == 4
    ids = torch.randint(0, 264, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    loaded, _ = laserrmt.load(laserrmt.save(model, tmp_path / "m"))
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LowRankSparseLinear) and layer.S_col_indices.dtype == torch.int32
    with torch.no_grad():
        assert (loaded(ids).logits - expected).abs().max().item() <= 1e-6


def test_hf_export_writes_the_dense_sum(tmp_path):
    from transformers import AutoModelForCausalLM

    from laserrmt.export import export_hf

    model = _sparse_llama()
    report = export_hf(model, tmp_path / "hf")
    assert report["layers_densified"]["factorized"] == 4
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    weight = model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(
        plain.model.layers[1].mlp.down_proj.weight, _dense_weight(weight), atol=1e-6, rtol=0
    )


def test_onnx_export_refuses_in_one_line(tmp_path):
    from laserrmt.export import export_onnx

    with pytest.raises(TargetSelectionError, match="--format hf") as error:
        export_onnx(_sparse_llama(), tmp_path / "onnx")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "onnx").exists()


def test_a_convolution_is_refused_with_the_way_out():
    with pytest.raises(TargetSelectionError, match="linear layers only"):
        factorize_sparse(nn.Conv2d(3, 4, 3), 2, 0.3)


@pytest.fixture
def _small_split():
    with small_calibration_split():
        yield


@pytest.mark.usefixtures("_small_split")
def test_budget_method_with_a_sparse_share_keeps_the_plain_size(tmp_path):
    options = {
        "method": "budget",
        "target_params": 0.3,
        "calibration_windows": 2,
        "window": 64,
        "progress": False,
    }
    plain, plain_result = compress(tiny_llama(), tiny_tokenizer(), **options)
    model, result = compress(tiny_llama(), tiny_tokenizer(), sparse_share=0.3, **options)
    # The same decisions; only the layers they are cut into differ.
    assert [(d.module, d.mode, d.rank) for d in result.plan] == [
        (d.module, d.mode, d.rank) for d in plain_result.plan
    ]
    sparse = [m for m in model.modules() if isinstance(m, LowRankSparseLinear)]
    factorized = [m for m in plain.modules() if isinstance(m, LowRankLinear)]
    assert sparse and len(sparse) <= len(factorized)
    assert weight_bytes(model) <= weight_bytes(plain)
    ids = torch.randint(0, 264, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    loaded, _ = laserrmt.load(laserrmt.save(model, tmp_path / "m", plan=result.plan))
    replayed, _ = compress(
        tiny_llama(), tiny_tokenizer(), plan=result.plan, sparse_share=0.3, **options
    )
    with torch.no_grad():
        assert (loaded(ids).logits - expected).abs().max().item() <= 1e-5
        assert (replayed(ids).logits - expected).abs().max().item() <= 1e-5


def test_input_gram_diagonals_are_the_summed_squared_inputs():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(2, 4, 6) for _ in range(3)]
    diagonals = input_gram_diagonals(model, ["0", "2"], batches, progress=False)
    first = sum((b.reshape(-1, 6) ** 2).sum(0) for b in batches)
    with torch.no_grad():
        second = sum((model[1](model[0](b)).reshape(-1, 5) ** 2).sum(0) for b in batches)
    torch.testing.assert_close(diagonals["0"].double(), first.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diagonals["2"].double(), second.double(), rtol=1e-5, atol=1e-5)
