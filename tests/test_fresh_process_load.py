"""A saved folder loads in a fresh Python process that imported nothing but laserrmt.

Every registered compressed module type appears in one of the folders built here; a child
process (``sys.executable``, nothing imported beforehand) loads each folder and runs it, and its
outputs must equal the parent's. This module imports no part of laserrmt at the top, so that the
child can import its builders without registering anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tiny_models import tiny_bert, tiny_llama

TESTS = Path(__file__).resolve().parent
IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 1, 8]])


class ConvNet(nn.Module):
    """Conv2d → BatchNorm2d → ReLU → Conv2d → ReLU → Conv2d → Linear, for 1×8×8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv0(x)))
        x = torch.relu(self.conv1(x))
        return self.head(self.conv2(x).flatten(1))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 12, 3)
        self.head = nn.Linear(12 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    for field in ("logits", "last_hidden_state"):
        if hasattr(out, field):
            return getattr(out, field)
    return out


def compressed_types(model: nn.Module) -> list[str]:
    from laserrmt.surgery.registry import CompressedModule

    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, CompressedModule)})


def _child_env(*paths: Path) -> dict[str, str]:
    """The environment for a child that imports the same laserrmt as this process."""
    import laserrmt

    package_root = Path(laserrmt.__file__).resolve().parent.parent
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(package_root), *map(str, paths), *inherited]),
    }


def _registered(name: str) -> Any:
    import laserrmt.surgery.width  # noqa: F401 - the parent may import it; the child must not
    from laserrmt.surgery.registry import registered_modules

    return registered_modules()[name]


def _llama() -> nn.Module:
    """Low-rank, int8, int8 low-rank, low rank plus sparse, 3-bit, 2-bit with a correction and one
    MLP cut from 128 to 96 units (resized layers)."""
    from laserrmt.surgery.lowrank import LowRankLinear
    from laserrmt.surgery.quantize import Int8Linear, Int8LowRankLinear

    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    attention.q_proj = LowRankLinear.from_linear(attention.q_proj, 8)
    attention.k_proj = Int8Linear.from_linear(attention.k_proj)
    attention.v_proj = Int8LowRankLinear.from_low_rank(
        LowRankLinear.from_linear(attention.v_proj, 4)
    )
    attention.o_proj = _registered("LowRankSparseLinear").from_linear(attention.o_proj, 6, 50)
    from laserrmt.surgery.lowbit import quantize_with_correction

    block = model.model.layers[1].self_attn
    block.q_proj = _registered("LowBitLinear").from_linear(block.q_proj, 3, 32)
    corrected = quantize_with_correction(block.k_proj.weight.detach(), 2, 32, max_rank=3)
    assert corrected.rank >= 1  # 2-bit rounding of this seeded weight leaves spikes to correct
    block.k_proj = _registered("LowBitLowRankLinear").from_correction(corrected, block.k_proj)
    resized = _registered("ResizedLinear")
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        for name, rows, cols in (("gate_proj", 96, 64), ("up_proj", 96, 64), ("down_proj", 64, 96)):
            layer = resized(cols, rows, bias=False)
            layer.weight.copy_(getattr(mlp, name).weight[:rows, :cols])
            setattr(mlp, name, layer)
    return model


def _bert() -> nn.Module:
    """Block 0's attention with narrower query/key (6) and value (5) heads than 8."""
    model = tiny_bert()
    attention = model.encoder.layer[0].attention
    torch.manual_seed(1)
    attention.self = _registered("ReducedSelfAttention")(32, 4, 6, 5, 8**-0.5).eval()
    attention.output.dense = _registered("ResizedLinear")(4 * 5, 32)
    return model


def _conv_net() -> nn.Module:
    """conv0 cut from 8 to 5 channels (with its batch norm and conv1's inputs), conv2 low-rank."""
    from laserrmt.surgery.lowrank import LowRankConv2d

    torch.manual_seed(2)
    model = ConvNet()
    model.conv0 = _registered("ResizedConv2d")(1, 5, 3, padding=1)
    model.bn = _registered("ResizedBatchNorm2d")(5)
    with torch.no_grad():  # statistics that differ from a fresh layer's
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 2)
    model.conv1 = _registered("ResizedConv2d")(5, 8, 3, padding=1)
    model.conv2 = LowRankConv2d.from_conv(model.conv2, 3)
    return model.eval()


def _conv1d_net() -> nn.Module:
    from laserrmt.surgery.lowrank import LowRankConv1d

    torch.manual_seed(3)
    model = Conv1dNet()
    model.conv = LowRankConv1d.from_conv(model.conv, 2)
    return model.eval()


_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    import test_fresh_process_load as t
    import laserrmt
    from laserrmt.surgery.io import load_into

    assert "laserrmt.surgery.width" not in sys.modules, "the child must start without it"
    cases = json.loads(sys.argv[1])
    results = {}
    for name, case in cases.items():
        if case["builder"] is None:
            model, _ = laserrmt.load(case["folder"])
        else:
            model = load_into(getattr(t, case["builder"])(), case["folder"]).eval()
        x = torch.load(case["input"])
        results[name] = {"output": t.run(model, x), "types": t.compressed_types(model)}
    torch.save(results, sys.argv[2])
    """
)


@pytest.mark.slow
def test_every_registered_type_loads_in_a_fresh_process(tmp_path):
    from laserrmt.surgery.io import save_compressed
    from laserrmt.surgery.registry import registered_modules

    builds = {
        # name: (compressed model, uncompressed builder for load_into or None, input)
        "llama": (_llama(), None, IDS),
        "bert": (_bert(), None, IDS),
        "conv2d": (_conv_net(), "ConvNet", torch.randn(2, 1, 8, 8)),
        "conv1d": (_conv1d_net(), "Conv1dNet", torch.randn(2, 4, 8)),
    }
    cases, expected, types = {}, {}, set()
    for name, (model, builder, x) in builds.items():
        folder = save_compressed(model, tmp_path / name)
        torch.save(x, tmp_path / f"{name}.pt")
        cases[name] = {
            "folder": str(folder),
            "builder": builder,
            "input": str(tmp_path / f"{name}.pt"),
        }
        expected[name] = run(model, x)
        types |= set(compressed_types(model))
    assert types == set(registered_modules()), "a registered type has no folder in this test"

    env = _child_env(TESTS)
    result_file = tmp_path / "child.pt"
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cases), str(result_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    results = torch.load(result_file)
    for name in builds:
        assert results[name]["types"] == compressed_types(builds[name][0])
        torch.testing.assert_close(results[name]["output"], expected[name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_the_registry_knows_every_type_laserrmt_defines(tmp_path):
    """A fresh process that imports only the registry knows every type that importing all of
    laserrmt registers: no module that defines one is missing from the registry's list."""
    script = textwrap.dedent(
        """
        import importlib, json, pkgutil
        import laserrmt
        from laserrmt.surgery import registry

        known = sorted(registry.registered_modules())
        for module in pkgutil.walk_packages(laserrmt.__path__, "laserrmt."):
            importlib.import_module(module.name)
        print(json.dumps([known, sorted(registry._REGISTRY)]))
        """
    )
    env = _child_env()
    child = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    known, everything = json.loads(child.stdout.strip().splitlines()[-1])
    assert known == everything
    assert len(everything) >= 9
