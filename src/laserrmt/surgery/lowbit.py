"""Group-wise 2- to 6- and 8-bit weights, and a low-rank correction of their error chosen by RMT.

**Quantization.** Each row of an ``m × n`` (out × in) weight is cut into groups of
``group_size`` consecutive input channels (128 by default; the last group of a row is shorter
when ``group_size`` does not divide ``n``). A group is stored as unsigned ``bits``-bit codes
``c ∈ [0, 2^bits − 1]`` with a float16 ``scale`` and a float16 ``low``:
``Q(W)_ij = low + c_ij · scale``. The grid is asymmetric (min to max), as in GGUF's Q4_1 or the
zero-point form of GPTQ/AWQ: at 2 and 3 bits a symmetric grid spends one of its 4 or 8 levels on
a sign the group may not need. ``low`` is rounded down and ``scale`` up to float16, so the grid
covers every value of the group and ``|W − Q(W)| ≤ scale / 2`` holds for what is stored.

Codes are packed along the row, ``lcm(bits, 8) / bits`` codes into ``lcm(bits, 8) / 8`` bytes,
lowest bits first: four 2-bit codes per byte, eight 3-bit codes per 3 bytes, two 4-bit codes per
byte, eight 5-bit codes per 5 bytes, four 6-bit codes per 3 bytes, one 8-bit code per byte (a
row's last unit is padded with zero codes). The bytes of one
matrix are therefore :func:`lowbit_matrix_bytes`, scales included, and they are the state
dict's real bytes. The forward pass dequantizes the whole weight and calls ``F.linear``: right
and simple, not fast (a fused low-bit kernel would read the packed bytes directly).

**Correction.** ``W ≈ Q(W) + A B`` with the rank of ``A B`` chosen by the noise edge of the
quantization residual ``R = W − Q(W)`` in the activation space: with ``S Sᵀ = G / n_samples``
the input Gram (:func:`laserrmt.surgery.whiten.whitening_factor`), ``‖X Rᵀ‖²`` is the squared
output error, and the singular values of ``R S`` above the Marchenko–Pastur edge
(:func:`laserrmt.rmt.thresholds.choose_rank`) are structure the rounding left behind, not the
bulk of independent rounding errors. The factors are SVD-LLM's truncated SVD of ``R S`` carried
back by ``S⁻¹``, stored in int8 with one float32 scale per row (as
:class:`~laserrmt.surgery.quantize.Int8LowRankLinear`). Caveat as for
:func:`~laserrmt.surgery.whiten.free_rank`: an anisotropic Gram makes the bulk of ``R S`` a
generalised MP law, so on real activations the edge also admits the strongest input directions
of plain rounding noise. Those carry the largest output error, so correcting them still pays,
but the rank is then a budget question: ``max_rank`` (or ``extra_bits`` for a model) caps it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from laserrmt.errors import InvalidOptionError, NumericalError, TargetSelectionError
from laserrmt.rmt.thresholds import RankChoice, choose_rank
from laserrmt.surgery.lowrank import LowRankLinear, weight_as_matrix
from laserrmt.surgery.quantize import (
    Int8LowRankLinear,
    _int8_linear,
    dequantize_weight_int8,
    int8_matrix_bytes,
    quantizable_modules,
    quantize_weight_int8,
)
from laserrmt.surgery.registry import CompressedModule, dtype_from_name, dtype_name, register_module
from laserrmt.surgery.replace import set_submodule
from laserrmt.surgery.whiten import Whitening, whitening_factor

__all__ = [
    "BITS",
    "CORRECTION_RULES",
    "DEFAULT_EXTRA_BITS",
    "DEFAULT_GROUP_SIZE",
    "CorrectedWeight",
    "LowBitLinear",
    "LowBitLowRankLinear",
    "LowBitWeight",
    "correction_bytes",
    "lowbit_matrix_bytes",
    "max_correction_rank",
    "pack_codes",
    "quantize_model_lowbit",
    "quantize_weight_lowbit",
    "quantize_with_correction",
    "unpack_codes",
]

BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUP_SIZE = 128
#: Default cap on a correction's int8 factors, in bits per weight of the layer: half the step to
#: the next bit width, so that ``Q_b(W) + UV`` stays smaller than ``Q_{b+1}(W)`` alone (one more
#: bit per weight would buy the next grid instead).
DEFAULT_EXTRA_BITS = 0.5
#: Rank rules that judge a spectrum against noise (``fixed`` keeps a share whatever it is).
CORRECTION_RULES = ("mp", "tw", "gd")


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise InvalidOptionError(f"bits {bits!r} is not supported; choose one of {BITS}")
    return int(bits)


def _check_group_size(group_size: int) -> int:
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, numbers.Integral)
        or group_size < 1
    ):
        raise InvalidOptionError(
            f"group size {group_size!r} must be a positive integer (input channels per scale, "
            f"e.g. {DEFAULT_GROUP_SIZE})"
        )
    return int(group_size)


def _unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing unit: the fewest codes that fill whole bytes."""
    unit_bits = math.lcm(bits, 8)
    return unit_bits // bits, unit_bits // 8


