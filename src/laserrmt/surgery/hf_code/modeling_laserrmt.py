"""Load a folder compressed by laserrmt with transformers' Auto classes (needs only transformers).

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` (or the Auto class of
the saved architecture) reaches :meth:`LaserRMTModel.from_pretrained`, which builds the base
architecture with transformers' own class (``architectures`` in ``config.json``), replaces the
modules listed under ``laserrmt_modules`` by the layers below, and lets transformers read the
weights into them. The layers compute what laserrmt's own do, with the same parameter and
buffer names: factorized ``y = A (B x) + b`` (plus ``S x`` with a CSR matrix ``S`` for low rank
plus sparse), int8 weights with one float32 scale per output channel (dequantized in the
input's dtype), group-wise 2- to 8-bit weights with float16 scales and offsets (with or without
an int8 low-rank correction), layers of a new width, and BERT self-attention with narrower
heads.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from .configuration_laserrmt import BASE_MODEL_TYPE_KEY, LaserRMTConfig


class LowRankLinear(nn.Module):
    """``y = A (B x) + bias`` with ``A`` out × rank and ``B`` rank × in."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(out_features, rank))
        self.B = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)


class LowRankSparseLinear(nn.Module):
    """``y = A (B x) + S x + bias`` with ``S`` stored in CSR form: values, int32 column indices
    and int32 row pointers (the product in at least float32, as CPU CSR kernels require)."""

    S_crow_indices: torch.Tensor
    S_col_indices: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, rank: int, nnz: int, bias: bool = True
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.A = nn.Parameter(torch.empty(out_features, rank))
        self.B = nn.Parameter(torch.empty(rank, in_features))
        self.S_values = nn.Parameter(torch.empty(nnz))
        self.register_buffer("S_crow_indices", torch.empty(out_features + 1, dtype=torch.int32))
        self.register_buffer("S_col_indices", torch.empty(nnz, dtype=torch.int32))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(x, self.B), self.A, self.bias)
        dtype = torch.promote_types(self.S_values.dtype, torch.float32)
        with warnings.catch_warnings():  # torch calls CSR "beta"; build and product are stable
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            sparse = torch.sparse_csr_tensor(
                self.S_crow_indices,
                self.S_col_indices,
                self.S_values.to(dtype),
                (self.out_features, self.in_features),
                check_invariants=False,
            )
        product = (sparse @ x.reshape(-1, self.in_features).to(dtype).T).T
        return y + product.reshape(*x.shape[:-1], self.out_features).to(y.dtype)


def _conv_geometry(cfg: dict[str, Any]) -> dict[str, Any]:
    padding = cfg["padding"]
    return {
        "kernel_size": tuple(cfg["kernel_size"]),
        "stride": tuple(cfg["stride"]),
        "padding": padding if isinstance(padding, str) else tuple(padding),
        "dilation": tuple(cfg["dilation"]),
        "padding_mode": cfg["padding_mode"],
    }


class _LowRankConv(nn.Module):
    """A rank-channel convolution with the original kernel, then a 1-wide one to the outputs."""

    conv: type[nn.Conv1d] | type[nn.Conv2d]

    def __init__(self, **cfg: Any) -> None:
        super().__init__()
        rank = int(cfg["rank"])
        self.reduce = self.conv(int(cfg["in_channels"]), rank, bias=False, **_conv_geometry(cfg))
        self.expand = self.conv(rank, int(cfg["out_channels"]), 1, bias=bool(cfg["bias"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))


class LowRankConv1d(_LowRankConv):
    conv = nn.Conv1d


class LowRankConv2d(_LowRankConv):
    conv = nn.Conv2d


def _int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x (q · scale)ᵀ + bias``: the codes are exact in every float dtype, so they are cast and
    the scale multiplies the outputs (at least in float32)."""
    y = F.linear(x, q.to(x.dtype))
    y = (y.to(torch.promote_types(x.dtype, torch.float32)) * scale).to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


class Int8Linear(nn.Module):
    """int8 weights ``weight_int8`` (out × in) with float32 ``weight_scale`` per output."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.register_buffer(
            "weight_int8", torch.empty(out_features, in_features, dtype=torch.int8)
        )
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _int8_linear(x, self.weight_int8, self.weight_scale, self.bias)


