"""Weight-only int8 quantization: per-output-channel symmetric scales.

Each row ``W_i`` of an ``m × n`` (out × in) weight is stored as ``q_i = round(W_i / s_i)`` in
int8 with ``s_i = max_j |W_ij| / 127`` (float32), so ``|W_ij − s_i q_ij| ≤ s_i / 2``. The
activations stay in floating point (weight-only quantization, as in LLM.int8()'s storage
format without its outlier decomposition, Dettmers et al., NeurIPS 2022): the weights take
one byte each in a safetensors file and in memory.

The matrix product runs through ``torch._weight_int8pack_mm`` where that kernel is vectorized
and checked to be right: on x86 CPUs (AVX2 or AVX-512) for bfloat16 inputs, on aarch64 for
float32, bfloat16 and float16, on other devices wherever it runs. It also needs the input
dimension to be a multiple of 16 (the kernels have no remainder loop). Everywhere else the
product is ``F.linear`` with the int8 codes cast to the input's dtype, scaled per output:
float32 inputs on x86 take this route, since ATen's float32 int8 kernel there is a scalar loop
10 to 40 times slower than ``F.linear``. The op has no derivative, so a forward that needs
gradients with respect to the input takes the dequantized route too. ``extra_repr`` and the
``kernel`` property say which route the module's own device and dtype take.

A :class:`~laserrmt.surgery.lowrank.LowRankLinear` is quantized factor by factor: its
``B`` (k × in) and ``A`` (out × k) are two linear maps, each quantized per output channel, in
an :class:`Int8LowRankLinear`. Convolutions are left in floating point.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from laserrmt.errors import NumericalError, TargetSelectionError
from laserrmt.models.architectures import is_embedding_or_head
from laserrmt.surgery.lowrank import LowRankLinear, weight_as_matrix
from laserrmt.surgery.registry import CompressedModule, dtype_from_name, dtype_name, register_module

Kernel = Literal["int8pack_mm", "dequantize"]

__all__ = [
    "Int8Linear",
    "Int8LowRankLinear",
    "Kernel",
    "dequantize_weight_int8",
    "int8_matrix_bytes",
    "int8pack_mm_available",
    "is_quantizable",
    "quantizable_modules",
    "quantize_model_int8",
    "quantize_weight_int8",
]

_QMAX = 127


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of an ``m × n`` (out × in) matrix.

    Returns ``(q, scale)``: ``q`` int8 ``m × n`` in ``[-127, 127]`` and ``scale`` float32 ``m``
    with ``scale_i = max_j |W_ij| / 127``. Rows of zeros get scale 0 and codes 0. The rounding
    is done in float64, so ``|W − q · scale| ≤ scale / 2`` up to the float32 rounding of scale.

    Raises:
        NumericalError: the matrix holds NaN or Inf.
        ValueError: the tensor is not 2-D.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected an m × n matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise NumericalError(
            "the weight to quantize contains NaN or Inf; check the checkpoint or the dtype"
        )
    scale = (w.abs().amax(dim=1) / _QMAX).to(torch.float32)
    # Divide by the float32 scale actually stored, so the error bound holds for what is saved.
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float64)
    q = torch.round(w / divisor[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scale


def dequantize_weight_int8(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q · scale`` row by row, computed in float32 and returned in ``dtype``."""
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


# The vectorized ATen kernels step through the input dimension 8 (AVX2, NEON) or 16 (AVX-512)
# values at a time with aligned loads and no remainder loop; other shapes read out of bounds.
_KERNEL_K_MULTIPLE = 16
_KERNEL_ALIGNMENT = 64  # bytes; what PyTorch's CPU allocator gives every fresh tensor


def _vectorized_on(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ATen has a vectorized ``_weight_int8pack_mm`` for this input dtype there.

    On x86 only the bfloat16 kernel is vectorized (AVX2 and AVX-512); float32 and float16 run
    a scalar loop that is 10 to 40 times slower than a float32 ``F.linear``. aarch64 has NEON
    kernels for all three. Other devices are trusted once the probe has passed.
    """
    if device_type != "cpu":
        return True
    if platform.machine().lower() in ("arm64", "aarch64"):
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    capability = torch.backends.cpu.get_cpu_capability()
    return dtype == torch.bfloat16 and capability in ("AVX2", "AVX512")


@cache
def int8pack_mm_available(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``torch._weight_int8pack_mm`` is fast and right for inputs of ``dtype`` there.

    Fast: a vectorized kernel exists (see the module docstring). Right: probed once per
    (device type, dtype) on a small product against the dequantized reference, so a build
    that lacks the op or computes it wrongly is never used.
    """
    op = getattr(torch, "_weight_int8pack_mm", None)
    if op is None or not _vectorized_on(device_type, dtype):
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4 * _KERNEL_K_MULTIPLE, generator=generator)
    q = torch.randint(-_QMAX, _QMAX + 1, (23, x.shape[1]), generator=generator, dtype=torch.int8)
    scale = torch.rand(23, generator=generator) / _QMAX
    try:
        device = torch.device(device_type)
        got = op(x.to(device, dtype), q.to(device), scale.to(device, dtype))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    expected = x.to(dtype).float() @ dequantize_weight_int8(q, scale.to(dtype)).T
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    return bool(torch.allclose(got.float().cpu(), expected, rtol=tolerance, atol=tolerance))


