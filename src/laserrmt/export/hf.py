"""A compressed model as a folder of its base architecture, readable by any transformers tool.

transformers, vLLM, TGI and llama.cpp's converter read a folder whose tensors have the shapes
the architecture's config implies. What a standard config can express survives: denoised
weights (same shapes), the residual-stream cut (``hidden_size`` is a config value) and an MLP
width shared by every block (``intermediate_size``). What it cannot is undone or refused:
factorized layers are multiplied back into dense weights (low rank plus sparse ones into
``A B + S``) and int8 layers dequantized (their savings are lost), and MLP widths that differ
per block cannot be written at all.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from laserrmt.errors import NumericalError, TargetSelectionError
from laserrmt.export.common import dequantize_int8_layers, folder_bytes, write_report
from laserrmt.models.architectures import is_causal_lm, mlp_layouts
from laserrmt.outputs import atomic_output_dir, check_output_dir
from laserrmt.surgery.io import METADATA_FILE, weight_bytes
from laserrmt.surgery.lowrank import LowRankLinear
from laserrmt.surgery.registry import CompressedModule
from laserrmt.surgery.replace import set_submodule
from laserrmt.surgery.sparse import LowRankSparseLinear
from laserrmt.surgery.width.modules import ResizedLinear

__all__ = ["HF_TOLERANCE", "export_hf", "standard_copy"]

HF_TOLERANCE = 1e-5


def _densify(model: nn.Module) -> dict[str, int]:
    """Replace every compressed layer by a plain ``nn.Linear``, in place; counts by kind."""
    counts = {"int8": len(dequantize_int8_layers(model)), "factorized": 0, "resized": 0}
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear | LowRankSparseLinear):
            kind = "factorized"
            weight = module.to_dense()
        elif isinstance(module, ResizedLinear):
            kind = "resized"
            weight = module.weight.detach()
        elif isinstance(module, CompressedModule):
            raise TargetSelectionError(
                f"{name} is a {type(module).__name__}, which the base architecture has no "
                "layer for; export this model with --format onnx instead"
            )
        else:
            continue
        bias = getattr(module, "bias", None)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.to(weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        set_submodule(model, name, linear)
        counts[kind] += 1
    return counts


def _set_mlp_width(model: nn.Module) -> int | None:
    """Write the MLP width into the config when every block shares one; refuse otherwise."""
    widths = sorted({layout.width for layout in mlp_layouts(model)})
    if len(widths) > 1:
        raise TargetSelectionError(
            f"the MLP widths differ between blocks ({', '.join(map(str, widths))}), which a "
            "standard config cannot express; export with --format onnx or load with laserrmt"
        )
    config: Any = model.config
    if widths and hasattr(config, "intermediate_size"):
        config.intermediate_size = widths[0]
        return widths[0]
    return None


def _shape_mismatch(model: nn.Module) -> str | None:
    """The first tensor the config's fresh architecture would not hold as saved, or None."""
    with torch.device("meta"):
        fresh = type(model)._from_config(model.config)  # type: ignore[attr-defined]
    fresh_shapes = {k: tuple(t.shape) for k, t in fresh.state_dict().items()}
    for key, tensor in model.state_dict().items():
        if fresh_shapes.get(key) != tuple(tensor.shape):
            expected = fresh_shapes.get(key)
            return (
                f"{key} {tuple(tensor.shape)} (the architecture has {expected or 'no such tensor'})"
            )
    missing = sorted(set(fresh_shapes) - set(model.state_dict()))
    return f"{missing[0]} is missing" if missing else None


def _plan_modes(folder: Path | None) -> dict[str, int]:
    """How many layers the recorded plan denoised and factorized (when the folder says so)."""
    file = folder / METADATA_FILE if folder is not None else None
    if file is None or not file.is_file():
        return {}
    plan = json.loads(file.read_text(encoding="utf-8")).get("plan") or {}
    modes: dict[str, int] = {}
    for decision in (plan.get("modules") or {}).values():
        modes[decision.get("mode", "?")] = modes.get(decision.get("mode", "?"), 0) + 1
    return modes


def _check_ids(vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, 16), generator=generator)