def _groups(n: int, group_size: int) -> int:
    return -(-n // group_size)


def lowbit_matrix_bytes(
    out_features: int, in_features: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE
) -> int:
    """Bytes of one quantized ``out × in`` matrix: packed codes and two float16 per group."""
    per, nbytes = _unit(_check_bits(bits))
    row = _groups(in_features, per) * nbytes
    return out_features * (row + 4 * _groups(in_features, _check_group_size(group_size)))


def correction_bytes(out_features: int, in_features: int, rank: int) -> int:
    """Bytes of int8 factors ``A`` (out × rank) and ``B`` (rank × in) with their row scales."""
    return int8_matrix_bytes(out_features, rank) + int8_matrix_bytes(rank, in_features)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``m × n`` codes in ``[0, 2^bits)`` → ``m × bytes`` uint8, lowest bits first."""
    per, nbytes = _unit(_check_bits(bits))
    m, n = codes.shape
    units = _groups(n, per)
    padded = torch.zeros(m, units * per, dtype=torch.int64, device=codes.device)
    padded[:, :n] = codes.to(torch.int64)
    shifts = torch.arange(per, device=codes.device) * bits
    words = (padded.view(m, units, per) << shifts).sum(-1)
    byte_shifts = torch.arange(nbytes, device=codes.device) * 8
    return ((words[..., None] >> byte_shifts) & 0xFF).reshape(m, units * nbytes).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes of each row, uint8."""
    per, nbytes = _unit(_check_bits(bits))
    m = packed.shape[0]
    mask = (1 << bits) - 1
    if nbytes == 1:  # whole codes per byte: stay in uint8, the cheapest route
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed[..., None] >> shifts) & mask
    else:
        word = torch.int32 if nbytes < 4 else torch.int64  # a 5-bit unit spans 40 bits
        byte_shifts = torch.arange(nbytes, dtype=word, device=packed.device) * 8
        words = (packed.to(word).view(m, -1, nbytes) << byte_shifts).sum(-1, dtype=word)
        shifts = torch.arange(per, dtype=word, device=packed.device) * bits
        codes = ((words[..., None] >> shifts) & mask).to(torch.uint8)
    return codes.reshape(m, -1)[:, :n]


def _dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    low: torch.Tensor,
    bits: int,
    group_size: int,
    n: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    codes = unpack_codes(packed, bits, n)
    m, groups = scale.shape
    if groups * group_size != n:
        codes = F.pad(codes, (0, groups * group_size - n))
    grouped = codes.view(m, groups, group_size).to(torch.float32)
    values = torch.addcmul(low.float()[..., None], grouped, scale.float()[..., None])
    return values.reshape(m, -1)[:, :n].to(dtype)


def _float16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """``x`` rounded to float16 toward ``direction`` (-inf: down, +inf: up)."""
    rounded = x.to(torch.float16)
    wrong = rounded.double() > x if direction < 0 else rounded.double() < x
    return torch.where(
        wrong, torch.nextafter(rounded, torch.full_like(rounded, direction)), rounded
    )