def _kernel_for(x: torch.Tensor, q: torch.Tensor) -> Kernel:
    """The route of one product; the kernel only where it is fast and its preconditions hold."""
    if torch.is_grad_enabled() and x.requires_grad:
        return "dequantize"  # the int8 op has no derivative
    if not int8pack_mm_available(x.device.type, x.dtype):
        return "dequantize"
    if q.shape[1] % _KERNEL_K_MULTIPLE or not q.is_contiguous():
        return "dequantize"
    if q.device.type == "cpu" and q.data_ptr() % _KERNEL_ALIGNMENT:
        return "dequantize"  # e.g. a buffer memory-mapped from a file at an odd offset
    return "int8pack_mm"


def _int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (q · scale)ᵀ + bias`` for ``x`` of shape ``[*, n]``, in ``x``'s dtype."""
    if _kernel_for(x, q) == "int8pack_mm":
        flat = x.reshape(-1, x.shape[-1])
        if not flat.is_contiguous() or flat.data_ptr() % _KERNEL_ALIGNMENT:
            flat = flat.clone(memory_format=torch.contiguous_format)  # fresh, hence aligned
        y = torch._weight_int8pack_mm(flat, q, scale.to(x.dtype))
        y = y.reshape(*x.shape[:-1], q.shape[0])
    else:
        # int8 codes are exact in every float dtype; scaling the m outputs instead of the
        # m × n weight saves a pass over the matrix.
        y = F.linear(x, q.to(x.dtype))
        y = (y.to(torch.promote_types(x.dtype, torch.float32)) * scale).to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def _module_kernel(q: torch.Tensor, dtype: torch.dtype) -> Kernel:
    probe = torch.empty(0, device=q.device, dtype=dtype)
    with torch.no_grad():
        return _kernel_for(probe, q)


