"""A causal LM as an ONNX graph that decodes with a key/value cache, checked with ONNX Runtime.

The graph takes ``input_ids``, ``attention_mask``, ``position_ids`` and, per layer,
``past_key_values.<i>.key`` / ``.value`` (batch × kv heads × past × head dim; past may be 0 for
the prompt) and returns ``logits`` and ``present.<i>.key`` / ``.value``, the cache to feed back
on the next step. Factorized layers stay two MatMuls, width-cut layers keep their widths, int8
layers of laserrmt become dequantized float32 MatMuls (the export's float graph).
``quantize="int8"`` then hands that graph to ONNX Runtime's weight-only quantizer: every MatMul
with a constant weight, the output head included (a head tied to the input embedding gets its
own transposed copy first), becomes a ``MatMulNBits`` node with 8-bit weights in blocks of
``INT8_BLOCK`` input features, each block with its own scale and zero point, computed by ORT's
int8 kernels (``accuracy_level`` 4: activations quantized per block on the fly). The input
embedding stays float32 (a table lookup reads one row per token, so its size costs no time).
ORT's older dynamic quantization (one activation scale per tensor) lost too much: top-1
agreement 0.69–0.88 with float32 on the default model (``benchmarks/results/deploy.md``).

The export is checked before it is written: the prompt and a few decode steps are run in torch
and in ONNX Runtime and the float32 logits must agree to ``ONNX_TOLERANCE`` (relative to the
largest logit when that exceeds 1); a mismatch is an error. The int8 graph's error against the
float graph is measured on the same steps and reported, not bounded (it depends on the model).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from laserrmt.errors import InvalidOptionError, NumericalError, TargetSelectionError
from laserrmt.export.common import (
    SINGLE_FILE_LIMIT,
    dequantize_int8_layers,
    folder_bytes,
    write_report,
)
from laserrmt.models.architectures import is_causal_lm
from laserrmt.outputs import atomic_output_dir, check_output_dir
from laserrmt.surgery.io import weight_bytes
from laserrmt.surgery.sparse import LowRankSparseLinear

__all__ = [
    "INT8_BLOCK",
    "ONNX_TOLERANCE",
    "QUANTIZE_CHOICES",
    "export_onnx",
    "onnx_runtime",
    "run_decode",
]

ONNX_TOLERANCE = 1e-4
QUANTIZE_CHOICES = ("int8",)
#: Input features per int8 block (one float32 scale and one zero point each); 32 keeps the
#: default model's top-1 agreement with float32 at 0.97 where one scale per row does worse.
INT8_BLOCK = 32
_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations, the fast integer kernels
GRAPH_FILE = "model.onnx"
_OPSET = 18
_INSTALL = "pip install 'laserrmt[export]' (onnx, onnxruntime, onnxscript)"


def onnx_runtime() -> Any:
    """The ``onnxruntime`` module, or one line saying how to install it."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
    except ImportError:
        raise InvalidOptionError(f"ONNX export needs onnx and onnxruntime; {_INSTALL}") from None
    return onnxruntime


class _DecoderStep(nn.Module):
    """The model with its cache as flat tensors: what an ONNX graph can take and return."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config: Any = getattr(model, "config", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _cache_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Shapes of each cached key and value for one token (width cuts may differ per layer)."""
    with torch.no_grad():
        out = _DecoderStep(model)(
            torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, 1, dtype=torch.long),
            torch.zeros(1, 1, dtype=torch.long),
        )
    return [tuple(t.shape) for t in out[1:]]


