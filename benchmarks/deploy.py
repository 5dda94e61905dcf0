"""Deployment speed: torch against ONNX Runtime, float32 against int8, dense against compressed.

The default model and the same model at 20 % of its parameters removed (the budget method, no
healing), each run four ways: torch float32, torch with laserrmt's int8 layers, ONNX Runtime
float32 (``laserrmt export --format onnx``) and ONNX Runtime int8 (``--quantize int8``, ORT's
dynamic int8 MatMuls). Batch 1: the prefill of a 128-token prompt and greedy decoding with the
key/value cache. Every repeat runs every variant once, in turn, so all are measured side by
side under the same machine load; the table gives medians. The bytes ratio is the dense float32
weights over the variant's (torch: tensors as saved; ONNX: the graph files).

Writes ``benchmarks/results/deploy.md``. Needs the machine to itself for numbers worth reading.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import write_result
from laserrmt.export.onnx import GRAPH_FILE, export_onnx, onnx_runtime
from laserrmt.models.loading import load_model
from laserrmt.pipeline import compress
from laserrmt.report.html import markdown_table
from laserrmt.surgery.io import weight_bytes
from laserrmt.surgery.quantize import quantize_model_int8

Timer = Callable[[np.ndarray, int], tuple[float, float]]
"""``(prompt ids, new tokens) -> (prefill seconds, decode tokens per second)``."""


def torch_timer(model: torch.nn.Module) -> Timer:
    def run(prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
        with torch.no_grad():
            start = time.perf_counter()
            out = model(input_ids=torch.from_numpy(prompt), use_cache=True)
            prefill = time.perf_counter() - start
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, cache=out.cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            return prefill, new_tokens / (time.perf_counter() - start)

    return run


def onnx_timer(folder: Path, threads: int) -> Timer:
    onnxruntime = onnx_runtime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        str(folder / GRAPH_FILE), options, providers=["CPUExecutionProvider"]
    )
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]

    def step(ids: np.ndarray, done: int, past: list[np.ndarray]) -> list[np.ndarray]:
        n = ids.shape[1]
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, done + n), dtype=np.int64),
            "position_ids": np.arange(done, done + n, dtype=np.int64)[None],
        }
        feed.update((i.name, p) for i, p in zip(past_inputs, past, strict=True))
        return session.run(None, feed)

    def run(prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
        empty = [np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs]
        start = time.perf_counter()
        out = step(prompt, 0, empty)
        prefill = time.perf_counter() - start
        done = prompt.shape[1]
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = out[0][:, -1:].argmax(-1).astype(np.int64)
            out = step(token, done, out[1:])
            done += 1
        return prefill, new_tokens / (time.perf_counter() - start)

    return run


def onnx_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(GRAPH_FILE))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the default model)")
    parser.add_argument("--removed", type=float, default=0.2, help="fraction of parameters removed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--name", default="deploy", help="results/<name>.md")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()

    loaded = load_model(args.model)
    dense = loaded.model.eval()
    dense_bytes = weight_bytes(dense)
    started = time.perf_counter()
    compressed = load_model(args.model).model.eval()
    compress(
        compressed, loaded.tokenizer, method="budget", target_params=args.removed, progress=False
    )
    compress_seconds = time.perf_counter() - started

    variants: list[tuple[str, str, int, Timer]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="laserrmt-deploy-") as scratch:
        for label, model in (("dense", dense), (f"{args.removed:.0%} removed", compressed)):
            variants.append((label, "torch float32", weight_bytes(model), torch_timer(model)))
            quantized = load_model(args.model).model.eval() if model is dense else None
            if quantized is None:
                import copy

                quantized = copy.deepcopy(model)
            quantize_model_int8(quantized)
            variants.append((label, "torch int8", weight_bytes(quantized), torch_timer(quantized)))
            for quantize in (None, "int8"):
                folder = Path(scratch) / f"{label.split()[0]}-{quantize or 'float32'}"
                report = export_onnx(model, folder, quantize=quantize)
                check = report["check"]["max_abs_logit_diff_vs_torch"]
                note = f"{label}, ONNX {quantize or 'float32'}: float32 check max |Δ| {check:.2g}"
                if quantize:
                    note += (
                        f"; int8 vs float32 ONNX max |Δ| "
                        f"{report['int8']['max_abs_logit_diff_vs_float32_onnx']:.3g}, top-1 "
                        f"agreement {report['int8']['top1_agreement_vs_float32_onnx']:.2f}"
                    )
                notes.append(note)
                variants.append(
                    (
                        label,
                        f"ONNX Runtime {quantize or 'float32'}",
                        onnx_bytes(folder),
                        onnx_timer(folder, threads),
                    )
                )

        vocab = int(dense.config.vocab_size)  # type: ignore[union-attr]
        prompt = np.random.default_rng(0).integers(0, vocab, (1, args.prompt_tokens))
        for _, _, _, timer in variants:  # warm-up: first-call allocations, ORT graph planning
            timer(prompt, 2)
        runs: list[list[tuple[float, float]]] = [[] for _ in variants]
        for _ in range(args.repeats):
            for i, (_, _, _, timer) in enumerate(variants):
                runs[i].append(timer(prompt, args.new_tokens))

    base_decode = statistics.median(r[1] for r in runs[0])
    base_prefill = statistics.median(r[0] for r in runs[0])
    rows: list[list[Any]] = []
    for (label, runtime, size, _), measured in zip(variants, runs, strict=True):
        prefill = statistics.median(r[0] for r in measured)
        decode = statistics.median(r[1] for r in measured)
        rows.append(
            [
                label,
                runtime,
                f"{size / 1e6:.0f}",
                f"{dense_bytes / size:.2f}",
                f"{args.prompt_tokens / prefill:.0f}",
                f"{base_prefill / prefill:.2f}",
                f"{decode:.1f}",
                f"{decode / base_decode:.2f}",
                f"{decode / base_decode / (dense_bytes / size):.2f}",
            ]
        )
    columns = [
        "model",
        "runtime",
        "MB",
        "bytes ratio",
        "prefill tok/s",
        "prefill speed-up",
        "decode tok/s",
        "decode speed-up",
        "decode speed-up / bytes ratio",
    ]
    setup = (
        f"Model: {loaded.source}. Compressed: budget method, {args.removed:.0%} of parameters "
        f"removed, no healing ({compress_seconds:.0f} s). Batch 1, prompt {args.prompt_tokens} "
        f"random tokens, {args.new_tokens} greedy decode steps, {args.repeats} repeats "
        f"interleaved across variants, medians; torch and ONNX Runtime on {threads} threads. "
        "Speed-ups and the bytes ratio are against dense torch float32."
    )
    write_result(
        args.name,
        "Deployment: torch and ONNX Runtime, float32 and int8",
        [
            ("Setup", setup),
            ("Results", markdown_table(columns, rows)),
            ("Export checks", "\n".join(f"- {note}" for note in notes)),
        ],
    )


if __name__ == "__main__":
    main()