class Int8LowRankLinear(nn.Module):
    """A factorized linear layer with both factors in int8, each scaled per output channel."""

    A_int8: torch.Tensor
    A_scale: torch.Tensor
    B_int8: torch.Tensor
    B_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        for factor, (rows, cols) in (("A", (out_features, rank)), ("B", (rank, in_features))):
            self.register_buffer(f"{factor}_int8", torch.empty(rows, cols, dtype=torch.int8))
            self.register_buffer(f"{factor}_scale", torch.empty(rows, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = _int8_linear(x, self.B_int8, self.B_scale, None)
        return _int8_linear(latent, self.A_int8, self.A_scale, self.bias)


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of each row: ``lcm(bits, 8) / bits`` codes per
    ``lcm(bits, 8) / 8`` bytes, lowest bits first."""
    unit = math.lcm(bits, 8)
    per, nbytes = unit // bits, unit // 8
    byte_shifts = torch.arange(nbytes, device=packed.device) * 8
    words = (packed.to(torch.int64).view(packed.shape[0], -1, nbytes) << byte_shifts).sum(-1)
    codes = (words[..., None] >> (torch.arange(per, device=packed.device) * bits)) & (
        (1 << bits) - 1
    )
    return codes.reshape(packed.shape[0], -1)[:, :n]


class LowBitLinear(nn.Module):
    """Group-wise ``bits``-bit codes (packed) with float16 ``scale`` and ``low`` per group of
    ``group_size`` inputs: ``W = low + code · scale``, dequantized for each product."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_low: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True
    ) -> None:
        super().__init__()
        self.in_features, self.bits, self.group_size = in_features, bits, group_size
        unit = math.lcm(bits, 8)
        row = -(-in_features // (unit // bits)) * (unit // 8)
        groups = -(-in_features // group_size)
        self.register_buffer("weight_packed", torch.empty(out_features, row, dtype=torch.uint8))
        for name in ("weight_scale", "weight_low"):
            self.register_buffer(name, torch.empty(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        codes = _unpack(self.weight_packed, self.bits, self.in_features).float()
        m, groups = self.weight_scale.shape
        full = torch.zeros(m, groups * self.group_size, device=codes.device)
        full[:, : self.in_features] = codes
        scale, low = self.weight_scale.float()[..., None], self.weight_low.float()[..., None]
        values = low + full.view(m, groups, self.group_size) * scale
        return values.reshape(m, -1)[:, : self.in_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)


class LowBitLowRankLinear(LowBitLinear):
    """:class:`LowBitLinear` plus a correction ``A B`` with int8 factors scaled per row."""

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
        group_size: int,
        bias: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bits, group_size, bias)
        for factor, (rows, cols) in (("A", (out_features, rank)), ("B", (rank, in_features))):
            self.register_buffer(f"{factor}_int8", torch.empty(rows, cols, dtype=torch.int8))
            self.register_buffer(f"{factor}_scale", torch.empty(rows, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = _int8_linear(x, self.B_int8, self.B_scale, None)
        return _int8_linear(latent, self.A_int8, self.A_scale, None) + super().forward(x)


class ReducedSelfAttention(nn.Module):
    """BERT self-attention whose query/key and value heads are narrower than the original.

    The softmax scale stays the original ``1/sqrt(head_dim)`` (``scaling``); encoder attention
    only (no key/value cache).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        qk_head_size: int,
        v_head_size: int,
        scaling: float,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_attention_heads = num_heads
        self.qk_head_size = qk_head_size
        self.v_head_size = v_head_size
        self.scaling = scaling
        self.dropout_p = dropout
        self.query = nn.Linear(hidden_size, num_heads * qk_head_size, bias=bias)
        self.key = nn.Linear(hidden_size, num_heads * qk_head_size, bias=bias)
        self.value = nn.Linear(hidden_size, num_heads * v_head_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if past_key_values is not None or cache is not None:
            raise ValueError("this encoder attention keeps no key/value cache; run without one")
        shape = hidden_states.shape[:-1]
        heads = self.num_attention_heads

        def split(x: torch.Tensor, size: int) -> torch.Tensor:
            return x.view(*shape, heads, size).transpose(-3, -2)

        q = split(self.query(hidden_states), self.qk_head_size)
        k = split(self.key(hidden_states), self.qk_head_size)
        v = split(self.value(hidden_states), self.v_head_size)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.scaling,
        )
        return out.transpose(-3, -2).reshape(*shape, heads * self.v_head_size), None


def _build(type_name: str, cfg: dict[str, Any]) -> nn.Module:
    """An uninitialised layer of laserrmt's type ``type_name`` with the shapes ``cfg`` gives;
    floating-point tensors take the dtype transformers is loading in."""
    if type_name == "LowRankLinear":
        return LowRankLinear(cfg["in_features"], cfg["out_features"], cfg["rank"], cfg["bias"])
    if type_name == "LowRankSparseLinear":
        return LowRankSparseLinear(
            cfg["in_features"], cfg["out_features"], cfg["rank"], cfg["nnz"], cfg["bias"]
        )
    if type_name == "Int8LowRankLinear":
        return Int8LowRankLinear(cfg["in_features"], cfg["out_features"], cfg["rank"], cfg["bias"])
    if type_name == "Int8Linear":
        return Int8Linear(cfg["in_features"], cfg["out_features"], bias=cfg["bias"])
    if type_name == "LowBitLinear":
        return LowBitLinear(
            cfg["in_features"], cfg["out_features"], cfg["bits"], cfg["group_size"], cfg["bias"]
        )
    if type_name == "LowBitLowRankLinear":
        return LowBitLowRankLinear(
            cfg["in_features"],
            cfg["out_features"],
            cfg["bits"],
            cfg["rank"],
            cfg["group_size"],
            cfg["bias"],
        )
    if type_name == "ResizedLinear":
        return nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg["bias"])
    if type_name in ("LowRankConv1d", "LowRankConv2d"):
        return (LowRankConv1d if type_name == "LowRankConv1d" else LowRankConv2d)(**cfg)
    if type_name == "ResizedConv2d":
        geometry = _conv_geometry(cfg)
        return nn.Conv2d(
            cfg["in_channels"],
            cfg["out_channels"],
            groups=cfg["groups"],
            bias=cfg["bias"],
            **geometry,
        )
    if type_name == "ResizedBatchNorm2d":
        return nn.BatchNorm2d(
            cfg["num_features"],
            eps=cfg["eps"],
            momentum=cfg["momentum"],
            affine=cfg["affine"],
            track_running_stats=cfg["track_running_stats"],
        )
    if type_name == "ReducedSelfAttention":
        return ReducedSelfAttention(
            cfg["hidden_size"],
            cfg["num_heads"],
            cfg["qk_head_size"],
            cfg["v_head_size"],
            cfg["scaling"],
            dropout=cfg["dropout"],
            bias=cfg["bias"],
        )
    raise ValueError(
        f"compressed layer type {type_name!r} in config.json is unknown to this folder's "
        "modeling_laserrmt.py; load the folder with the laserrmt that wrote it (laserrmt.load)"
    )


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@cache
def _compressed_class(architecture: str) -> Any:
    """A subclass of transformers' ``architecture`` that swaps in the compressed layers."""
    base = getattr(transformers, architecture, None)
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)):
        raise ValueError(
            f"architecture {architecture!r} in config.json is not a model class of transformers "
            f"{transformers.__version__}; upgrade transformers"
        )

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        for name, entry in config.laserrmt_modules.items():
            _replace(self, name, _build(entry["type"], entry["config"]))
        # A tie whose parameter a compressed layer replaced (a quantized head) no longer exists;
        # transformers 5 would look for it when tying.
        ties = getattr(self, "all_tied_weights_keys", None)
        if ties:
            names = {n for n, _ in self.named_parameters(remove_duplicate=False)}
            self.all_tied_weights_keys = {t: s for t, s in ties.items() if {t, s} <= names}

    def save_pretrained(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """Save as transformers does, then mark the folder as this one was marked."""
        base.save_pretrained(self, save_directory, *args, **kwargs)
        folder = Path(save_directory)
        file = folder / "config.json"
        data = json.loads(file.read_text(encoding="utf-8"))
        data[BASE_MODEL_TYPE_KEY] = data["model_type"]
        data["model_type"] = LaserRMTConfig.model_type
        file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        here = Path(__file__).parent
        for code in ("configuration_laserrmt.py", "modeling_laserrmt.py"):
            shutil.copyfile(here / code, folder / code)

    return type(
        architecture,
        (base,),
        {"__init__": __init__, "save_pretrained": save_pretrained, "__module__": __name__},
    )


class LaserRMTModel(transformers.PreTrainedModel):
    """The entry every Auto class of the folder's ``auto_map`` names; only loads."""

    config_class = LaserRMTConfig

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Any, *args: Any, config: Any = None, **kwargs: Any
    ) -> Any:
        """The base architecture with the compressed layers, its weights read by transformers."""
        if config is None:
            config = LaserRMTConfig.from_pretrained(pretrained_model_name_or_path)
        base_config = config.base_config()
        model_class = _compressed_class(base_config.architectures[0])
        return model_class.from_pretrained(
            pretrained_model_name_or_path, *args, config=base_config, **kwargs
        )