@dataclass(frozen=True)
class LowBitWeight:
    """A group-wise quantized ``m × n`` matrix as stored: packed codes, float16 scale and low."""

    packed: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``low + code · scale`` per group, computed in float32, returned in ``dtype``."""
        return _dequantize(
            self.packed, self.scale, self.low, self.bits, self.group_size, self.shape[1], dtype
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.low))


def quantize_weight_lowbit(
    weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE
) -> LowBitWeight:
    """Asymmetric group-wise quantization of an ``m × n`` (out × in) matrix (module doc).

    Raises:
        InvalidOptionError: unsupported ``bits`` or a group size that is not a positive integer.
        NumericalError: NaN or Inf in the matrix, or a group whose range overflows float16.
        ValueError: the tensor is not 2-D.
    """
    bits, group_size = _check_bits(bits), _check_group_size(group_size)
    if weight.dim() != 2:
        raise ValueError(f"expected an m × n matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise NumericalError(
            "the weight to quantize contains NaN or Inf; check the checkpoint or the dtype"
        )
    m, n = w.shape
    groups = _groups(n, group_size)
    # The last column repeated fills the short last group without widening its range.
    padded = torch.cat([w, w[:, -1:].expand(m, groups * group_size - n)], dim=1)
    padded = padded.view(m, groups, group_size)
    low = _float16_toward(padded.amin(-1), -math.inf)
    qmax = (1 << bits) - 1
    scale = _float16_toward((padded.amax(-1) - low.double()) / qmax, math.inf)
    if not (bool(torch.isfinite(low).all()) and bool(torch.isfinite(scale).all())):
        raise NumericalError(
            "a group of the weight spans more than float16 can hold; scale the layer down or "
            "quantize it with int8"
        )
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).double()
    codes = torch.round((padded - low.double()[..., None]) / divisor[..., None]).clamp_(0, qmax)
    codes = codes.reshape(m, -1)[:, :n]
    return LowBitWeight(pack_codes(codes, bits), scale, low, bits, group_size, (m, n))


@dataclass(frozen=True)
class CorrectedWeight:
    """``Q(W)`` and the correction ``A B`` (float64; ``None`` at rank 0), with how it was chosen.

    ``spectrum`` holds the singular values of the (weighted) residual; ``choice`` is the rule's
    verdict before any ``max_rank`` cap; ``rank`` is what was kept.
    """

    quantized: LowBitWeight
    A: torch.Tensor | None
    B: torch.Tensor | None
    rank: int
    choice: RankChoice
    spectrum: np.ndarray


def quantize_with_correction(
    weight: torch.Tensor,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    gram: Any = None,
    n_samples: int | None = None,
    whitening: Whitening | None = None,
    rule: str = "mp",
    max_rank: int | None = None,
    module: str | None = None,
) -> CorrectedWeight:
    """``Q(W)`` and the low-rank correction of ``W − Q(W)`` that stands above the noise edge.

    With ``gram`` (the input Gram ``Σ xᵀx``; ``n_samples`` its row count) the residual is
    weighted by the inputs, ``M = R S`` with ``S`` from
    :func:`~laserrmt.surgery.whiten.whitening_factor` (or ``whitening``, that factor computed
    once for several weights with the same inputs); without either, ``M = R``. A spectrum the
    rule cannot judge (``status`` not ``"ok"``: too short, or no noise bulk) gets no correction:
    nothing in it is known to stand out of noise.

    Only the spectrum and the kept directions are needed, so they come from one symmetric
    eigendecomposition of ``M Mᵀ`` or ``Mᵀ M`` (the smaller), not a full SVD: several times
    cheaper, exact for the leading directions; squaring costs only the precision of values
    below ``1e-8`` of the largest, far under any noise edge.

    Raises:
        InvalidOptionError: a rule outside :data:`CORRECTION_RULES`, a negative ``max_rank``,
            or as :func:`quantize_weight_lowbit` and
            :func:`~laserrmt.surgery.whiten.whitening_factor`.
        NumericalError: as :func:`~laserrmt.surgery.whiten.whitening_factor`.
    """
    if rule not in CORRECTION_RULES:
        raise InvalidOptionError(
            f"unknown correction rule {rule!r}; choose one of {', '.join(CORRECTION_RULES)}"
        )
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, numbers.Integral) or max_rank < 0
    ):
        raise InvalidOptionError(f"max_rank {max_rank!r} must be a non-negative integer")
    quantized = quantize_weight_lowbit(weight, bits, group_size)
    w = weight.detach().to(torch.float64)
    residual = w - quantized.dequantize(torch.float64).to(w.device)
    m, n = residual.shape
    if whitening is None and gram is not None:
        whitening = whitening_factor(gram, n_samples=n_samples, module=module)
    matrix = residual if whitening is None else residual @ whitening.S.to(residual.device)
    wide = m <= n
    square = matrix @ matrix.T if wide else matrix.T @ matrix
    try:
        eigenvalues, vectors = torch.linalg.eigh((square + square.T) / 2)
    except RuntimeError as exc:
        raise NumericalError(f"eigendecomposition of the residual failed: {exc}") from None
    values = eigenvalues.flip(0).clamp(min=0).sqrt()
    spectrum = values.cpu().numpy()
    choice = choose_rank(spectrum, (m, n), method=rule)
    rank = choice.rank if choice.status == "ok" else 0
    if max_rank is not None:
        rank = min(rank, int(max_rank))
    rank = min(rank, int(torch.count_nonzero(values > 0)))
    if rank == 0:
        return CorrectedWeight(quantized, None, None, 0, choice, spectrum)
    top = vectors.flip(1)[:, :rank]
    root = values[:rank].sqrt()
    if wide:  # M = U diag(s) Vh with U = top, Vh = Uᵀ M / s
        a = top * root
        b = (top.T @ matrix) / root[:, None]
    else:  # V = top, U = M V / s
        a = (matrix @ top) / root
        b = root[:, None] * top.T
    if whitening is not None:
        b = b @ whitening.S_inv.to(b.device)
    return CorrectedWeight(quantized, a, b, rank, choice, spectrum)


class _LowBitBase(CompressedModule):
    """The packed weight's buffers and bias, shared by both low-bit layers."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_low: torch.Tensor
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = _check_bits(bits)
        self.group_size = _check_group_size(group_size)
        self._dtype = dtype or torch.get_default_dtype()
        per, nbytes = _unit(self.bits)
        row = _groups(in_features, per) * nbytes
        groups = _groups(in_features, self.group_size)
        self.register_buffer(
            "weight_packed", torch.empty(out_features, row, dtype=torch.uint8, device=device)
        )
        for name in ("weight_scale", "weight_low"):
            self.register_buffer(
                name, torch.empty(out_features, groups, dtype=torch.float16, device=device)
            )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=self._dtype, device=device))
            if bias
            else None
        )

    def _fill(self, quantized: LowBitWeight, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.weight_packed.copy_(quantized.packed)
            self.weight_scale.copy_(quantized.scale)
            self.weight_low.copy_(quantized.low)
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias)

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the original layer; follows the bias through ``.to()``."""
        return self.bias.dtype if self.bias is not None else self._dtype

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Q(W)``, out × in, in ``dtype`` (the layer's own by default)."""
        return _dequantize(
            self.weight_packed,
            self.weight_scale,
            self.weight_low,
            self.bits,
            self.group_size,
            self.in_features,
            dtype or self.dtype,
        )

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "bias": self.bias is not None,
            "dtype": dtype_name(self.dtype),
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )


