"""Deployable copies of a model: an ONNX graph with a key/value cache, a standard HF folder, or
a GGUF file.

``onnx.py`` exports a causal LM, a BERT-style encoder or a sequence classifier (compressed or
not) to ONNX and checks it against torch with ONNX Runtime; ``hf.py`` writes the base architecture's own folder, with the compressed layers
multiplied back where the architecture has no other way to express them; ``gguf.py`` writes
that same dense model of a Llama-style causal LM as llama.cpp's GGUF file.
"""

from laserrmt.export.gguf import export_gguf
from laserrmt.export.hf import export_hf
from laserrmt.export.onnx import export_onnx

FORMATS = ("onnx", "hf", "gguf")

__all__ = ["FORMATS", "export_gguf", "export_hf", "export_onnx"]
