"""Surgery: change a model as a plan says, and save or load the result.

``lowrank`` holds the factorized layers and the in-place denoising, ``width`` the width cuts,
``apply`` applies a :class:`~laserrmt.plan.CompressionPlan` (or replays a
:class:`~laserrmt.plan.WidthPlan`), ``io`` saves and loads compressed folders, ``replace``
swaps one layer for another, and ``registry`` lets new compressed module types join saving and
loading.
"""

from laserrmt.surgery.apply import AppliedChange, apply_plan, revert_changes
from laserrmt.surgery.io import load, load_into, save_compressed, write_compressed
from laserrmt.surgery.lowrank import (
    LowRankConv1d,
    LowRankConv2d,
    LowRankLinear,
    denoise_,
    factor_weight,
    factorize,
    low_rank_weight,
    restore_,
    truncated_svd,
    weight_as_matrix,
)
from laserrmt.surgery.quantize import Int8Linear, Int8LowRankLinear, quantize_model_int8
from laserrmt.surgery.registry import CompressedModule, module_class, register_module
from laserrmt.surgery.sparse import LowRankSparseLinear, factorize_sparse, split_budget

__all__ = [
    "AppliedChange",
    "CompressedModule",
    "Int8Linear",
    "Int8LowRankLinear",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankSparseLinear",
    "apply_plan",
    "denoise_",
    "factor_weight",
    "factorize",
    "factorize_sparse",
    "load",
    "load_into",
    "low_rank_weight",
    "module_class",
    "quantize_model_int8",
    "register_module",
    "restore_",
    "revert_changes",
    "save_compressed",
    "split_budget",
    "truncated_svd",
    "weight_as_matrix",
    "write_compressed",
]
