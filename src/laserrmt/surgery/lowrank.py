"""Rank reduction of one layer: factorize it into two smaller layers, or denoise it in place.

A weight is seen as an ``m × n`` (out × in) matrix ``W``; convolution kernels as out × in·kh·kw
and the HF GPT-2 ``Conv1D`` (which stores in × out) transposed. Its truncated SVD
``W ≈ U_k Σ_k V_kᵀ`` is computed once, in float64, and used in one of two ways:

* **factorize**: store ``A = U_k Σ_k^{1/2}`` (m × k) and ``B = Σ_k^{1/2} V_kᵀ`` (k × n) as two
  layers, ``k(m + n)`` parameters instead of ``m·n``; the square root splits the scale evenly
  so that neither factor is badly conditioned in low precision.
* **denoise**: replace ``W`` by the dense product ``U_k Σ_k V_kᵀ`` (LASER, Sharma et al.,
  ICLR 2024; laserRMT): no parameters saved, the spectrum beyond k removed.

Layers supported: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (groups = 1) and
``transformers.pytorch_utils.Conv1D``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from laserrmt.errors import InvalidOptionError, NumericalError, PlanError, TargetSelectionError
from laserrmt.models.placement import float64_device
from laserrmt.models.targets import set_weight_matrix, weight_matrix
from laserrmt.surgery.registry import CompressedModule, dtype_from_name, dtype_name, register_module

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(U, S, Vh)`` of an m × n matrix: U is m × r, S has r values (descending), Vh is r × n."""


# ---------------------------------------------------------------------------------------------
# The matrix view of a layer's weight


def _is_hf_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the surgery itself does not need it
        return False
    return isinstance(module, Conv1D)


def _module_label(module: nn.Module, name: str | None) -> str:
    return name if name else type(module).__name__


def _check_supported(module: nn.Module, name: str | None = None) -> None:
    label = _module_label(module, name)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.groups != 1:
            raise TargetSelectionError(
                f"module {label} is a grouped convolution (groups={module.groups}); "
                "its kernel is not one matrix, so leave it out of the plan"
            )
        return
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        return
    raise TargetSelectionError(
        f"module {label} is a {type(module).__name__}; rank reduction supports nn.Linear, "
        "nn.Conv1d, nn.Conv2d and transformers Conv1D, so leave it out of the plan"
    )


def _weight_of(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)  # every supported layer has a tensor weight
    return weight


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def weight_as_matrix(module: nn.Module, name: str | None = None) -> torch.Tensor:
    """The module's weight as a detached out × in view (:func:`laserrmt.models.targets.weight_matrix`).

    Raises:
        TargetSelectionError: the module is not a supported layer.
    """
    _check_supported(module, name)
    return weight_matrix(module)


# ---------------------------------------------------------------------------------------------
# SVD and factors


