"""laserrmt: compress neural networks with Random Matrix Theory.

The public API, imported lazily so that ``laserrmt --help`` stays fast::

    laserrmt.load(folder, dtype=None, device_map=None) -> (model, tokenizer)
    laserrmt.save(model, folder, tokenizer=..., plan=..., max_shard_size=5 * 10**9)
    laserrmt.compress(model, tokenizer, **settings) -> (model, CompressionResult)
    laserrmt.analyze_model(model, threshold="mp") -> AnalysisResult
    laserrmt.evaluate_model(model, tokenizer) -> EvaluationResult
    laserrmt.load_model(spec) -> LoadedModel
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from laserrmt.errors import LaserRMTError

__version__ = "0.1.0"

_EXPORTS = {
    "load": ("laserrmt.surgery.io", "load"),
    "save": ("laserrmt.surgery.io", "save_compressed"),
    "compress": ("laserrmt.pipeline", "compress"),
    "CompressSettings": ("laserrmt.pipeline", "CompressSettings"),
    "CompressionPlan": ("laserrmt.plan", "CompressionPlan"),
    "analyze_model": ("laserrmt.analyze", "analyze_model"),
    "evaluate_model": ("laserrmt.evaluate", "evaluate_model"),
    "load_model": ("laserrmt.models.loading", "load_model"),
    "choose_rank": ("laserrmt.rmt", "choose_rank"),
}

__all__ = ["LaserRMTError", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'laserrmt' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(import_module(module), attribute)
    globals()[name] = value
    return value