def standard_copy(model: nn.Module) -> tuple[Any, dict[str, int], int | None]:
    """A CPU copy of ``model`` in its base architecture: compressed layers made dense.

    Returns the copy (its config's ``intermediate_size`` set to the shared MLP width), the count
    of densified layers by kind (``int8``, ``factorized``, ``resized``) and that width (None
    when the model has no MLP width to set). ``model`` is not changed.

    Raises:
        TargetSelectionError: no transformers config, or a layer or width the config cannot
            express.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TargetSelectionError(
            f"{type(model).__name__} has no transformers config, so no standard folder exists "
            "for it; save it with laserrmt.save"
        )
    dense: Any = copy.deepcopy(model).cpu().eval()
    counts = _densify(dense)
    mlp_width = _set_mlp_width(dense)
    mismatch = _shape_mismatch(dense)
    if mismatch is not None:
        raise TargetSelectionError(
            f"the {type(model).__name__} config cannot express tensor {mismatch}; export with "
            "--format onnx or load with laserrmt"
        )
    return dense, counts, mlp_width


def export_hf(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    overwrite: bool = False,
    source_folder: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write ``model`` as a standard transformers folder of its own class; returns the report.

    The folder is read back with the plain Auto class (no laserrmt, no remote code) and its
    logits compared with ``model``'s (to ``HF_TOLERANCE`` in float32, 4 ulps of other dtypes;
    relative to the largest logit when that exceeds 1). The report (``export.json``, also
    printed by the CLI) says which savings survive and the resulting size. ``model`` is not
    changed.

    Raises:
        TargetSelectionError: a layer or width the architecture's config cannot express.
        NumericalError: the folder read back by transformers computes different logits.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    import transformers

    check_output_dir(out, overwrite)
    dense, counts, mlp_width = standard_copy(model)
    config: Any = model.config
    ids = _check_ids(int(config.vocab_size))
    device = next(model.parameters()).device
    with torch.no_grad():
        reference = model(input_ids=ids.to(device)).logits.float().cpu()
    modes = _plan_modes(Path(source_folder) if source_folder is not None else None)
    dense_config: Any = dense.config
    with atomic_output_dir(out, overwrite=overwrite) as folder:
        dense_config.architectures = [type(dense).__name__]
        dense.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        auto = (
            transformers.AutoModelForCausalLM
            if is_causal_lm(model)
            else getattr(transformers, type(model).__name__)
        )
        dtype = next(dense.parameters()).dtype
        reloaded = auto.from_pretrained(folder, dtype=dtype).eval()
        with torch.no_grad():
            logits = reloaded(input_ids=ids).logits.float()
        diff = float((logits - reference).abs().max())
        # Dense products of factors round differently from two products: beyond float32 the
        # bound follows the dtype's own precision.
        precision = HF_TOLERANCE if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        tolerance = precision * max(1.0, float(reference.abs().max()))
        if not diff <= tolerance:
            raise NumericalError(
                f"transformers reads the exported folder with logits {diff:.3g} off (allowed "
                f"{tolerance:.3g}); please report it"
            )
        survives = []
        if modes.get("denoise"):
            survives.append(f"denoise of {modes['denoise']} layers (same shapes)")
        survives.append(f"hidden_size {dense_config.hidden_size} (the residual stream as saved)")
        if mlp_width is not None:
            survives.append(f"intermediate_size {mlp_width} in every block")
        lost = []
        if counts["factorized"]:
            lost.append(f"factors of {counts['factorized']} layers multiplied back")
        if counts["int8"]:
            lost.append(f"int8 of {counts['int8']} layers dequantized")
        report: dict[str, Any] = {
            "format": "hf",
            "architecture": type(model).__name__,
            "survives": survives,
            "lost": lost,
            "layers_densified": counts,
            "source_weight_bytes": weight_bytes(model),
            "weight_bytes": weight_bytes(dense),
            "folder_bytes": 0,
            "check": {"max_abs_logit_diff_vs_laserrmt": diff, "tolerance": tolerance},
        }
        write_report(folder, report)
        report["folder_bytes"] = folder_bytes(folder)
        write_report(folder, report)
    return report