def _names(layers: int) -> tuple[list[str], list[str]]:
    kv = [(i, part) for i in range(layers) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"]
    inputs += [f"past_key_values.{i}.{part}" for i, part in kv]
    outputs = ["logits"] + [f"present.{i}.{part}" for i, part in kv]
    return inputs, outputs


def _export_graph(model: nn.Module, file: Path) -> list[tuple[int, ...]]:
    from torch.export import Dim

    shapes = _cache_shapes(model)
    inputs, outputs = _names(len(shapes) // 2)
    # Example sizes ≥ 2 so that torch.export keeps every dimension symbolic.
    batch, seq, past = 2, 3, 4
    example_past = tuple(
        torch.zeros(batch, s[1], past, *s[3:], dtype=torch.float32) for s in shapes
    )
    example = (
        torch.zeros(batch, seq, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).repeat(batch, 1),
        *example_past,
    )
    b, s, p, t = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    dynamic = (
        {0: b, 1: s},
        {0: b, 1: t},
        {0: b, 1: s},
        tuple({0: b, 2: p} for _ in example_past),
    )
    external = weight_bytes(model) > SINGLE_FILE_LIMIT
    torch.onnx.export(
        _DecoderStep(model).eval(),
        example,
        str(file),
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=dynamic,
        opset_version=_OPSET,
        dynamo=True,
        external_data=external,
        verbose=False,
    )
    return shapes


def _check_ids(vocab_size: int, prompt: int, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, prompt + steps), generator=generator)
    return ids[:, :prompt], [ids[:, prompt + i : prompt + i + 1] for i in range(steps)]


def run_decode(
    session: Any, shapes: list[tuple[int, ...]], prompt: torch.Tensor, steps: list[torch.Tensor]
) -> list[np.ndarray]:
    """Logits of the prompt and of each next token, fed one at a time through the cache."""
    inputs, _ = _names(len(shapes) // 2)
    batch = prompt.shape[0]
    past = [np.zeros((batch, s[1], 0, *s[3:]), dtype=np.float32) for s in shapes]
    logits = []
    done = 0
    for chunk in [prompt, *steps]:
        n = chunk.shape[1]
        feed = {
            "input_ids": chunk.cpu().numpy(),
            "attention_mask": np.ones((batch, done + n), dtype=np.int64),
            "position_ids": np.tile(np.arange(done, done + n, dtype=np.int64), (batch, 1)),
        }
        feed.update(zip(inputs[3:], past, strict=True))
        out = session.run(None, feed)
        logits.append(out[0])
        past = out[1:]
        done += n
    return logits


def _torch_decode(
    model: nn.Module, prompt: torch.Tensor, steps: list[torch.Tensor]
) -> list[np.ndarray]:
    logits = []
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        logits.append(out.logits.cpu().numpy())
        for token in steps:
            out = model(input_ids=token, cache=out.cache, use_cache=True)
            logits.append(out.logits.cpu().numpy())
    return logits


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def _session(onnxruntime: Any, file: Path) -> Any:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    quantize: str | None = None,
    overwrite: bool = False,
    source: str | None = None,
    prompt_tokens: int = 8,
    decode_steps: int = 3,
) -> dict[str, Any]:
    """Write ``model`` (a causal LM, compressed or not) to ``out/model.onnx``; returns the report.

    The folder also holds the config, the tokenizer and ``export.json`` (the report: inputs,
    outputs, the torch-vs-ONNX Runtime check, sizes). The model is not changed (int8 layers
    are dequantized in a float32 copy on the CPU, where the graph is traced).

    Raises:
        InvalidOptionError: onnx/onnxruntime missing, or an unknown ``quantize``.
        TargetSelectionError: the model is not a causal LM, or holds low rank plus sparse
            layers.
        NumericalError: ONNX Runtime's float32 logits differ from torch's beyond the tolerance.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    sparse = [n for n, m in model.named_modules() if isinstance(m, LowRankSparseLinear)]
    if sparse:
        raise TargetSelectionError(
            f"{sparse[0]} (and {len(sparse) - 1} more) is low rank plus sparse, a product ONNX "
            "export does not cover; export with --format hf (dense A B + S) or compress without "
            "--sparse-share"
        )
    onnxruntime = onnx_runtime()
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise InvalidOptionError(
            f"unknown --quantize {quantize!r} for ONNX; choose {', '.join(QUANTIZE_CHOICES)}"
        )
    if not is_causal_lm(model):
        raise TargetSelectionError(
            f"{type(model).__name__} is not a causal language model; ONNX export covers "
            "decoders with a key/value cache"
        )
    check_output_dir(out, overwrite)
    float_model: Any = copy.deepcopy(model).to("cpu", torch.float32).eval()
    dequantized = dequantize_int8_layers(float_model)
    vocab = int(float_model.config.vocab_size)
    prompt, steps = _check_ids(vocab, prompt_tokens, decode_steps)

    with (
        atomic_output_dir(out, overwrite=overwrite) as folder,
        tempfile.TemporaryDirectory(prefix="laserrmt-onnx-") as scratch,
    ):
        graph = Path(scratch) / GRAPH_FILE
        started = time.perf_counter()
        shapes = _export_graph(float_model, graph)
        export_seconds = time.perf_counter() - started
        reference = _torch_decode(float_model, prompt, steps)
        float_logits = run_decode(_session(onnxruntime, graph), shapes, prompt, steps)
        diff = _max_diff(reference, float_logits)
        scale = max(1.0, max(float(np.abs(x).max()) for x in reference))
        if not diff <= ONNX_TOLERANCE * scale:
            raise NumericalError(
                f"ONNX Runtime's logits differ from torch's by {diff:.3g} (allowed "
                f"{ONNX_TOLERANCE * scale:.3g}); the graph is wrong, please report it"
            )
        report: dict[str, Any] = {
            "format": "onnx",
            "source": source,
            "architecture": type(model).__name__,
            "opset": _OPSET,
            "inputs": _names(len(shapes) // 2)[0],
            "outputs": _names(len(shapes) // 2)[1],
            "cache_shapes_per_token": [list(s) for s in shapes],
            "int8_layers_dequantized": len(dequantized),
            "check": {
                "prompt_tokens": prompt_tokens,
                "decode_steps": decode_steps,
                "max_abs_logit_diff_vs_torch": diff,
                "tolerance": ONNX_TOLERANCE * scale,
            },
            "quantize": quantize,
            "export_seconds": round(export_seconds, 2),
            "torch_weight_bytes": weight_bytes(model),
        }
        if quantize == "int8":
            report["int8"] = _quantize_int8(graph, folder / GRAPH_FILE)
            int8_logits = run_decode(
                _session(onnxruntime, folder / GRAPH_FILE), shapes, prompt, steps
            )
            report["int8"].update(
                max_abs_logit_diff_vs_float32_onnx=_max_diff(float_logits, int8_logits),
                top1_agreement_vs_float32_onnx=float(
                    np.mean(
                        [
                            float(np.mean(x.argmax(-1) == y.argmax(-1)))
                            for x, y in zip(float_logits, int8_logits, strict=True)
                        ]
                    )
                ),
            )
        else:
            for file in Path(scratch).iterdir():
                shutil.move(str(file), folder / file.name)
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        report["onnx_bytes"] = sum(
            p.stat().st_size for p in folder.iterdir() if p.name.startswith(GRAPH_FILE)
        )
        report["folder_bytes"] = folder_bytes(folder)
        write_report(folder, report)
    return report


def _untie_transposed_weights(graph: Any) -> int:
    """Give each MatMul that reads ``Transpose(initializer)`` its own transposed initializer.

    The exporter folds the transpose of an ordinary linear weight into a constant, but not of
    one shared with the input embedding (a tied head), and the quantizer takes only constant
    weights. Returns how many were untied.
    """
    from onnx import numpy_helper

    constants = {t.name: t for t in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    untied = 0
    for node in list(graph.node):
        transpose = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if transpose is None or transpose.op_type != "Transpose":
            continue
        if transpose.input[0] not in constants:
            continue
        weight = numpy_helper.to_array(constants[transpose.input[0]])
        name = f"{transpose.output[0]}.transposed"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
        node.input[1] = name
        if not any(transpose.output[0] in other.input for other in graph.node):
            graph.node.remove(transpose)
        untied += 1
    return untied


def _quantize_int8(source: Path, target: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(source))
    untied = _untie_transposed_weights(model.graph)
    config = DefaultWeightOnlyQuantConfig(
        block_size=INT8_BLOCK,
        is_symmetric=False,
        accuracy_level=_ACCURACY_LEVEL,
        op_types_to_quantize=("MatMul",),
        bits=8,
    )
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)  # it logs every node it visits at INFO
    try:
        quantizer.process()
    finally:
        log.setLevel(level)
    quantized = quantizer.model.model
    external = quantized.ByteSize() > SINGLE_FILE_LIMIT
    onnx.save(
        quantized,
        str(target),
        save_as_external_data=external,
        location=f"{GRAPH_FILE}.data" if external else None,
    )
    nodes = [node.op_type for node in quantized.graph.node]
    return {
        "method": f"ONNX Runtime MatMulNBits, 8-bit weights, blocks of {INT8_BLOCK}, "
        f"accuracy_level {_ACCURACY_LEVEL}",
        "quantized_matmuls": nodes.count("MatMulNBits"),
        "float_matmuls_left": nodes.count("MatMul"),
        "tied_weights_untied": untied,
    }
