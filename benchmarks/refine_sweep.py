"""Block refinement's settings judged on held-out calibration windows: steps × learning rate.

The calibration split's windows are drawn once (seed 0); the first ``--train-windows`` decide
the plan (the budget method, streamed) and are the refinement's steps, the last
``--held-out-windows`` only judge. The plan is replayed with sequential compensation over all
windows; at each of the first ``--blocks`` blocks every setting refines the same compensated
block (``laserrmt.sequential.refine_block``, the pipeline's own) from the same start and is
scored by the block's relative output error on the training and on the held-out windows, each
against its value before refinement; the block is then put back as it was. No evaluation text
is read. Writes ``results/refine_sweep.md``.

    python -m benchmarks.refine_sweep [--ratio 0.4] [--blocks 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

import laserrmt.sequential as sequential
from benchmarks.common import write_result
from laserrmt.data.text import calibration_windows
from laserrmt.models.checkpoint import open_checkpoint
from laserrmt.models.loading import checkpoint_tokenizer, default_model_folder
from laserrmt.models.streaming import BlockStream
from laserrmt.report.html import markdown_table

SETTINGS = ((32, 1e-4), (32, 3e-4), (32, 1e-3), (128, 1e-4), (128, 3e-4))


class _Enough(Exception):
    """Raised after the last block swept."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--train-windows", type=int, default=16)
    parser.add_argument("--held-out-windows", type=int, default=2)
    args = parser.parse_args()
    if min(args.train_windows, args.held_out_windows, args.blocks) < 1:
        parser.error("--train-windows, --held-out-windows and --blocks must be at least 1")

    folder = default_model_folder()
    windows = calibration_windows(
        checkpoint_tokenizer(folder), n_windows=args.train_windows + args.held_out_windows
    )
    train = list(range(args.train_windows))
    held = list(range(args.train_windows, len(windows)))
    refine = sequential.refine_block
    scores: dict[tuple[int, float], list[tuple[float, float, float]]] = {s: [] for s in SETTINGS}

    def error(runner: Any, index: int, block: Any, inputs: Sequence, targets: Sequence, ws):
        with torch.no_grad():
            num = sum(
                float((runner.call(index, block, w, inputs[w]) - targets[w]).square().sum())
                for w in ws
            )
            return num / sum(float(targets[w].square().sum()) for w in ws)

    def sweep(runner, index, block, inputs, targets, *, steps, lr):
        start = {k: v.clone() for k, v in block.state_dict().items()}
        base = [error(runner, index, block, inputs, targets, ws) for ws in (train, held)]
        for setting in SETTINGS:
            began = time.perf_counter()
            steps_, lr_ = setting
            refine(
                runner,
                index,
                block,
                inputs[: len(train)],
                targets[: len(train)],
                steps=steps_,
                lr=lr_,
            )
            seconds = time.perf_counter() - began
            now = [error(runner, index, block, inputs, targets, ws) for ws in (train, held)]
            scores[setting].append((now[0] / base[0], now[1] / base[1], seconds))
            block.load_state_dict(start)
            print(index, setting, scores[setting][-1], flush=True)
        return {}

    def stop(index: int) -> None:
        if index + 1 >= args.blocks:
            raise _Enough

    with tempfile.TemporaryDirectory() as out:
        plan = sequential.compress_streaming(
            BlockStream(open_checkpoint(folder)),
            windows[: len(train)],
            out,
            target_params=args.ratio,
            progress=False,
        ).plan
    sequential.refine_block = sweep  # the cut calls it once per block, after compensation
    try:
        with tempfile.TemporaryDirectory() as out:
            sequential.compress_streaming(
                BlockStream(open_checkpoint(folder)),
                windows,
                out,
                target_params=args.ratio,
                plan=plan,
                compensate=True,
                refine_steps=1,
                progress=False,
                on_block=stop,
            )
    except _Enough:
        pass
    finally:
        sequential.refine_block = refine

    rows = [
        (
            steps,
            f"{lr:g}",
            f"{statistics.mean(s[0] for s in scores[steps, lr]):.3f}",
            f"{statistics.mean(s[1] for s in scores[steps, lr]):.3f}",
            f"{statistics.mean(s[2] for s in scores[steps, lr]):.1f}",
        )
        for steps, lr in SETTINGS
    ]
    table = markdown_table(
        (
            "steps",
            "lr",
            "training windows: error after / before",
            "held-out windows: error after / before",
            "seconds per block",
        ),
        rows,
    )
    protocol = (
        f"Default model, budget method at {args.ratio:.0%} of the block parameters removed, "
        f"streamed; {args.train_windows} calibration windows of 512 tokens (seed 0) decide the "
        f"plan and are refined on, {args.held_out_windows} more are held out. The plan is "
        "replayed with sequential compensation (fitted on all windows); at each of the first "
        f"{args.blocks} blocks every setting runs `refine_block` (Adam, constant lr, one window "
        "a step, the refined parameters kept only if the training windows' error drops) from "
        "the same compensated block. Means over the blocks of the ratios of the block's "
        "relative output error after to before."
    )
    path = write_result(
        "refine_sweep",
        "Block refinement on held-out calibration windows",
        [("Protocol", protocol), ("Results", table)],
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
