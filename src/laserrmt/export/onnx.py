"""A model as an ONNX graph, checked with ONNX Runtime: a causal LM that decodes with a
key/value cache, or a BERT-style encoder or sequence classifier.

A causal LM's graph takes ``input_ids``, ``attention_mask``, ``position_ids`` and, per layer,
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

An encoder's graph (:func:`export_kind`) is one forward pass: ``input_ids``,
``attention_mask`` and, when the model's ``forward`` takes them, ``token_type_ids``, all with
dynamic batch and sequence axes, to ``last_hidden_state`` (an encoder) or ``logits`` (a sequence
classifier). Compressed layers stay as they are here too, the per-head widths of RMT-KD's
attention cuts included; ``quantize="int8"`` is the same ORT weight-only quantizer, which leaves
the linear layers on 2-D inputs (pooler, classifier: ``Gemm`` nodes) in float32.

The export is checked before it is written: the prompt and a few decode steps (a causal LM), or
a right-padded batch with its attention mask (an encoder: hidden states compared where the mask
is 1), are run in torch and in ONNX Runtime and the float32 outputs must agree to
``ONNX_TOLERANCE`` (relative to the largest output when that exceeds 1); a mismatch is an error.
The int8 graph's error against the float graph is measured on the same inputs and reported
(with the top-1 or label agreement), not bounded (it depends on the model).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
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
from laserrmt.models.placement import model_device
from laserrmt.outputs import atomic_output_dir, check_output_dir
from laserrmt.surgery.io import weight_bytes
from laserrmt.surgery.sparse import LowRankSparseLinear

__all__ = [
    "ENCODER_OUTPUTS",
    "INT8_BLOCK",
    "ONNX_TOLERANCE",
    "QUANTIZE_CHOICES",
    "encoder_inputs",
    "export_kind",
    "export_onnx",
    "onnx_runtime",
    "padded_batch",
    "run_decode",
    "summary_lines",
]

ONNX_TOLERANCE = 1e-4
QUANTIZE_CHOICES = ("int8",)
#: Input features per int8 block (one float32 scale and one zero point each); 32 keeps the
#: default model's top-1 agreement with float32 at 0.97 where one scale per row does worse.
INT8_BLOCK = 32
_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations, the fast integer kernels
GRAPH_FILE = "model.onnx"
_OPSET = 18
#: The output each non-causal kind's graph returns.
ENCODER_OUTPUTS = {"encoder": "last_hidden_state", "sequence-classifier": "logits"}
_INSTALL = "pip install 'laserrmt[export]' (onnx, onnxruntime, onnxscript)"


#: Loggers of the ONNX exporter's passes; they log every rewrite at INFO, which shows once
#: anything (ORT's quantization module does) has configured the root logger.
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise these loggers to WARNING for the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


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
    with _quiet(*_EXPORTER_LOGGERS):
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


def export_kind(model: nn.Module) -> str:
    """``"causal-lm"``, ``"encoder"`` or ``"sequence-classifier"``: what ONNX export writes.

    An encoder takes ``input_ids`` and ``attention_mask`` (BERT-style) and returns
    ``last_hidden_state``; a sequence classifier returns ``logits`` of one row per sequence.
    Decided by one forward pass on two tokens, so the model's own outputs say what it is.

    Raises:
        TargetSelectionError: the model is none of these (one line).
    """
    if is_causal_lm(model):
        return "causal-lm"
    config = getattr(model, "config", None)
    parameters = inspect.signature(model.forward).parameters
    if (
        config is not None
        and not getattr(config, "is_encoder_decoder", False)
        and {"input_ids", "attention_mask"} <= set(parameters)
    ):
        device = model_device(model)
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = getattr(out, "logits", None)
        if logits is not None and logits.dim() == 2:
            return "sequence-classifier"
        if logits is None and getattr(out, "last_hidden_state", None) is not None:
            return "encoder"
    raise TargetSelectionError(
        f"{type(model).__name__} is not a causal LM, a text encoder (input_ids, attention_mask "
        "-> last_hidden_state) or a sequence classifier (-> logits per sequence); ONNX export "
        "covers those three"
    )


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
    check_rows: int = 16,
    check_tokens: int = 32,
) -> dict[str, Any]:
    """Write ``model`` (compressed or not) to ``out/model.onnx``; returns the report.

    A causal LM becomes a decoder step with a key/value cache, checked on a prompt of
    ``prompt_tokens`` and ``decode_steps`` cached steps. An encoder (``last_hidden_state``) or
    a sequence classifier (``logits``) becomes one forward pass with dynamic batch and sequence
    axes taking ``input_ids``, ``attention_mask`` and, when the model's ``forward`` takes them,
    ``token_type_ids``; it is checked on ``check_rows`` right-padded rows of up to
    ``check_tokens`` tokens (hidden states compared where the mask is 1).

    The folder also holds the config, the tokenizer and ``export.json`` (the report: kind,
    inputs, outputs, the torch-vs-ONNX Runtime check, the int8 agreement, sizes). The model is
    not changed (int8 layers are dequantized in a float32 copy on the CPU, where the graph is
    traced).

    Raises:
        InvalidOptionError: onnx/onnxruntime missing, or an unknown ``quantize``.
        TargetSelectionError: the model is none of the three kinds, or holds low rank plus
            sparse layers.
        NumericalError: ONNX Runtime's float32 outputs differ from torch's beyond the tolerance.
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
    kind = export_kind(model)
    check_output_dir(out, overwrite)
    float_model: Any = copy.deepcopy(model).to("cpu", torch.float32).eval()
    dequantized = dequantize_int8_layers(float_model)

    with (
        atomic_output_dir(out, overwrite=overwrite) as folder,
        tempfile.TemporaryDirectory(prefix="laserrmt-onnx-") as scratch,
    ):
        graph = Path(scratch) / GRAPH_FILE
        target = folder / GRAPH_FILE
        report: dict[str, Any] = {
            "format": "onnx",
            "source": source,
            "architecture": type(model).__name__,
            "kind": kind,
            "opset": _OPSET,
            "int8_layers_dequantized": len(dequantized),
            "quantize": quantize,
            "torch_weight_bytes": weight_bytes(model),
        }
        if kind == "causal-lm":
            report.update(
                _export_decoder(
                    float_model, graph, target, quantize, onnxruntime, prompt_tokens, decode_steps
                )
            )
        else:
            report.update(
                _export_encoder(
                    float_model,
                    kind,
                    graph,
                    target,
                    quantize,
                    onnxruntime,
                    check_rows,
                    check_tokens,
                )
            )
        if quantize is None:
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


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What ``laserrmt export --format onnx`` prints of an export's report."""
    check = report["check"]
    if report.get("kind", "causal-lm") == "causal-lm":
        lines = [
            f"ONNX Runtime vs torch, float32 logits: max |diff| "
            f"{check['max_abs_logit_diff_vs_torch']:.3g}"
        ]
        if "int8" in report:
            q = report["int8"]
            lines.append(
                f"int8 vs float32 ONNX: max |diff| {q['max_abs_logit_diff_vs_float32_onnx']:.3g}, "
                f"top-1 agreement {q['top1_agreement_vs_float32_onnx']:.3f}"
            )
    else:
        lines = [
            f"ONNX Runtime vs torch, float32 {check['output']} on {check['rows']} padded "
            f"rows: max |diff| {check['max_abs_diff_vs_torch']:.3g}"
        ]
        if "int8" in report:
            q = report["int8"]
            line = f"int8 vs float32 ONNX: max |diff| {q['max_abs_diff_vs_float32_onnx']:.3g}"
            if "label_agreement_vs_float32_onnx" in q:
                line += f", label agreement {q['label_agreement_vs_float32_onnx']:.3f}"
            lines.append(line)
    lines.append(f"model.onnx: {report['onnx_bytes'] / 1e6:.1f} MB")
    return lines