@register_module
class Int8Linear(CompressedModule):
    """A linear layer with int8 weights and one float32 scale per output channel.

    ``y = x (q · scale)ᵀ + bias``. ``weight_int8`` and ``weight_scale`` are buffers (int8
    weights are not trained), so the state dict holds one byte per weight. ``dtype`` is the
    floating-point type of the original layer (and of the bias); inputs of any float dtype
    are accepted. Built with :meth:`from_linear`; the constructor leaves the buffers
    uninitialised (they are filled when a saved model is loaded).
    """

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._dtype = dtype or torch.get_default_dtype()
        self.register_buffer(
            "weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.empty(out_features, dtype=torch.float32, device=device)
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=self._dtype, device=device))
            if bias
            else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Module, *, name: str | None = None) -> Int8Linear:
        """Quantize an ``nn.Linear`` or HF ``Conv1D`` (see :func:`quantize_weight_int8`)."""
        if not isinstance(linear, nn.Linear | Conv1D):
            raise TargetSelectionError(
                f"module {name or type(linear).__name__} is a {type(linear).__name__}, not a "
                "linear layer; int8 quantization supports nn.Linear and Conv1D"
            )
        matrix = weight_as_matrix(linear, name)
        q, scale = quantize_weight_int8(matrix)
        out_features, in_features = matrix.shape
        layer = cls(
            in_features,
            out_features,
            bias=linear.bias is not None,
            device=matrix.device,
            dtype=matrix.dtype,
        )
        with torch.no_grad():
            layer.weight_int8.copy_(q)
            layer.weight_scale.copy_(scale)
            if layer.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.train(linear.training)
        return layer

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the original layer; follows the bias through ``.to()``."""
        return self.bias.dtype if self.bias is not None else self._dtype

    @property
    def kernel(self) -> Kernel:
        """The route an input of the layer's own dtype and device takes (without autograd)."""
        return _module_kernel(self.weight_int8, self.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The out × in weight this layer applies, in its floating-point dtype."""
        return dequantize_weight_int8(self.weight_int8, self.weight_scale, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _int8_linear(x, self.weight_int8, self.weight_scale, self.bias)

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": dtype_name(self.dtype),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> Int8Linear:
        return cls(
            int(cfg["in_features"]),
            int(cfg["out_features"]),
            bias=bool(cfg["bias"]),
            dtype=dtype_from_name(cfg["dtype"]),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={dtype_name(self.dtype)}, kernel={self.kernel}"
        )


@register_module
class Int8LowRankLinear(CompressedModule):
    """A factorized linear layer ``y = A (B x) + bias`` with both factors in int8.

    ``B`` (k × in) and ``A`` (out × k) are each quantized per output channel: ``B`` has one
    scale per latent channel, ``A`` one per output channel. Built with :meth:`from_low_rank`.
    """

    A_int8: torch.Tensor
    A_scale: torch.Tensor
    B_int8: torch.Tensor
    B_scale: torch.Tensor
    bias: nn.Parameter | None

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
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self._dtype = dtype or torch.get_default_dtype()
        for factor, (rows, cols) in (("A", (out_features, rank)), ("B", (rank, in_features))):
            self.register_buffer(
                f"{factor}_int8", torch.empty(rows, cols, dtype=torch.int8, device=device)
            )
            self.register_buffer(
                f"{factor}_scale", torch.empty(rows, dtype=torch.float32, device=device)
            )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=self._dtype, device=device))
            if bias
            else None
        )

    @classmethod
    def from_low_rank(cls, layer: LowRankLinear) -> Int8LowRankLinear:
        """Quantize both factors of a :class:`~laserrmt.surgery.lowrank.LowRankLinear`."""
        quantized = cls(
            layer.in_features,
            layer.out_features,
            layer.rank,
            bias=layer.bias is not None,
            device=layer.A.device,
            dtype=layer.A.dtype,
        )
        with torch.no_grad():
            for factor in ("A", "B"):
                q, scale = quantize_weight_int8(getattr(layer, factor))
                getattr(quantized, f"{factor}_int8").copy_(q)
                getattr(quantized, f"{factor}_scale").copy_(scale)
            if quantized.bias is not None and layer.bias is not None:
                quantized.bias.copy_(layer.bias)
        quantized.train(layer.training)
        return quantized

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the original layer; follows the bias through ``.to()``."""
        return self.bias.dtype if self.bias is not None else self._dtype

    @property
    def kernel(self) -> Kernel:
        """The route an input of the layer's own dtype and device takes (without autograd)."""
        return _module_kernel(self.A_int8, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = _int8_linear(x, self.B_int8, self.B_scale, None)
        return _int8_linear(latent, self.A_int8, self.A_scale, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The equivalent out × in weight ``deq(A) @ deq(B)``, in the layer's dtype."""
        a = dequantize_weight_int8(self.A_int8, self.A_scale)
        b = dequantize_weight_int8(self.B_int8, self.B_scale)
        return (a @ b).to(self.dtype)

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
            "dtype": dtype_name(self.dtype),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> Int8LowRankLinear:
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
            f"rank={self.rank}, bias={self.bias is not None}, dtype={dtype_name(self.dtype)}, "
            f"kernel={self.kernel}"
        )


def is_quantizable(module: nn.Module) -> bool:
    """Whether :func:`quantize_model_int8` can quantize the module (linear maps only)."""
    return isinstance(module, nn.Linear | Conv1D | LowRankLinear)


def int8_matrix_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one quantized ``out × in`` matrix: int8 codes and a float32 scale per row."""
    return out_features * in_features + 4 * out_features


def _quantize_module(name: str, module: nn.Module) -> nn.Module:
    if isinstance(module, LowRankLinear):
        return Int8LowRankLinear.from_low_rank(module)
    return Int8Linear.from_linear(module, name=name)


def quantizable_modules(model: nn.Module, module_names: Sequence[str] | None = None) -> list[str]:
    """The names :func:`quantize_model_int8` (and the low-bit quantization) replace, in model
    order: every ``nn.Linear``, HF ``Conv1D`` and ``LowRankLinear`` but embeddings and output
    heads when ``module_names`` is ``None``, else the named modules, checked.

    Raises:
        TargetSelectionError: as :func:`quantize_model_int8`.
    """
    modules = dict(model.named_modules())
    if module_names is None:
        chosen = [
            name
            for name, module in modules.items()
            if is_quantizable(module) and not is_embedding_or_head(name, module, model)
        ]
    else:
        if isinstance(module_names, str):
            raise TargetSelectionError(
                "module_names is one string; pass a list of full module names"
            )
        chosen = list(dict.fromkeys(module_names))
        for name in chosen:
            if name not in modules:
                raise TargetSelectionError(
                    f"no module named {name!r} in {type(model).__name__}; use the full dotted "
                    "names of model.named_modules()"
                )
            if not is_quantizable(modules[name]):
                raise TargetSelectionError(
                    f"module {name} is a {type(modules[name]).__name__}; quantization "
                    "supports nn.Linear, Conv1D and LowRankLinear"
                )
    if "" in chosen:
        raise TargetSelectionError(
            "the model itself is a linear layer and cannot be replaced in place; "
            "wrap it in an nn.Sequential"
        )
    order = {name: i for i, name in enumerate(modules)}
    chosen.sort(key=order.__getitem__)
    return chosen


def quantize_model_int8(model: nn.Module, module_names: Sequence[str] | None = None) -> list[str]:
    """Replace linear layers by int8 ones, in place; returns the names replaced, in model order.

    With ``module_names=None`` every ``nn.Linear``, HF ``Conv1D`` and ``LowRankLinear`` is
    quantized except embeddings and output heads (``lm_head``, classifiers, layers tied to an
    input embedding; see :func:`~laserrmt.models.architectures.is_embedding_or_head`), since
    every logit reads through a head. Naming a head quantizes it; a head tied to the input
    embedding is then untied (the embedding stays in floating point).

    Raises:
        TargetSelectionError: a name that is not a module, or a module that is not a linear
            layer (embeddings, convolutions and already-quantized layers are refused).
    """
    chosen = quantizable_modules(model, module_names)
    modules = dict(model.named_modules())
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantize_module(name, modules[name]))
    return chosen