def _bias(linear: nn.Module) -> torch.Tensor | None:
    bias = linear.bias
    return bias if isinstance(bias, torch.Tensor) else None


def _check_linear(linear: nn.Module, name: str | None) -> None:
    if not isinstance(linear, nn.Linear | Conv1D):
        raise TargetSelectionError(
            f"module {name or type(linear).__name__} is a {type(linear).__name__}, not a "
            "linear layer; low-bit quantization supports nn.Linear and Conv1D"
        )


@register_module
class LowBitLinear(_LowBitBase):
    """``y = x Q(W)ᵀ + bias`` with ``Q(W)`` group-wise ``bits``-bit (module doc)."""

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        bits: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        *,
        name: str | None = None,
    ) -> LowBitLinear:
        """Quantize an ``nn.Linear`` or HF ``Conv1D`` (see :func:`quantize_weight_lowbit`)."""
        _check_linear(linear, name)
        matrix = weight_as_matrix(linear, name)
        return cls.from_quantized(quantize_weight_lowbit(matrix, bits, group_size), linear)

    @classmethod
    def from_quantized(cls, quantized: LowBitWeight, linear: nn.Module) -> LowBitLinear:
        """The layer for an already quantized weight, with ``linear``'s bias and dtype."""
        out_features, in_features = quantized.shape
        matrix = weight_as_matrix(linear)
        layer = cls(
            in_features,
            out_features,
            quantized.bits,
            quantized.group_size,
            bias=linear.bias is not None,
            device=matrix.device,
            dtype=matrix.dtype,
        )
        layer._fill(quantized, _bias(linear))
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> LowBitLinear:
        return cls(
            int(cfg["in_features"]),
            int(cfg["out_features"]),
            int(cfg["bits"]),
            int(cfg["group_size"]),
            bias=bool(cfg["bias"]),
            dtype=dtype_from_name(cfg["dtype"]),
        )


