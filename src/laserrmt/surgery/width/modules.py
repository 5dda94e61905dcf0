"""Registered layers of a new width, so that a width-cut model saves and loads back.

Every layer whose shape a cut changes is replaced by a registered subclass of its own type, so
:func:`laserrmt.surgery.io.save_compressed` records its shape and ``load`` rebuilds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from laserrmt.surgery.registry import CompressedModule, dtype_from_name, dtype_name, register_module

__all__ = ["ResizedBatchNorm2d", "ResizedConv2d", "ResizedLinear"]


@register_module
class ResizedLinear(nn.Linear, CompressedModule):
    """An ``nn.Linear`` whose width was changed by surgery (registered so it can be reloaded)."""

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": dtype_name(self.weight.dtype),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> ResizedLinear:
        return cls(
            int(cfg["in_features"]),
            int(cfg["out_features"]),
            bias=bool(cfg["bias"]),
            dtype=dtype_from_name(cfg["dtype"]),
        )


@register_module
class ResizedConv2d(nn.Conv2d, CompressedModule):
    """An ``nn.Conv2d`` with fewer input and/or output channels than the original."""

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
            "dtype": dtype_name(self.weight.dtype),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> ResizedConv2d:
        padding = cfg["padding"]
        return cls(
            int(cfg["in_channels"]),
            int(cfg["out_channels"]),
            tuple(cfg["kernel_size"]),
            stride=tuple(cfg["stride"]),
            padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(cfg["dilation"]),
            groups=int(cfg["groups"]),
            bias=bool(cfg["bias"]),
            padding_mode=cfg["padding_mode"],
            dtype=dtype_from_name(cfg["dtype"]),
        )


@register_module
class ResizedBatchNorm2d(nn.BatchNorm2d, CompressedModule):
    """An ``nn.BatchNorm2d`` over the channels a width cut kept."""

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "dtype": dtype_name(
                self.weight.dtype if self.weight is not None else self.running_mean.dtype
            ),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> ResizedBatchNorm2d:
        return cls(
            int(cfg["num_features"]),
            eps=float(cfg["eps"]),
            momentum=cfg["momentum"],
            affine=bool(cfg["affine"]),
            track_running_stats=bool(cfg["track_running_stats"]),
            dtype=dtype_from_name(cfg["dtype"]),
        )
