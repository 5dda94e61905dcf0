"""Deployable copies of a model: an ONNX graph with a key/value cache, or a standard HF folder.

``onnx.py`` exports a causal LM (compressed or not) to ONNX and checks it against torch with
ONNX Runtime; ``hf.py`` writes the base architecture's own folder, with the compressed layers
multiplied back where the architecture has no other way to express them.
"""

from laserrmt.export.hf import export_hf
from laserrmt.export.onnx import export_onnx

FORMATS = ("onnx", "hf")

__all__ = ["FORMATS", "export_hf", "export_onnx"]
