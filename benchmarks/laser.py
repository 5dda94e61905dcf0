"""LaserRMT on the default model: dense baseline, the laserRMT reproduction, one-shot RMT plans in
both modes, and the selection loop. Writes ``benchmarks/results/laser.md``.

Every configuration starts from a fresh copy of the same model; the dense model's latency is
measured again beside each compressed one, so every ratio compares two runs taken together.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.common import write_result
from laserrmt.data.text import PROTOCOL, evaluation_windows
from laserrmt.evaluate import count_parameters, measure_latency, perplexity
from laserrmt.models.loading import default_model_folder, load_model
from laserrmt.models.targets import find_targets
from laserrmt.pipeline import CompressSettings, compress
from laserrmt.report.html import markdown_table


def configurations(quick: bool) -> list[tuple[str, CompressSettings]]:
    loop_candidates = 12 if quick else 24
    return [
        (
            "laserRMT reproduction (IQR rule, 15 lowest SNR, denoise, strict)",
            CompressSettings.reproduce_laserrmt_preset(calibration_windows=4),
        ),
        ("one-shot MP, factorize", CompressSettings(threshold="mp", mode="factorize")),
        ("one-shot MP, denoise", CompressSettings(threshold="mp", mode="denoise")),
        ("one-shot Gavish–Donoho, factorize", CompressSettings(threshold="gd", mode="factorize")),
        (
            f"loop MP, factorize, KL ≤ 0.02, {loop_candidates} lowest-SNR candidates",
            CompressSettings(
                threshold="mp",
                mode="factorize",
                select="loop",
                objective="kl",
                tolerance=0.02,
                max_candidates=loop_candidates,
                calibration_windows=4,
            ),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer windows and candidates")
    args = parser.parse_args()
    if args.quick:
        args.eval_windows, args.repeats = 4, 3

    folder = default_model_folder()
    dense = load_model(folder)
    windows = evaluation_windows(dense.tokenizer, n_windows=args.eval_windows)
    targets = [t.name for t in find_targets(dense.model)]
    dense_ppl = perplexity(dense.model, windows).perplexity
    dense_params = count_parameters(dense.model, targets)["params_targets"]

    rows: list[list[Any]] = [["dense", dense_ppl, 0, "0.0 %", 0.0, 1.0, 1.0]]

    def write() -> Path:
        table = markdown_table(
            (
                "configuration",
                "eval perplexity",
                "target params removed",
                "removed %",
                "compression s",
                "prefill speed-up",
                "decode speed-up",
            ),
            rows,
        )
        protocol = (
            f"Model: SmolLM2-135M-Instruct (dequantized Q4_1 GGUF, fp32), {len(targets)} target "
            f"matrices holding {dense_params:,} parameters. Perplexity: pinned protocol "
            f"{PROTOCOL['name']}, first {args.eval_windows} evaluation windows of 512 tokens. "
            "Loop decisions use calibration windows only (seed 0). Speed-ups are dense time / "
            f"compressed time (prefill 128 tokens; decode 32 tokens, batch 1), medians of "
            f"{args.repeats} runs after a warm-up, dense and compressed measured back to back."
        )
        path = write_result(
            "laser", "LaserRMT on SmolLM2-135M", [("Protocol", protocol), ("Results", table)]
        )
        return path

    for label, settings in configurations(args.quick):
        copy = load_model(folder)
        start = time.perf_counter()
        model, _ = compress(copy.model, copy.tokenizer, settings=settings)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, windows).perplexity
        params = count_parameters(model, targets)["params_targets"]
        removed = dense_params - params
        # Side by side: dense then compressed, same repeats, medians.
        lat_dense = measure_latency(dense.model, repeats=args.repeats)
        lat_comp = measure_latency(model, repeats=args.repeats)
        rows.append(
            [
                label,
                ppl,
                removed,
                f"{removed / dense_params:.1%}",
                seconds,
                lat_dense.prefill_ms / lat_comp.prefill_ms,
                lat_comp.decode_tokens_per_s / lat_dense.decode_tokens_per_s,
            ]
        )
        print(rows[-1], flush=True)
        write()  # after every row: a stopped run keeps what it measured
        del model, copy

    print(write())


if __name__ == "__main__":
    main()
