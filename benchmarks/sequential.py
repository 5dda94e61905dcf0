"""Less damage at the same budget: error-compensated sequential factorization, block refinement
and low rank + sparse, on the default model through the streaming pipeline.

For each budget, the plain streamed budget method (identical to the in-memory method: same
plan, same outputs, a test checks it) decides the ranks; the other rows replay that plan with
``compensate`` (each block refitted on the compressed model's inputs), then with block
refinement, then with a sparse share, so that every row has exactly the same ranks budget.
Perplexity under the pinned protocol (carried through the blocks) and on Shakespeare (a domain
never used for calibration; the saved folder loaded and evaluated). Writes
``benchmarks/results/sequential.md``.

With ``--heal-steps N`` each row's saved folder is also healed (distillation towards the dense
model's top-64 next-token distribution on calibration windows, the healing defaults of
``compress``) and measured again as its own row.

    python -m benchmarks.sequential [--ratios 0.2 0.4] [--refine-steps 32] [--heal-steps 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, merge_result
from laserrmt.data.text import (
    PROTOCOL,
    calibration_windows,
    evaluation_windows,
    shakespeare_windows,
)
from laserrmt.evaluate import perplexity, track_peak_memory
from laserrmt.methods.heal import heal, healing_teacher
from laserrmt.models.checkpoint import open_checkpoint
from laserrmt.models.loading import checkpoint_tokenizer, default_model_folder
from laserrmt.models.streaming import BlockStream
from laserrmt.report.html import markdown_table
from laserrmt.sequential import compress_streaming
from laserrmt.surgery.io import load, write_compressed

RAW = RESULTS / "sequential.json"
CALIBRATION_WINDOWS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--refine-steps", type=int, default=32)
    parser.add_argument("--refine-lr", type=float, default=1e-4)
    parser.add_argument("--sparse-share", type=float, default=0.2)
    parser.add_argument("--shakespeare-windows", type=int, default=16)
    parser.add_argument(
        "--calibration-windows",
        type=int,
        default=CALIBRATION_WINDOWS,
        help="windows of 512 tokens for the plan, the fits and refinement (rows say so if not 16)",
    )
    parser.add_argument("--heal-steps", type=int, default=0)
    parser.add_argument(
        "--heal-variants",
        type=int,
        nargs="+",
        help="the variants' positions to heal (default: all)",
    )
    parser.add_argument(
        "--variants", type=int, nargs="+", help="the variants' positions to run (default: all)"
    )
    parser.add_argument(
        "--append", action="store_true", help="keep the rows of the last run (sequential.json)"
    )
    args = parser.parse_args()

    folder = default_model_folder()
    tokenizer = checkpoint_tokenizer(folder)
    calibration = calibration_windows(tokenizer, n_windows=args.calibration_windows)
    more = args.calibration_windows != CALIBRATION_WINDOWS
    data = f", {args.calibration_windows} calibration windows" if more else ""
    evaluation = evaluation_windows(tokenizer, n_windows=PROTOCOL["n_windows"])
    shakespeare = shakespeare_windows(tokenizer, n_windows=args.shakespeare_windows)
    variants: list[tuple[str, dict[str, Any]]] = [
        (f"budget (plain, = in-memory{data})", {}),
        (f"+ sequential compensation{data}", {"compensate": True}),
        (
            f"+ block refinement ({args.refine_steps} steps{data})",
            {"compensate": True, "refine_steps": args.refine_steps, "refine_lr": args.refine_lr},
        ),
        (
            f"+ sparse share {args.sparse_share:g}{data}",
            {
                "compensate": True,
                "refine_steps": args.refine_steps,
                "refine_lr": args.refine_lr,
                "sparse_share": args.sparse_share,
            },
        ),
    ]
    healed_labels = {variants[i][0] for i in args.heal_variants or range(len(variants))}
    if args.variants:
        variants = [variants[i] for i in args.variants]
    healing = healing_inputs(folder, tokenizer, args.heal_steps) if args.heal_steps else None
    rows: list[list[Any]] = []
    dense: dict[str, float] = {}
    if args.append and RAW.is_file():
        previous = json.loads(RAW.read_text())
        rows, dense = previous["rows"], previous["dense"]
    for ratio in args.ratios:
        plan = None
        for label, options in variants:
            stream = BlockStream(open_checkpoint(folder))
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                with track_peak_memory() as peak:
                    result = compress_streaming(
                        stream,
                        calibration,
                        out,
                        target_params=ratio,
                        evaluation=evaluation,
                        plan=plan,
                        progress=False,
                        **options,
                    )
                seconds = time.perf_counter() - start
                write_compressed(stream.model, out, plan=result.plan, weights_written=True)
                model, _ = load(out)
                shk = perplexity(model, shakespeare, progress=False).perplexity
                heals = label in healed_labels
                if healing is not None and heals:
                    healed = healed_row(model, healing, evaluation, shakespeare, args.heal_steps)
                del model
            if plan is None:
                plan = result.plan
                assert result.perplexity_before is not None
                dense["pinned"] = result.perplexity_before.perplexity
            if "shakespeare" not in dense:
                dense_model, _ = load_dense(folder)
                dense["shakespeare"] = perplexity(
                    dense_model, shakespeare, progress=False
                ).perplexity
                del dense_model
            assert result.perplexity_after is not None
            refined = [r for r in result.refinement if r]
            rows.append(
                [
                    f"{ratio:.0%}",
                    label,
                    f"{result.perplexity_after.perplexity:.2f}",
                    f"{shk:.2f}",
                    f"{result.weight_bytes / 2**20:.1f}",
                    f"{seconds:.0f}",
                    f"{peak['peak_bytes'] / 2**20:.0f}",
                    (
                        f"{sum(r['error_after'] / r['error_before'] for r in refined) / len(refined):.2f}"
                        if refined
                        else ""
                    ),
                ]
            )
            print(rows[-1], flush=True)
            if healing is not None and heals:
                pinned, shk, *rest = healed
                rows.append(
                    [
                        f"{ratio:.0%}",
                        f"{label} + healing ({args.heal_steps} steps)",
                        pinned,
                        shk,
                        rows[-1][4],
                        *rest,
                    ]
                )
                print(rows[-1], flush=True)
            write(rows, dense, args)


def healing_inputs(folder: Path, tokenizer: Any, steps: int) -> tuple[torch.Tensor, Any]:
    """The healing windows (one per step, from the calibration split) and the dense model's
    top-k cache on them, computed once for every row."""
    windows = calibration_windows(tokenizer, n_windows=steps, at_most=True)
    dense_model, _ = load_dense(folder)
    teacher = healing_teacher(dense_model, windows)
    del dense_model
    return windows, teacher


def healed_row(
    model: Any,
    healing: tuple[torch.Tensor, Any],
    evaluation: torch.Tensor,
    shakespeare: torch.Tensor,
    steps: int,
) -> list[str]:
    """Heal ``model`` in place; the row's perplexities, seconds and peak (the healing's own)."""
    windows, teacher = healing
    start = time.perf_counter()
    with track_peak_memory() as peak:
        heal(model, teacher, windows, steps=steps, progress=False)
    seconds = time.perf_counter() - start
    pinned = perplexity(model, evaluation, progress=False).perplexity
    shk = perplexity(model, shakespeare, progress=False).perplexity
    return [
        f"{pinned:.2f}",
        f"{shk:.2f}",
        f"{seconds:.0f} (healing)",
        f"{peak['peak_bytes'] / 2**20:.0f}",
        "",
    ]


def load_dense(folder: Path) -> Any:
    from laserrmt.models.loading import load_model

    loaded = load_model(folder)
    return loaded.model, loaded.tokenizer


def write(rows: list[list[Any]], dense: dict[str, float], args: argparse.Namespace) -> None:
    rows.sort(key=lambda row: float(row[0].rstrip("%")))  # appended rows join their budget
    RAW.write_text(json.dumps({"rows": rows, "dense": dense}, indent=1) + "\n")
    table = markdown_table(
        (
            "removed",
            "variant",
            "perplexity (pinned)",
            "Shakespeare",
            "weights MiB",
            "seconds",
            "peak MiB",
            "block error after / before refinement (mean)",
        ),
        rows,
    )
    protocol = (
        "Default model (SmolLM2-135M, float32 safetensors cache), streamed one block at a time "
        f"on the CPU; {CALIBRATION_WINDOWS} calibration windows of 512 tokens (pinned calibration "
        "split, seed 0; rows that say otherwise used more), "
        "Fisher importance on 4, SVD-LLM whitening, global allocation of the share of block "
        "parameters removed. The plain row decides the ranks; the other rows replay its plan "
        "(same ranks) with: sequential compensation (each block's factors refitted on the "
        "inputs the already-compressed blocks produce, to reproduce the dense outputs: "
        "`compensated_svd`); block refinement (Adam on the block's factors and norm scales "
        f"towards the dense block's outputs, {args.refine_steps} steps of one window, lr "
        f"{args.refine_lr:g}, kept only if the block's error drops); a sparse share "
        f"({args.sparse_share:g} of each factorized matrix's parameters spent on the largest "
        "activation-weighted residual entries, indices counted). Perplexity: the pinned "
        "protocol (32 windows of the evaluation split, carried through the blocks) and the "
        f"first {args.shakespeare_windows} Shakespeare windows (the saved folder loaded whole). "
        "'seconds' and 'peak MiB' (VmHWM of the process over the compression) are per row; "
        "replayed rows skip the Fisher and statistics passes. Rows marked 'healing (N steps)' "
        "are the row above, saved, loaded and healed (distillation towards the dense model's "
        "top-64 next-token distribution on one calibration window of 512 tokens a step, "
        "factors and norm scales, lr 3e-4 with warm-up and cosine: the defaults of "
        "`compress`); their seconds and peak are the healing's own. "
        f"Dense: {dense.get('pinned', float('nan')):.2f} pinned, "
        f"{dense.get('shakespeare', float('nan')):.2f} Shakespeare."
    )
    merge_result(  # keeps the notes written by hand under their own heading
        "sequential",
        "Sequential compensation, block refinement and low rank + sparse",
        [("Protocol", protocol), ("Results", table)],
        ("Protocol", "Results"),
    )


if __name__ == "__main__":
    main()