def _require_finite(tensor: torch.Tensor, what: str, label: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise NumericalError(
            f"{what} of module {label} contains NaN or Inf; check the checkpoint or the dtype"
        )


def truncated_svd(weight: torch.Tensor, rank: int | None = None, *, name: str | None = None) -> SVD:
    """Thin SVD of a 2-D matrix in float64, optionally truncated to the top ``rank`` triplets.

    Returns float64 ``(U, S, Vh)`` on the matrix's device (CPU for MPS) with
    ``weight ≈ U @ diag(S) @ Vh`` and S descending.

    Raises:
        NumericalError: the matrix holds NaN/Inf or the SVD did not converge.
    """
    label = name or "matrix"
    if weight.ndim != 2:
        raise InvalidOptionError(f"{label}: expected a 2-D matrix, got shape {tuple(weight.shape)}")
    matrix = weight.detach().to(device=float64_device(weight.device), dtype=torch.float64)
    _require_finite(matrix, "weight", label)
    try:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
        raise NumericalError(f"SVD of module {label} failed to converge: {exc}") from None
    if rank is not None:
        _check_rank(rank, tuple(matrix.shape), label)  # type: ignore[arg-type]
        u, s, vh = u[:, : int(rank)], s[: int(rank)], vh[: int(rank)]
    return u, s, vh


def _check_rank(rank: int, shape: tuple[int, int], label: str) -> None:
    full = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= full:
        raise InvalidOptionError(
            f"rank {rank!r} for module {label} is outside 1..{full} "
            f"(the full rank of a {shape[0]}×{shape[1]} matrix)"
        )


def _as_float64(value: Any, device: torch.device) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return tensor.detach().to(device=device, dtype=torch.float64)


def _top_svd(
    matrix: torch.Tensor, rank: int, svd: Sequence[Any] | None, label: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` float64 triplets of ``matrix``, reusing a precomputed SVD when given."""
    m, n = matrix.shape
    _check_rank(rank, (m, n), label)
    if svd is None:
        return truncated_svd(matrix, rank, name=label)
    if len(svd) != 3:
        raise PlanError(f"precomputed SVD of module {label} must be (U, S, Vh)")
    device = float64_device(matrix.device)
    u, s, vh = (_as_float64(part, device) for part in svd)
    if (
        u.ndim != 2
        or s.ndim != 1
        or vh.ndim != 2
        or u.shape[0] != m
        or vh.shape[1] != n
        or not rank <= s.shape[0] <= min(u.shape[1], vh.shape[0])
    ):
        raise PlanError(
            f"precomputed SVD of module {label} has shapes U{tuple(u.shape)} S{tuple(s.shape)} "
            f"Vh{tuple(vh.shape)}, which do not fit a {m}×{n} weight at rank {rank}; "
            "recompute the analysis for this model"
        )
    for part, what in ((u, "U"), (s, "S"), (vh, "Vh")):
        _require_finite(part, f"precomputed SVD factor {what}", label)
    return u[:, :rank], s[:rank], vh[:rank]


def factor_weight(
    weight: torch.Tensor,
    rank: int,
    *,
    svd: Sequence[Any] | None = None,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an m × n matrix into ``A = U_k Σ_k^{1/2}`` (m × k) and ``B = Σ_k^{1/2} V_kᵀ`` (k × n).

    Computed in float64 (from ``svd`` when given, so an SVD done during analysis is reused)
    and cast back to the weight's dtype and device.

    Raises:
        NumericalError: NaN/Inf in the weight or in the factors after the cast.
        InvalidOptionError: ``rank`` outside 1..min(m, n).
    """
    label = name or "matrix"
    u, s, vh = _top_svd(weight, rank, svd, label)
    root = s.sqrt()
    a = (u * root).to(device=weight.device, dtype=weight.dtype)
    b = (root[:, None] * vh).to(device=weight.device, dtype=weight.dtype)
    _require_finite(a, "factor A", label)
    _require_finite(b, "factor B", label)
    return a, b


def low_rank_weight(
    weight: torch.Tensor,
    rank: int,
    *,
    svd: Sequence[Any] | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """The dense rank-``rank`` truncation ``U_k Σ_k V_kᵀ`` of an m × n matrix, in its dtype."""
    label = name or "matrix"
    u, s, vh = _top_svd(weight, rank, svd, label)
    product = ((u * s) @ vh).to(device=weight.device, dtype=weight.dtype)
    _require_finite(product, "rank-reduced weight", label)
    return product


# ---------------------------------------------------------------------------------------------
# Factorized layers


def _dense_dtype(dtype: torch.dtype) -> torch.dtype:
    # Multiply low-precision factors in at least float32, as the layer's own matmul accumulates.
    return torch.promote_types(dtype, torch.float32)


@register_module
class LowRankLinear(CompressedModule):
    """A linear layer stored as two factors: ``y = A (B x) + bias``.

    ``A`` is out × k and ``B`` is k × in, so the layer holds ``k(in + out)`` weight parameters.
    Built from a trained layer with :meth:`from_linear`; the constructor alone leaves the factors
    uninitialised (they are filled when a saved model is loaded).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_rank(rank, (out_features, in_features), type(self).__name__)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = int(rank)
        self.A = nn.Parameter(torch.empty(out_features, self.rank, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(self.rank, in_features, device=device, dtype=dtype))
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        rank: int,
        svd: Sequence[Any] | None = None,
        *,
        name: str | None = None,
    ) -> LowRankLinear:
        """Factorize an ``nn.Linear`` or HF ``Conv1D`` at ``rank`` (see :func:`factor_weight`).

        ``svd`` is ``(U, S, Vh)`` of the out × in weight matrix, at least ``rank`` triplets.
        """
        if not (isinstance(linear, nn.Linear) or _is_hf_conv1d(linear)):
            raise TargetSelectionError(
                f"module {_module_label(linear, name)} is a {type(linear).__name__}, "
                "not a linear layer"
            )
        matrix = weight_as_matrix(linear, name)
        a, b = factor_weight(matrix, rank, svd=svd, name=name or type(linear).__name__)
        out_features, in_features = matrix.shape
        layer = cls(
            in_features,
            out_features,
            rank,
            bias=_bias_of(linear) is not None,
            device=matrix.device,
            dtype=matrix.dtype,
        )
        bias = _bias_of(linear)
        with torch.no_grad():
            layer.A.copy_(a)
            layer.B.copy_(b)
            if layer.bias is not None and bias is not None:
                layer.bias.copy_(bias)
        layer.train(linear.training)
        layer.requires_grad_(_weight_of(linear).requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The equivalent out × in weight ``A @ B`` (in the factors' dtype)."""
        with torch.no_grad():
            dense = self.A.to(_dense_dtype(self.A.dtype)) @ self.B.to(_dense_dtype(self.B.dtype))
        return dense.to(self.A.dtype)

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
            "dtype": dtype_name(self.A.dtype),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> LowRankLinear:
        return cls(
            int(cfg["in_features"]),
            int(cfg["out_features"]),
            int(cfg["rank"]),
            bias=bool(cfg["bias"]),
            dtype=dtype_from_name(cfg["dtype"]),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )


class _LowRankConvNd(CompressedModule):
    """Shared body of the factorized convolutions: ``reduce`` then ``expand``.

    ``reduce`` is a k-channel convolution with the original kernel, stride, padding, dilation and
    padding mode (no bias); ``expand`` is a 1×1 convolution from k to the output channels that
    carries the bias. Since a convolution is linear in its kernel, this equals the original
    layer with the rank-k kernel ``A @ B`` (A = ``expand`` weight, B = ``reduce`` weight).
    """

    _conv: type[nn.Conv1d] | type[nn.Conv2d]
    _ndim: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kernel = _as_tuple(kernel_size, self._ndim)
        n = in_channels * _prod(kernel)
        _check_rank(rank, (out_channels, n), type(self).__name__)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank = int(rank)
        # Any: torch types kernel/stride as fixed-length tuples per dimensionality.
        geometry: dict[str, Any] = {
            "kernel_size": kernel,
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "padding_mode": padding_mode,
        }
        self.reduce = self._conv(
            in_channels, self.rank, bias=False, device=device, dtype=dtype, **geometry
        )
        self.expand = self._conv(self.rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @property
    def A(self) -> torch.Tensor:
        """out × k factor (the 1×1 ``expand`` kernel, flattened)."""
        return self.expand.weight.reshape(self.out_channels, self.rank)

    @property
    def B(self) -> torch.Tensor:
        """k × in·kernel factor (the ``reduce`` kernel, flattened)."""
        return self.reduce.weight.reshape(self.rank, -1)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.expand.bias

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        rank: int,
        svd: Sequence[Any] | None = None,
        *,
        name: str | None = None,
    ) -> _LowRankConvNd:
        """Factorize a convolution at ``rank``; ``svd`` is of its out × in·kernel matrix."""
        if not isinstance(conv, cls._conv):
            raise TargetSelectionError(
                f"module {_module_label(conv, name)} is a {type(conv).__name__}, "
                f"not an nn.{cls._conv.__name__}"
            )
        matrix = weight_as_matrix(conv, name)
        a, b = factor_weight(matrix, rank, svd=svd, name=name or type(conv).__name__)
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            rank,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=_bias_of(conv) is not None,
            padding_mode=conv.padding_mode,
            device=matrix.device,
            dtype=matrix.dtype,
        )
        with torch.no_grad():
            layer.reduce.weight.copy_(b.reshape(layer.reduce.weight.shape))
            layer.expand.weight.copy_(a.reshape(layer.expand.weight.shape))
            bias = _bias_of(conv)
            if layer.expand.bias is not None and bias is not None:
                layer.expand.bias.copy_(bias)
        layer.train(conv.training)
        layer.requires_grad_(_weight_of(conv).requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))

    def to_dense(self) -> torch.Tensor:
        """The equivalent kernel, out × in × kernel, with rank k as an out × in·kernel matrix."""
        with torch.no_grad():
            dtype = _dense_dtype(self.A.dtype)
            dense = self.A.to(dtype) @ self.B.to(dtype)
        shape = (self.out_channels, self.in_channels, *self.reduce.kernel_size)
        return dense.reshape(shape).to(self.A.dtype)

    def laserrmt_config(self) -> dict[str, Any]:
        reduce = self.reduce
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "rank": self.rank,
            "kernel_size": list(reduce.kernel_size),
            "stride": list(reduce.stride),
            "padding": reduce.padding if isinstance(reduce.padding, str) else list(reduce.padding),
            "dilation": list(reduce.dilation),
            "bias": self.expand.bias is not None,
            "padding_mode": reduce.padding_mode,
            "dtype": dtype_name(reduce.weight.dtype),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> _LowRankConvNd:
        padding = cfg["padding"]
        return cls(
            int(cfg["in_channels"]),
            int(cfg["out_channels"]),
            int(cfg["rank"]),
            tuple(cfg["kernel_size"]),
            stride=tuple(cfg["stride"]),
            padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(cfg["dilation"]),
            bias=bool(cfg["bias"]),
            padding_mode=str(cfg["padding_mode"]),
            dtype=dtype_from_name(cfg["dtype"]),
        )

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self.rank}"


@register_module
class LowRankConv1d(_LowRankConvNd):
    """An ``nn.Conv1d`` stored as a k-channel convolution followed by a 1-wide convolution."""

    _conv = nn.Conv1d
    _ndim = 1


@register_module
class LowRankConv2d(_LowRankConvNd):
    """An ``nn.Conv2d`` stored as a k-channel convolution followed by a 1×1 convolution."""

    _conv = nn.Conv2d
    _ndim = 2


def _as_tuple(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(int(v) for v in value)


def _prod(values: Sequence[int]) -> int:
    result = 1
    for v in values:
        result *= v
    return result


# ---------------------------------------------------------------------------------------------
# Operations on a module


def factorize(
    module: nn.Module,
    rank: int,
    *,
    svd: Sequence[Any] | None = None,
    name: str | None = None,
) -> CompressedModule:
    """The factorized replacement of ``module`` at ``rank`` (the caller swaps it in).

    ``nn.Linear`` and HF ``Conv1D`` become :class:`LowRankLinear`; ``nn.Conv1d`` and
    ``nn.Conv2d`` become :class:`LowRankConv1d` / :class:`LowRankConv2d`.

    Raises:
        TargetSelectionError: an unsupported layer.
        InvalidOptionError: ``rank`` outside 1..min(m, n).
        NumericalError: NaN/Inf in the weight or the factors, or a failed SVD.
    """
    _check_supported(module, name)
    if isinstance(module, nn.Conv1d):
        return LowRankConv1d.from_conv(module, rank, svd, name=name)
    if isinstance(module, nn.Conv2d):
        return LowRankConv2d.from_conv(module, rank, svd, name=name)
    return LowRankLinear.from_linear(module, rank, svd, name=name)


def denoise_(
    module: nn.Module,
    rank: int,
    *,
    svd: Sequence[Any] | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Replace the module's weight in place by its dense rank-``rank`` truncation (LASER).

    Returns an exact copy of the original weight (in the module's own layout), which
    :func:`restore_` puts back bit for bit.

    Raises:
        TargetSelectionError, InvalidOptionError, NumericalError: as :func:`factorize`.
    """
    matrix = weight_as_matrix(module, name)
    reduced = low_rank_weight(matrix, rank, svd=svd, name=name or type(module).__name__)
    original = _weight_of(module).detach().clone()
    set_weight_matrix(module, reduced)
    return original


def restore_(module: nn.Module, original: torch.Tensor, *, name: str | None = None) -> None:
    """Put back a weight returned by :func:`denoise_` (an exact copy, so ``torch.equal`` holds)."""
    weight = getattr(module, "weight", None)
    label = _module_label(module, name)
    if not isinstance(weight, torch.Tensor):
        raise PlanError(f"module {label} has no weight to restore")
    if weight.shape != original.shape or weight.dtype != original.dtype:
        raise PlanError(
            f"saved weight for module {label} is {original.dtype} {tuple(original.shape)} but the "
            f"module holds {weight.dtype} {tuple(weight.shape)}; restore into the module it came from"
        )
    with torch.no_grad():
        weight.copy_(original)