def _checked(reference: list[np.ndarray], got: list[np.ndarray], what: str) -> dict[str, float]:
    """The largest difference, or one line saying the graph is wrong."""
    diff = _max_diff(reference, got)
    tolerance = ONNX_TOLERANCE * max(1.0, max(float(np.abs(x).max()) for x in reference))
    if not diff <= tolerance:
        raise NumericalError(
            f"ONNX Runtime's {what} differ from torch's by {diff:.3g} (allowed "
            f"{tolerance:.3g}); the graph is wrong, please report it"
        )
    return {"diff": diff, "tolerance": tolerance}


def _export_decoder(
    model: Any,
    graph: Path,
    target: Path,
    quantize: str | None,
    onnxruntime: Any,
    prompt_tokens: int,
    decode_steps: int,
) -> dict[str, Any]:
    prompt, steps = _check_ids(int(model.config.vocab_size), prompt_tokens, decode_steps)
    started = time.perf_counter()
    shapes = _export_graph(model, graph)
    export_seconds = time.perf_counter() - started
    reference = _torch_decode(model, prompt, steps)
    float_logits = run_decode(_session(onnxruntime, graph), shapes, prompt, steps)
    checked = _checked(reference, float_logits, "logits")
    inputs, outputs = _names(len(shapes) // 2)
    report: dict[str, Any] = {
        "inputs": inputs,
        "outputs": outputs,
        "cache_shapes_per_token": [list(s) for s in shapes],
        "check": {
            "output": "logits",
            "prompt_tokens": prompt_tokens,
            "decode_steps": decode_steps,
            "max_abs_logit_diff_vs_torch": checked["diff"],
            "tolerance": checked["tolerance"],
        },
        "export_seconds": round(export_seconds, 2),
    }
    if quantize == "int8":
        report["int8"] = _quantize_int8(graph, target)
        int8_logits = run_decode(_session(onnxruntime, target), shapes, prompt, steps)
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
    return report


class _EncoderStep(nn.Module):
    """One forward pass of an encoder or classifier, returning the one output tensor."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **types)
        result: torch.Tensor = getattr(out, self.output)
        return result


def encoder_inputs(model: nn.Module) -> list[str]:
    """The graph inputs of an encoder: ids and mask, and token types when ``forward`` takes them."""
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        names.append("token_type_ids")
    return names


def _export_encoder_graph(model: nn.Module, output: str, inputs: list[str], file: Path) -> None:
    from torch.export import Dim

    # Example sizes ≥ 2 so that torch.export keeps both dimensions symbolic.
    example = tuple(torch.ones(2, 3, dtype=torch.long) for _ in inputs)
    axes = {0: Dim("batch"), 1: Dim("sequence")}
    with _quiet(*_EXPORTER_LOGGERS):
        torch.onnx.export(
            _EncoderStep(model, output).eval(),
            example,
            str(file),
            input_names=inputs,
            output_names=[output],
            dynamic_shapes=tuple(axes for _ in inputs),
            opset_version=_OPSET,
            dynamo=True,
            external_data=weight_bytes(model) > SINGLE_FILE_LIMIT,
            verbose=False,
        )


def padded_batch(config: Any, inputs: list[str], rows: int, tokens: int) -> dict[str, np.ndarray]:
    """``rows`` random sequences right-padded to ``tokens``: the first full, the last 2 tokens.

    Padding is the config's ``pad_token_id`` (0 when unset) with mask 0; token types, when the
    graph takes them, are random among the config's ``type_vocab_size``.
    """
    rng = np.random.default_rng(0)
    tokens = min(tokens, int(getattr(config, "max_position_embeddings", tokens)))
    lengths = np.linspace(tokens, 2, rows).round().astype(np.int64)
    mask = (np.arange(tokens)[None] < lengths[:, None]).astype(np.int64)
    pad = int(getattr(config, "pad_token_id", None) or 0)
    ids = rng.integers(0, int(config.vocab_size), (rows, tokens))
    feed = {"input_ids": np.where(mask == 1, ids, pad), "attention_mask": mask}
    if "token_type_ids" in inputs:
        types = int(getattr(config, "type_vocab_size", 1))
        feed["token_type_ids"] = rng.integers(0, types, (rows, tokens)) * mask
    return feed


def _valid(output: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Hidden states at the unpadded positions (padded ones have no meaning); logits as they are."""
    return output[mask == 1] if output.ndim == 3 else output


def _export_encoder(
    model: nn.Module,
    kind: str,
    graph: Path,
    target: Path,
    quantize: str | None,
    onnxruntime: Any,
    rows: int,
    tokens: int,
) -> dict[str, Any]:
    output = ENCODER_OUTPUTS[kind]
    inputs = encoder_inputs(model)
    started = time.perf_counter()
    _export_encoder_graph(model, output, inputs, graph)
    export_seconds = time.perf_counter() - started
    feed = padded_batch(model.config, inputs, rows, tokens)
    with torch.no_grad():
        out = model(**{name: torch.from_numpy(x) for name, x in feed.items()})
    mask = feed["attention_mask"]
    reference = _valid(getattr(out, output).cpu().numpy(), mask)
    float_out = np.asarray(_session(onnxruntime, graph).run([output], feed)[0])
    checked = _checked([reference], [_valid(float_out, mask)], output)
    report: dict[str, Any] = {
        "inputs": inputs,
        "outputs": [output],
        "dynamic_axes": {name: ["batch", "sequence"] for name in inputs},
        "check": {
            "output": output,
            "rows": int(mask.shape[0]),
            "tokens": int(mask.shape[1]),
            "padded_rows": int((mask == 0).any(axis=1).sum()),
            "max_abs_diff_vs_torch": checked["diff"],
            "tolerance": checked["tolerance"],
        },
        "export_seconds": round(export_seconds, 2),
    }
    if quantize == "int8":
        report["int8"] = _quantize_int8(graph, target)
        int8_out = np.asarray(_session(onnxruntime, target).run([output], feed)[0])
        report["int8"]["max_abs_diff_vs_float32_onnx"] = _max_diff(
            [_valid(float_out, mask)], [_valid(int8_out, mask)]
        )
        if kind == "sequence-classifier":
            report["int8"]["label_agreement_vs_float32_onnx"] = float(
                np.mean(float_out.argmax(-1) == int8_out.argmax(-1))
            )
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
    with _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):  # INFO on every node
        quantizer.process()
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
        # The exporter writes a linear layer on 2-D inputs (a pooler, a classifier) as a Gemm,
        # which the quantizer leaves in float32.
        "float_gemms_left": nodes.count("Gemm"),
        "tied_weights_untied": untied,
    }
