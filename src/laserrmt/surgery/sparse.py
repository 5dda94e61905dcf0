"""Low rank plus sparse: ``W ≈ A B + S`` under the parameter budget of a plain factorization.

A truncated factorization misses the entries of ``W`` that no few directions explain: a handful
of large weights, such as those on the input channels with the largest activations. Spending part
of the budget on those entries, kept exactly in a sparse matrix ``S``, and the rest on the rank
is the hybrid representation of the low-rank + sparse decompositions (LoSparse, Li et al.,
ICML 2023; SLTrain, Han et al., NeurIPS 2024).

Construction (:func:`lowrank_plus_sparse`): the factors are the activation-aware rank-``k``
truncation (:func:`~laserrmt.surgery.whiten.weighted_svd` with SVD-LLM whitening when the
input Gram ``G`` is given, the plain SVD otherwise), then ``S`` holds the ``nnz`` entries of the
residual ``R = W − A B`` with the largest ``|R_ij| · sqrt(G_jj)``: the output error an entry
causes on the calibration inputs, ``‖x_j R_ij‖``, when the input channels are uncorrelated
(plain ``|R_ij|`` without a Gram). ``S``'s values are the residual's; they are not refitted.

Storage and its cost (:func:`split_budget`): ``S`` is kept in CSR form, values in the weight's
dtype and int32 column indices and row pointers, as real tensors of the state dict. An entry
costs its value plus a 4-byte column index, and the row pointers ``4 (m + 1)`` bytes once; the
budget counts those bytes in units of the weight's element size (an entry is 2 parameters in
float32, 3 in bfloat16), so the module's tensors never take more bytes than the plain
factorization they replace.

The product: ``y = A (B x) + S x + bias``, ``S x`` through ``torch.sparse_csr_tensor`` (MKL's
CSR × dense on CPU, cuSPARSE on CUDA), built from the stored parts at each call so that
gradients reach ``S``'s values. Candidates for ``S x`` were timed on one CPU thread for a
576 × 1536 ``S`` and 512 tokens (float32, median of 20) on a shared 2-core machine; at 1 / 2 /
5 % density, quiet: CSR × dense 1.5 / 1.7 / 4.0 ms, dense × transposed CSR 4.6 / 7.4 / 16,
scattering ``S`` into a dense matrix then ``F.linear`` 10 / 10 / 21, COO 13 / 25 / 98,
gather / ``index_add_`` 19 / 74 / 243, against 9.9 ms for the dense ``F.linear``; under load
(load average 10): CSR 6.1 / 7.1 / 12, dense × CSR 15 / 20 / 41, scatter 34 / 26 / 30, gather
81 / 191 / 512, dense 24–29. The whole layer at 2 % (rank 174 + 18 719 entries, the bytes of
rank 192) took 25 ms under that load, against 13 ms for rank 192 alone and 26 ms dense: the
sparse term costs more than its share of the bytes. MKL has no 16-bit CSR kernel, so the sparse
product runs in at least float32.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from laserrmt.errors import InvalidOptionError, TargetSelectionError
from laserrmt.models.placement import float64_device
from laserrmt.surgery.lowrank import (
    LowRankLinear,
    _bias_of,
    _check_rank,
    _dense_dtype,
    _is_hf_conv1d,
    _weight_of,
    factor_weight,
    truncated_svd,
    weight_as_matrix,
)
from laserrmt.surgery.registry import CompressedModule, dtype_from_name, dtype_name, register_module
from laserrmt.surgery.whiten import DEFAULT_FLOOR, weighted_svd

__all__ = [
    "INDEX_BYTES",
    "MAX_SPARSE_SHARE",
    "LowRankPlusSparse",
    "LowRankSparseLinear",
    "check_sparse_share",
    "factorize_sparse",
    "input_gram_diagonals",
    "lowrank_plus_sparse",
    "sparse_factorizer",
    "split_budget",
]

#: Bytes of one stored index (CSR column indices and row pointers are int32).
INDEX_BYTES = 4
#: The sparse share is kept below this: the factors must keep most of the budget.
MAX_SPARSE_SHARE = 0.9


# ---------------------------------------------------------------------------------------------
# The budget


def check_sparse_share(share: Any) -> float:
    """``share`` as a float in [0, :data:`MAX_SPARSE_SHARE`); anything else is refused."""
    if (
        isinstance(share, bool)
        or not isinstance(share, numbers.Real)
        or not 0 <= float(share) < MAX_SPARSE_SHARE
    ):
        raise InvalidOptionError(
            f"--sparse-share {share!r}: give the fraction of each factorized matrix's budget "
            f"spent on sparse entries, in [0, {MAX_SPARSE_SHARE})"
        )
    return float(share)


def split_budget(
    shape: tuple[int, int], params: int, sparse_share: float, *, dtype: torch.dtype = torch.float32
) -> tuple[int, int]:
    """Split the ``params`` a plain factorization keeps into a rank and sparse entries.

    The factors get ``rank = ⌊(1 − sparse_share) · params / (m + n)⌋`` (``rank (m + n)``
    parameters); what is left, in bytes ``e = dtype``'s element size each, pays for the row
    pointers ``4 (m + 1)`` bytes once and ``e + 4`` bytes per entry (value and column index).
    When the share is 0, leaves the factors no rank, or does not pay for one entry, everything
    goes to the rank (``(params // (m + n), 0)``: the plain factorization).

    Returns:
        ``(rank, nnz)`` with ``e · rank (m + n) + (e + 4) nnz + 4 (m + 1) ≤ e · params``.

    Raises:
        InvalidOptionError: a share outside [0, 0.9), or a budget below rank 1.
    """
    share = check_sparse_share(sparse_share)
    m, n = shape
    plain = params // (m + n)
    if plain < 1:
        raise InvalidOptionError(
            f"a budget of {params} parameters does not pay for rank 1 of a {m}×{n} matrix"
        )
    if share == 0:
        return plain, 0
    rank = math.floor((1 - share) * params / (m + n))
    if rank < 1:
        return plain, 0
    element = torch.empty((), dtype=dtype).element_size()
    left = (params - rank * (m + n)) * element - INDEX_BYTES * (m + 1)
    nnz = left // (element + INDEX_BYTES)
    if nnz < 1:
        return plain, 0
    return rank, min(int(nnz), m * n)


# ---------------------------------------------------------------------------------------------
# The decomposition


class LowRankPlusSparse(NamedTuple):
    """``W ≈ A @ B + S``: ``A`` m × k, ``B`` k × n and ``S`` an m × n sparse CSR tensor with
    int32 indices, all in the weight's dtype and on its device."""

    A: torch.Tensor
    B: torch.Tensor
    S: torch.Tensor


def _channel_weights(gram: Any, n: int, label: str) -> torch.Tensor | None:
    """``sqrt(G_jj)`` from an n × n Gram or its diagonal (float64), or None without a Gram."""
    if gram is None:
        return None
    g = torch.as_tensor(gram).detach().to(torch.float64)
    diagonal = g.diagonal() if g.ndim == 2 else g
    if diagonal.ndim != 1 or diagonal.shape[0] != n or (g.ndim == 2 and g.shape != (n, n)):
        raise InvalidOptionError(
            f"input Gram of {label} has shape {tuple(g.shape)} but the weight has {n} input "
            "features; pass its n × n Gram (or, with svd=, its diagonal)"
        )
    return diagonal.clamp(min=0).sqrt()


def _float64(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.detach().to(device=device, dtype=torch.float64)


def _csr(
    residual: torch.Tensor,
    score: torch.Tensor,
    nnz: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The ``nnz`` entries of ``residual`` with the largest ``score``, as an int32 CSR tensor
    in ``dtype`` on ``device``."""
    m, n = residual.shape
    chosen = torch.topk(score.reshape(-1), nnz, sorted=False).indices.sort().values
    rows = torch.div(chosen, n, rounding_mode="floor")
    crow = torch.zeros(m + 1, dtype=torch.int64, device=residual.device)
    crow[1:] = torch.bincount(rows, minlength=m).cumsum(0)
    return _sparse_csr(
        crow.to(device=device, dtype=torch.int32),
        (chosen % n).to(device=device, dtype=torch.int32),
        residual.reshape(-1)[chosen].to(device=device, dtype=dtype),
        (m, n),
    )


def _sparse_csr(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    # torch warns once per process that sparse CSR is "beta"; the operations used here (build,
    # CSR × dense, its gradient) are stable since torch 2.0.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def lowrank_plus_sparse(
    weight: torch.Tensor,
    rank: int,
    nnz: int,
    *,
    gram: Any = None,
    svd: Sequence[Any] | None = None,
    floor: float = DEFAULT_FLOOR,
    name: str | None = None,
) -> LowRankPlusSparse:
    """Factors ``A B`` of rank ``rank`` and the ``nnz`` residual entries that matter most.

    The factors come from ``svd`` when given (``(U, s, Vh)``, e.g. the budget method's
    whitened triplets), else from the SVD-LLM-whitened SVD when ``gram`` (n × n, ``Σ xᵀx``) is
    given, else from the plain SVD. ``S`` holds the entries of ``R = W − A B`` (with ``A``, ``B``
    as stored, in the weight's dtype) of largest ``|R_ij| · sqrt(G_jj)``, or ``|R_ij|`` without
    a Gram. With ``svd`` given, ``gram`` may be only the Gram's diagonal.

    Raises:
        InvalidOptionError: rank outside 1..min(m, n), ``nnz`` outside 1..m·n, a Gram of the
            wrong shape, or only a diagonal where the factors need the whole Gram.
        NumericalError: NaN/Inf in the weight, the Gram or the factors.
    """
    label = name or "matrix"
    m, n = weight.shape
    _check_rank(rank, (m, n), label)
    if isinstance(nnz, bool) or not isinstance(nnz, numbers.Integral) or not 1 <= nnz <= m * n:
        raise InvalidOptionError(f"nnz {nnz!r} for {label} is outside 1..{m * n}")
    weights = _channel_weights(gram, n, label)
    if svd is None:
        if gram is None:
            svd = truncated_svd(weight, rank, name=label)
        elif torch.as_tensor(gram).ndim != 2:
            raise InvalidOptionError(
                f"the whitened factors of {label} need its whole n × n input Gram, not only the "
                "diagonal; pass the Gram or svd="
            )
        else:
            svd = weighted_svd(
                weight, whiten="svdllm", gram=gram, floor=floor, module=name
            ).as_tuple()
    a, b = factor_weight(weight, rank, svd=svd, name=label)
    device = float64_device(weight.device)
    residual = _float64(weight, device) - _float64(a, device) @ _float64(b, device)
    score = residual.abs()
    if weights is not None:
        score = score * weights.to(score.device)
    return LowRankPlusSparse(a, b, _csr(residual, score, int(nnz), weight.dtype, weight.device))


# ---------------------------------------------------------------------------------------------
# The layer


@register_module
class LowRankSparseLinear(CompressedModule):
    """A linear layer stored as two factors and a sparse matrix: ``y = A (B x) + S x + bias``.

    ``A`` is out × k, ``B`` k × in; ``S`` (out × in, ``nnz`` entries) is stored in CSR form as
    ``S_values`` (a parameter in the layer's dtype, trained by healing like the factors),
    ``S_col_indices`` (int32, nnz) and ``S_crow_indices`` (int32, out + 1) buffers. Built with
    :meth:`from_linear`; the constructor alone leaves every tensor uninitialised (they are
    filled when a saved model is loaded).
    """

    S_crow_indices: torch.Tensor
    S_col_indices: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        nnz: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_rank(rank, (out_features, in_features), type(self).__name__)
        if not 1 <= nnz <= out_features * in_features:
            raise InvalidOptionError(
                f"nnz {nnz} is outside 1..{out_features * in_features} for a "
                f"{out_features}×{in_features} layer"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = int(rank)
        self.nnz = int(nnz)
        self.A = nn.Parameter(torch.empty(out_features, self.rank, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(self.rank, in_features, device=device, dtype=dtype))
        self.S_values = nn.Parameter(torch.empty(self.nnz, device=device, dtype=dtype))
        index = torch.int32
        self.register_buffer(
            "S_crow_indices", torch.empty(out_features + 1, device=device, dtype=index)
        )
        self.register_buffer("S_col_indices", torch.empty(self.nnz, device=device, dtype=index))
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        rank: int,
        nnz: int,
        *,
        gram: Any = None,
        svd: Sequence[Any] | None = None,
        floor: float = DEFAULT_FLOOR,
        name: str | None = None,
    ) -> LowRankSparseLinear:
        """Decompose an ``nn.Linear`` or HF ``Conv1D`` (see :func:`lowrank_plus_sparse`)."""
        if not (isinstance(linear, nn.Linear) or _is_hf_conv1d(linear)):
            raise TargetSelectionError(
                f"module {name or type(linear).__name__} is a {type(linear).__name__}; low rank "
                "plus sparse supports linear layers only, so leave it out of the targets or "
                "drop --sparse-share"
            )
        matrix = weight_as_matrix(linear, name)
        parts = lowrank_plus_sparse(matrix, rank, nnz, gram=gram, svd=svd, floor=floor, name=name)
        bias = _bias_of(linear)
        out_features, in_features = matrix.shape
        layer = cls(
            in_features,
            out_features,
            rank,
            nnz,
            bias=bias is not None,
            device=matrix.device,
            dtype=matrix.dtype,
        )
        with torch.no_grad():
            layer.A.copy_(parts.A)
            layer.B.copy_(parts.B)
            layer.S_values.copy_(parts.S.values())
            layer.S_crow_indices.copy_(parts.S.crow_indices())
            layer.S_col_indices.copy_(parts.S.col_indices())
            if layer.bias is not None and bias is not None:
                layer.bias.copy_(bias)
        layer.train(linear.training)
        layer.requires_grad_(_weight_of(linear).requires_grad)
        return layer

    def sparse(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``S`` as a torch sparse CSR tensor (its values differentiable), in ``dtype``."""
        values = self.S_values if dtype is None else self.S_values.to(dtype)
        return _sparse_csr(
            self.S_crow_indices,
            self.S_col_indices,
            values,
            (self.out_features, self.in_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(x, self.B), self.A, self.bias)
        dtype = _dense_dtype(self.S_values.dtype)
        flat = x.reshape(-1, self.in_features).to(dtype)
        sparse = (self.sparse(dtype) @ flat.T).T
        return y + sparse.reshape(*x.shape[:-1], self.out_features).to(y.dtype)

    def to_dense(self) -> torch.Tensor:
        """The equivalent out × in weight ``A @ B + S`` (in the layer's dtype)."""
        with torch.no_grad():
            dtype = _dense_dtype(self.A.dtype)
            dense = self.A.to(dtype) @ self.B.to(dtype) + self.sparse(dtype).to_dense()
        return dense.to(self.A.dtype)

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "nnz": self.nnz,
            "bias": self.bias is not None,
            "dtype": dtype_name(self.A.dtype),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> LowRankSparseLinear:
        return cls(
            int(cfg["in_features"]),
            int(cfg["out_features"]),
            int(cfg["rank"]),
            int(cfg["nnz"]),
            bias=bool(cfg["bias"]),
            dtype=dtype_from_name(cfg["dtype"]),
        )

    def extra_repr(self) -> str:
        density = self.nnz / (self.out_features * self.in_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, nnz={self.nnz} ({density:.2%}), bias={self.bias is not None}"
        )


# ---------------------------------------------------------------------------------------------
# A planned factorization, with part of its budget spent on sparse entries


def factorize_sparse(
    module: nn.Module,
    rank: int,
    sparse_share: float,
    *,
    gram: Any = None,
    svd: Sequence[Any] | None = None,
    floor: float = DEFAULT_FLOOR,
    name: str | None = None,
) -> CompressedModule:
    """The replacement of a linear layer planned at ``rank``, with ``sparse_share`` of that
    rank's parameters spent on sparse entries (:func:`split_budget`).

    ``gram`` (the layer's input Gram, or its diagonal when ``svd`` is given) weights the
    residual entries by their inputs; ``svd`` is the planned factorization's ``(U, s, Vh)``, at
    least ``rank`` triplets, of which the split rank's leading ones are used. When not one
    sparse entry fits the budget the layer is a plain :class:`LowRankLinear` at ``rank``.

    Raises:
        TargetSelectionError: the module is not a linear layer.
        InvalidOptionError: a share outside [0, 0.9).
    """
    if not (isinstance(module, nn.Linear) or _is_hf_conv1d(module)):
        raise TargetSelectionError(
            f"module {name or type(module).__name__} is a {type(module).__name__}; "
            "--sparse-share supports linear layers only, so leave it out of the targets"
        )
    matrix = weight_as_matrix(module, name)
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    split_rank, nnz = split_budget(shape, rank * sum(shape), sparse_share, dtype=matrix.dtype)
    if nnz == 0:
        return LowRankLinear.from_linear(module, rank, svd, name=name)
    return LowRankSparseLinear.from_linear(
        module, split_rank, nnz, gram=gram, svd=svd, floor=floor, name=name
    )


def sparse_factorizer(
    sparse_share: float, grams: Mapping[str, Any] | None = None
) -> Callable[..., nn.Module]:
    """A ``factorize`` for :func:`~laserrmt.surgery.apply.apply_plan`: every planned
    factorization becomes :func:`factorize_sparse` at ``sparse_share``, weighted by
    ``grams[name]`` (Grams or their diagonals) where given."""
    share = check_sparse_share(sparse_share)
    known = grams or {}

    def factorize(
        module: nn.Module, rank: int, *, svd: Sequence[Any] | None = None, name: str | None = None
    ) -> nn.Module:
        gram = known.get(name) if name is not None else None
        return factorize_sparse(module, rank, share, gram=gram, svd=svd, name=name)

    return factorize


def input_gram_diagonals(
    model: nn.Module, names: Sequence[str], batches: Iterable[Any], progress: bool = True
) -> dict[str, torch.Tensor]:
    """The diagonal of each named module's input Gram on ``batches`` (one streamed pass; only
    the n diagonal values per module are kept)."""
    from laserrmt.stats.calibration import iter_activation_statistics

    return {
        stats.module: stats.gram.diagonal().clone()
        for stats in iter_activation_statistics(model, batches, names, progress=progress)
    }
