"""Healing defaults chosen on the calibration split only: learning rate × trainable set.

The calibration split's windows are drawn once (seed 0) and cut in two disjoint parts: the
first ``--train-windows`` heal, the last ``--held-out-windows`` judge. The model is compressed
once (budget method); every setting then heals a copy of it for the same steps on the same
windows, and is scored by its KL to the dense model on the held-out windows (the top-k loss
healing itself minimises). No evaluation text is read. Writes ``results/heal_sweep.md``.

    python benchmarks/heal_sweep.py                      # the default model, the full grid
    python benchmarks/heal_sweep.py --window 128 --steps 8 --lrs 1e-4 3e-4   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.common import write_result
from laserrmt.data.text import calibration_texts, token_windows
from laserrmt.distill import distillation_loss, teacher_top_k
from laserrmt.methods.heal import HEAL_PARAMS, heal, healing_teacher
from laserrmt.models.loading import default_model_folder, load_model
from laserrmt.pipeline import compress
from laserrmt.report.html import markdown_table


def held_out_kl(model: torch.nn.Module, windows: torch.Tensor, cache: list) -> float:
    """Mean KL per predicted position over the held-out windows (top-k cells and a tail)."""
    total = 0.0
    with torch.no_grad():
        for window, soft in zip(windows.split(1), cache, strict=True):
            logits = model(window, use_cache=False).logits[:, :-1]
            total += float(distillation_loss(logits, soft, None, alpha=0.0))
    return total / len(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model folder (default: the packaged one)")
    parser.add_argument("--target-params", type=float, default=0.2)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--train-windows", type=int, default=32)
    parser.add_argument("--held-out-windows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--params", nargs="+", default=list(HEAL_PARAMS))
    parser.add_argument("--importance", default="fisher")
    parser.add_argument("--top-k", type=int, default=64)
    args = parser.parse_args()

    loaded = load_model(args.model or default_model_folder())
    model, tok = loaded.model, loaded.tokenizer
    drawn = token_windows(
        tok,
        calibration_texts(),
        window=args.window,
        n_windows=args.train_windows + args.held_out_windows,
        seed=0,
        what="the calibration split",
    )
    train, held = drawn[: args.train_windows], drawn[args.train_windows :]
    teacher = healing_teacher(model, train, top_k=args.top_k)
    judge = teacher_top_k(model, list(held.split(1)), k=args.top_k)
    start = time.perf_counter()
    compress(
        model,
        tok,
        method="budget",
        target_params=args.target_params,
        importance=args.importance,
        calibration_windows=args.calibration_windows,
        window=args.window,
        progress=False,
    )
    compress_s = time.perf_counter() - start
    rows = [["none (no healing)", "-", f"{held_out_kl(model, held, judge):.4f}", "-", "-"]]
    print(rows[-1], flush=True)
    for params in args.params:
        for lr in args.lrs:
            student = copy.deepcopy(model)
            log = heal(
                student, teacher, train, steps=args.steps, lr=lr, params=params, progress=True
            )
            kl = held_out_kl(student, held, judge)
            rows.append(
                [params, f"{lr:g}", f"{kl:.4f}", f"{log['loss_last']:.4f}", f"{log['seconds']:.0f}"]
            )
            print(rows[-1], flush=True)
            del student
    best = min(rows[1:], key=lambda r: float(r[2]))
    table = markdown_table(
        ("trainable", "peak lr", "held-out KL", "last training KL", "healing s"), rows
    )
    write_result(
        "heal_sweep",
        "Healing defaults on the calibration split",
        [
            (
                "Protocol",
                f"{loaded.source}; budget method at {args.target_params:.0%} of the target "
                f"parameters removed (importance {args.importance}, {args.calibration_windows} "
                f"calibration windows, {compress_s:.0f} s). {args.train_windows} + "
                f"{args.held_out_windows} windows of {args.window} tokens drawn without "
                "replacement from the calibration split (seed 0): the first heal, the last "
                f"judge. Healing: {args.steps} steps of one window, cosine schedule with 5 % "
                f"warm-up, top-{args.top_k} teacher. No evaluation text was read.",
            ),
            ("Held-out KL", table),
            ("Best", f"{best[0]} at lr {best[1]}: held-out KL {best[2]}."),
        ],
    )


if __name__ == "__main__":
    main()
