"""What both export formats share: the float layers that stand in for compressed ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from laserrmt.surgery.lowrank import LowRankLinear
from laserrmt.surgery.quantize import Int8Linear, Int8LowRankLinear, dequantize_weight_int8
from laserrmt.surgery.replace import set_submodule

#: Largest graph or folder written as one file; protobuf cannot hold more than 2 GiB.
SINGLE_FILE_LIMIT = 2 * 1024**3 - 64 * 1024**2


def dequantize_int8_layers(model: nn.Module) -> list[str]:
    """Replace int8 layers by float ones that compute the same dequantized product, in place.

    ``Int8Linear`` becomes an ``nn.Linear`` with weight ``q · scale``; ``Int8LowRankLinear`` a
    ``LowRankLinear`` with both factors dequantized, so it stays two products; both in the
    layer's floating-point dtype. Returns the names.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Linear):
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                dtype=module.dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            set_submodule(model, name, linear.eval())
            replaced.append(name)
        elif isinstance(module, Int8LowRankLinear):
            low_rank = LowRankLinear(
                module.in_features,
                module.out_features,
                module.rank,
                bias=module.bias is not None,
                dtype=module.dtype,
            )
            with torch.no_grad():
                low_rank.A.copy_(dequantize_weight_int8(module.A_int8, module.A_scale))
                low_rank.B.copy_(dequantize_weight_int8(module.B_int8, module.B_scale))
                if module.bias is not None and low_rank.bias is not None:
                    low_rank.bias.copy_(module.bias)
            set_submodule(model, name, low_rank.eval())
            replaced.append(name)
    return replaced


def write_report(folder: Path, report: dict[str, Any]) -> None:
    text = json.dumps(report, indent=2, ensure_ascii=False)
    (folder / "export.json").write_text(text + "\n", encoding="utf-8")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