@register_module
class LowBitLowRankLinear(_LowBitBase):
    """``y = x (Q(W) + A B)ᵀ + bias``: a low-bit weight plus int8 factors of its correction.

    ``A`` (out × rank) and ``B`` (rank × in) are each int8 with one float32 scale per row, as in
    :class:`~laserrmt.surgery.quantize.Int8LowRankLinear`.
    """

    A_int8: torch.Tensor
    A_scale: torch.Tensor
    B_int8: torch.Tensor
    B_scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        rank: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, bits, group_size, bias, device=device, dtype=dtype
        )
        self.rank = rank
        for factor, (rows, cols) in (("A", (out_features, rank)), ("B", (rank, in_features))):
            self.register_buffer(
                f"{factor}_int8", torch.empty(rows, cols, dtype=torch.int8, device=device)
            )
            self.register_buffer(
                f"{factor}_scale", torch.empty(rows, dtype=torch.float32, device=device)
            )

    @classmethod
    def from_correction(cls, corrected: CorrectedWeight, linear: nn.Module) -> LowBitLowRankLinear:
        """The layer for :func:`quantize_with_correction`'s result (rank ≥ 1), ``linear``'s bias."""
        if corrected.A is None or corrected.B is None:
            raise InvalidOptionError(
                "the correction has rank 0; use LowBitLinear.from_quantized for it"
            )
        out_features, in_features = corrected.quantized.shape
        matrix = weight_as_matrix(linear)
        layer = cls(
            in_features,
            out_features,
            corrected.quantized.bits,
            corrected.rank,
            corrected.quantized.group_size,
            bias=linear.bias is not None,
            device=matrix.device,
            dtype=matrix.dtype,
        )
        layer._fill(corrected.quantized, _bias(linear))
        with torch.no_grad():
            for factor, value in (("A", corrected.A), ("B", corrected.B)):
                q, scale = quantize_weight_int8(value)
                getattr(layer, f"{factor}_int8").copy_(q)
                getattr(layer, f"{factor}_scale").copy_(scale)
        layer.train(linear.training)
        return layer

    def correction(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``A B`` as stored (int8 factors dequantized), out × in."""
        a = dequantize_weight_int8(self.A_int8, self.A_scale)
        b = dequantize_weight_int8(self.B_int8, self.B_scale)
        return (a @ b).to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = _int8_linear(x, self.B_int8, self.B_scale, None)
        y = _int8_linear(latent, self.A_int8, self.A_scale, None)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return y + F.linear(x, self.dequantized_weight(x.dtype), bias)

    def laserrmt_config(self) -> dict[str, Any]:
        return {**super().laserrmt_config(), "rank": self.rank}

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> LowBitLowRankLinear:
        return cls(
            int(cfg["in_features"]),
            int(cfg["out_features"]),
            int(cfg["bits"]),
            int(cfg["rank"]),
            int(cfg["group_size"]),
            bias=bool(cfg["bias"]),
            dtype=dtype_from_name(cfg["dtype"]),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


def max_correction_rank(shape: tuple[int, int], extra_bits: float | None) -> int | None:
    """The largest rank whose int8 factors cost about ``extra_bits`` bits per weight."""
    if extra_bits is None:
        return None
    m, n = shape
    return int(extra_bits * m * n / (8 * (m + n)))


def quantize_model_lowbit(
    model: nn.Module,
    bits: int,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    correct: bool = True,
    batches: Iterable[Any] | None = None,
    statistics: Mapping[str, Any] | None = None,
    rule: str = "mp",
    extra_bits: float | None = DEFAULT_EXTRA_BITS,
    module_names: Sequence[str] | None = None,
    whitenings: dict[str, Whitening] | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Replace linear layers by low-bit ones, in place; returns ``{name: correction rank}``.

    The layers are chosen as :func:`~laserrmt.surgery.quantize.quantize_model_int8` chooses
    them (heads left out unless named). Factorized layers (``LowRankLinear``) get int8 factors
    (:class:`~laserrmt.surgery.quantize.Int8LowRankLinear`, rank recorded as 0): their factors
    are small and already the low-rank part. Dense ones become :class:`LowBitLinear`, or with
    ``correct`` a :class:`LowBitLowRankLinear` where :func:`quantize_with_correction` finds a
    rank above the edge of ``rule``, capped at ``extra_bits`` bits per weight (``None``: no cap).

    The correction is weighted by each layer's input Gram: from ``statistics`` (``{name:``
    :class:`~laserrmt.stats.calibration.ActivationStatistics` ``}``) when given, else streamed
    block by block from ``batches`` (calibration windows) with
    :func:`~laserrmt.stats.calibration.iter_activation_statistics`, on the inputs of the model
    as it was; without either it uses the plain SVD of the residual. Layers that read the same
    input (query, key and value; gate and up) share one whitening factor. ``whitenings``, when
    given, is filled with each layer's factor and read back: pass the same dict to several calls
    on the same model and statistics (other bit widths) to factor each Gram once.

    Raises:
        InvalidOptionError: as :func:`quantize_with_correction`, or ``extra_bits`` ≤ 0.
        TargetSelectionError: as :func:`~laserrmt.surgery.quantize.quantize_model_int8`.
    """
    from laserrmt.stats.calibration import iter_activation_statistics

    bits, group_size = _check_bits(bits), _check_group_size(group_size)
    if rule not in CORRECTION_RULES:
        raise InvalidOptionError(
            f"unknown correction rule {rule!r}; choose one of {', '.join(CORRECTION_RULES)}"
        )
    if extra_bits is not None and not extra_bits > 0:
        raise InvalidOptionError(f"extra_bits {extra_bits!r} must be positive (bits per weight)")
    chosen = quantizable_modules(model, module_names)
    modules = dict(model.named_modules())
    dense = [name for name in chosen if not isinstance(modules[name], LowRankLinear)]
    replacements: dict[str, nn.Module] = {}
    ranks: dict[str, int] = {}
    factors = {} if whitenings is None else whitenings
    recent: list[tuple[torch.Tensor, Whitening]] = []

    def whitening_of(name: str, stats: Any) -> Whitening | None:
        if stats is None:
            return None
        if name not in factors:
            same = [
                w for g, w in recent if g.shape == stats.gram.shape and torch.equal(g, stats.gram)
            ]
            if same:
                factors[name] = same[0]
            else:
                factors[name] = whitening_factor(stats.gram, n_samples=stats.n_samples, module=name)
                recent.append((stats.gram, factors[name]))
                del recent[:-3]  # the inputs of one block: attention, its output, the MLP
        return factors[name]

    def replace_one(name: str, stats: Any) -> None:
        linear = modules[name]
        matrix = weight_as_matrix(linear, name)
        if not correct:
            layer: nn.Module = LowBitLinear.from_linear(linear, bits, group_size, name=name)
            ranks[name] = 0
        else:
            corrected = quantize_with_correction(
                matrix,
                bits,
                group_size,
                whitening=whitening_of(name, stats),
                rule=rule,
                max_rank=max_correction_rank((matrix.shape[0], matrix.shape[1]), extra_bits),
                module=name,
            )
            ranks[name] = corrected.rank
            layer = (
                LowBitLowRankLinear.from_correction(corrected, linear)
                if corrected.rank
                else LowBitLinear.from_quantized(corrected.quantized, linear)
            )
        replacements[name] = layer

    if correct and statistics is None and batches is not None and dense:
        for stats in iter_activation_statistics(model, batches, dense, progress=progress):
            replace_one(stats.module, stats)
            del stats  # not held through the next block's forward
    else:
        missing = [name for name in dense if statistics is not None and name not in statistics]
        if correct and missing:
            raise InvalidOptionError(
                f"no calibration statistics for {len(missing)} layers ({missing[0]}, ...); "
                "collect them for every quantized layer or pass batches instead"
            )
        for name in dense:
            replace_one(name, None if statistics is None else statistics.get(name))
    for name in chosen:
        if isinstance(modules[name], LowRankLinear):
            replacements[name] = Int8LowRankLinear.from_low_rank(modules[name])
            ranks[name] = 0
    for name in chosen:
        set_submodule(model, name, replacements[name])
    return {name: ranks[name] for name in chosen}
