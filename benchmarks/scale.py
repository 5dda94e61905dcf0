"""Memory at scale: the weight-only ``analyze`` (scale.md), the budget method
(scale_budget.md) and RMT-KD's cuts (scale_rmt_kd.md) on the default model, streamed from its
checkpoint against the in-memory path, each in a fresh process.

Writes ``benchmarks/results/scale.md``. Each variant runs in its own Python process (so one
cannot inherit the other's memory), which measures its resident-memory peak over the analysis
with :func:`laserrmt.evaluate.track_peak_memory` (the kernel's ``VmHWM``, reset on entry: the
peak of the whole process, imported libraries included) and writes its records; the parent
checks that both variants' records agree.

    python -m benchmarks.scale                  # all three (about 20 minutes)
    python -m benchmarks.scale --budget-only    # the budget method alone
    python -m benchmarks.scale --rmt-kd-only    # RMT-KD's cuts alone
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import write_result
from laserrmt.report.html import markdown_table

VARIANTS = ("in-memory", "streaming")
BUDGET_VARIANTS = ("budget in-memory", "budget streaming")
BUDGET_ARGS = ["compress", "--method", "budget", "--target-params", "0.2", "--no-eval", "-q"]
RMT_KD_ARGS = ["compress", "--method", "rmt-kd", "--steps-per-cut", "0", "--no-eval", "-q"]
#: Each measured CLI call. In memory, RMT-KD gets a tolerance no cut exceeds: the stream never
#: reverts a cut, so both make the same cuts and the memory compares the same work.
CLI_VARIANTS = {
    "budget in-memory": BUDGET_ARGS,
    "budget streaming": [*BUDGET_ARGS, "--stream"],
    "rmt-kd in-memory": [*RMT_KD_ARGS, "--tolerance", "1000"],
    "rmt-kd streaming": [*RMT_KD_ARGS, "--stream"],
}
RMT_KD_VARIANTS = ("rmt-kd in-memory", "rmt-kd streaming")
MIB = 2**20


def run_variant(variant: str, out: Path) -> None:
    """One measured run (in a child process): analyse the default model, write the numbers."""
    from laserrmt.analyze import analyze_checkpoint, analyze_model
    from laserrmt.evaluate import track_peak_memory
    from laserrmt.models.checkpoint import open_checkpoint
    from laserrmt.models.loading import load_model

    start = time.perf_counter()
    with track_peak_memory() as peak:
        if variant == "streaming":
            result, source = analyze_checkpoint(open_checkpoint(None), progress=False)
        else:
            loaded = load_model(None)
            result = analyze_model(loaded.model, progress=False)
            source = loaded.source
    seconds = time.perf_counter() - start
    out.write_text(
        json.dumps(
            {
                "variant": variant,
                "source": source,
                "start_bytes": peak["start_bytes"],
                "peak_bytes": peak["peak_bytes"],
                "peak_source": peak["source"],
                "seconds": seconds,
                "records": result.to_json(),
            }
        )
    )


def run_cli_variant(variant: str, out: Path, model: str | None, text: str | None) -> None:
    """One measured compression (in a child process): the CLI call of ``variant``, on ``model``
    (a folder; ``None``: the default model) with ``text`` as its calibration data if given."""
    from laserrmt.cli import main as cli
    from laserrmt.evaluate import track_peak_memory

    command, *options = CLI_VARIANTS[variant]
    options += ["--calibration-data", text] if text else []
    folder = out.with_suffix(".model")
    start = time.perf_counter()
    with track_peak_memory() as peak:
        code = cli(
            [command, *([model] if model else []), *options, "--out", str(folder), "--overwrite"]
        )
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{variant} failed with exit code {code}")
    widths = folder / "width_plan.json"
    out.write_text(
        json.dumps(
            {
                "variant": variant,
                "start_bytes": peak["start_bytes"],
                "peak_bytes": peak["peak_bytes"],
                "seconds": seconds,
                "folder": str(folder),
                "plan": (json.loads((folder / "laserrmt.json").read_text())["plan"] or {}).get(
                    "modules"
                ),
                "widths": json.loads(widths.read_text())["sites"] if widths.is_file() else None,
            }
        )
    )


def _largest_tensor_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between the two folders' tensors (inf if their names or
    shapes differ)."""
    from laserrmt.surgery.shards import WeightFiles

    left, right = dict(WeightFiles(a).tensors()), dict(WeightFiles(b).tensors())
    if left.keys() != right.keys() or any(left[k].shape != right[k].shape for k in left):
        return math.inf
    return max(float((left[k].double() - right[k].double()).abs().max()) for k in left)


def _child(
    variant: str, out: Path, model: str | None = None, text: str | None = None
) -> dict[str, Any]:
    """``variant`` in a fresh process (``model``, ``text``: see :func:`run_cli_variant`)."""
    options = [
        *(["--model", model] if model else []),
        *(["--calibration-data", text] if text else []),
    ]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.scale",
            "--variant",
            variant,
            "--out",
            str(out),
            *options,
        ],
        check=True,
        env=os.environ | {"TOKENIZERS_PARALLELISM": "false"},
    )
    run = json.loads(out.read_text())
    print(f"{variant}: peak {run['peak_bytes'] / MIB:.0f} MiB, {run['seconds']:.1f} s", flush=True)
    return run


def budget_section(tmp: Path) -> str:
    """The budget method at 20 %: in memory against streamed, same run, fresh processes."""
    runs = {v: _child(v, tmp / f"{v.replace(' ', '-')}.json") for v in BUDGET_VARIANTS}
    reference, streamed = runs["budget in-memory"], runs["budget streaming"]
    rows = [
        (
            variant,
            f"{run['start_bytes'] / MIB:.0f}",
            f"{run['peak_bytes'] / MIB:.0f}",
            f"{run['seconds']:.0f}",
            f"{run['seconds'] / reference['seconds']:.2f}",
        )
        for variant, run in runs.items()
    ]
    same_plan = streamed["plan"] == reference["plan"]
    ranks = [
        f"{name} {streamed['plan'].get(name)} against {decision}"
        for name, decision in reference["plan"].items()
        if streamed["plan"].get(name) != decision
    ]
    difference = _largest_tensor_difference(Path(reference["folder"]), Path(streamed["folder"]))
    table = markdown_table(
        ("variant", "resident at start MiB", "peak MiB", "seconds", "time / in-memory"), rows
    )
    return (
        f"`laserrmt {' '.join(BUDGET_ARGS)} [--stream] --out DIR` (16 calibration windows of "
        "512 tokens, Fisher importance on 4 windows, SVD-LLM whitening, float32 on the CPU, "
        "no evaluation: the perplexity of the same plan is in sequential.md and lowrank.md). "
        "In memory: the whole float32 model, calibration block by block, factors spilled to "
        "disk. Streaming: one block of weights in memory, the windows carried between blocks, "
        "each tensor written to the output's shard when it is cut. Peak: VmHWM of the whole "
        "process over the CLI call, each variant in a fresh process.\n\n"
        + table
        + f"\n\nPeak ratio in-memory / streaming: "
        f"{reference['peak_bytes'] / streamed['peak_bytes']:.2f}. The streamed plan equals the "
        f"in-memory plan: {same_plan}"
        + (f" (ranks streamed against in memory: {'; '.join(ranks)})" if ranks else "")
        + f"; largest difference between the two folders' tensors: {difference:.1e}."
    )


def rmt_kd_section(tmp: Path, model: str | None, text: str | None) -> str:
    """RMT-KD's cuts without distillation: in memory against streamed, fresh processes."""
    runs = {v: _child(v, tmp / f"{v.replace(' ', '-')}.json", model, text) for v in RMT_KD_VARIANTS}
    reference, streamed = runs["rmt-kd in-memory"], runs["rmt-kd streaming"]
    rows = [
        (
            variant,
            f"{run['start_bytes'] / MIB:.0f}",
            f"{run['peak_bytes'] / MIB:.0f}",
            f"{run['seconds']:.0f}",
            f"{run['seconds'] / reference['seconds']:.2f}",
            sum(site["width"] - site["kept_width"] for site in run["widths"]),
        )
        for variant, run in runs.items()
    ]

    def widths(run: dict[str, Any]) -> list[tuple[str, int, list[int] | None]]:
        return [(s["site"], s["kept_width"], s.get("kept")) for s in run["widths"]]

    same = widths(streamed) == widths(reference)
    difference = _largest_tensor_difference(Path(reference["folder"]), Path(streamed["folder"]))
    columns = (
        "variant",
        "resident at start MiB",
        "peak MiB",
        "seconds",
        "time / in-memory",
        "MLP units removed",
    )
    in_memory = " ".join(CLI_VARIANTS["rmt-kd in-memory"])
    return (
        f"`laserrmt {in_memory} --out DIR` against `laserrmt {' '.join(RMT_KD_ARGS)} --stream "
        "--out DIR` (every MLP site; 24 calibration and 8 validation windows of 256 tokens "
        "from the same recipe; float32 on the CPU; no distillation: the stream has none, and "
        "the in-memory tolerance is one no cut exceeds, so both keep every cut the rank rule "
        "makes). In memory: the whole float32 model, a copy of it per cut, every site's "
        "statistics from a forward pass of the whole model, the validation metric after each "
        "cut. Streaming: one block of weights in memory, the windows carried through the cut "
        "blocks, each block written to the output's shard once cut. Peak: VmHWM of the whole "
        "process over the CLI call, each variant in a fresh process.\n\n"
        + markdown_table(columns, rows)
        + f"\n\nPeak ratio in-memory / streaming: "
        f"{reference['peak_bytes'] / streamed['peak_bytes']:.2f}. The streamed widths and kept "
        f"units equal the in-memory ones: {same}; largest difference between the two folders' "
        f"tensors: {difference:.1e}."
    )


def _max_relative_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """The largest relative difference between two runs' numeric record fields."""
    if [r["module"] for r in a] != [r["module"] for r in b]:
        return math.inf
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            other = y.get(key)
            if isinstance(value, int | float) and isinstance(other, int | float):
                scale = max(abs(float(value)), abs(float(other)), 1e-300)
                worst = max(worst, abs(float(value) - float(other)) / scale)
            elif value != other:
                return math.inf
    return worst


SIBLINGS = (
    "- [scale_budget.md](scale_budget.md): the budget method, in memory against streamed "
    "(`--budget-only`).\n"
    "- [scale_rmt_kd.md](scale_rmt_kd.md): RMT-KD's cuts, in memory against streamed "
    "(`--rmt-kd-only`).\n"
    "- [scale_7b.md](scale_7b.md): a Llama-2-7B-shaped model with 2 and 4 blocks, `analyze` and "
    "the budget method (`python -m benchmarks.scale_7b`).\n"
    "- GPU: each of these runs on the CPU; on a machine with CUDA the `gpu` tests run the "
    "pipeline there (none was at hand for these files)."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=(*VARIANTS, *CLI_VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--budget-only", action="store_true", help="only the budget comparison (scale_budget.md)"
    )
    parser.add_argument(
        "--rmt-kd-only",
        action="store_true",
        help="only RMT-KD's cuts, in memory against streamed (scale_rmt_kd.md)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="with --rmt-kd-only: a model folder for a quick check of the script on a small "
        "model (default: the default model)",
    )
    parser.add_argument(
        "--calibration-data", default=None, help="with --model: the calibration text file"
    )
    args = parser.parse_args()
    if args.variant in CLI_VARIANTS:
        run_cli_variant(args.variant, args.out, args.model, args.calibration_data)
        return
    if args.variant:
        run_variant(args.variant, args.out)
        return
    from laserrmt.models.loading import default_model_folder

    if not args.model:
        default_model_folder()  # convert the GGUF once, outside the measured runs
    if not args.rmt_kd_only:
        with tempfile.TemporaryDirectory() as tmp:
            section = budget_section(Path(tmp))
        path = write_result(
            "scale_budget",
            "Budget method: streamed against in memory",
            [("Budget method at 20 % on the default model", section)],
        )
        print(f"wrote {path}")
    if not args.budget_only:
        with tempfile.TemporaryDirectory() as tmp:
            section = rmt_kd_section(Path(tmp), args.model, args.calibration_data)
        path = write_result(
            "scale_rmt_kd",
            "RMT-KD: streamed against in memory",
            [("RMT-KD's cuts on the default model", section)],
        )
        print(f"wrote {path}")
    if args.budget_only or args.rmt_kd_only:
        return
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            runs[variant] = _child(variant, Path(tmp) / f"{variant}.json")
    memory, streaming = runs["in-memory"], runs["streaming"]
    difference = _max_relative_difference(memory["records"], streaming["records"])
    rows = [
        (
            variant,
            f"{runs[variant]['start_bytes'] / MIB:.0f}",
            f"{runs[variant]['peak_bytes'] / MIB:.0f}",
            f"{runs[variant]['seconds']:.1f}",
            len(runs[variant]["records"]),
        )
        for variant in VARIANTS
    ]
    protocol = (
        f"`laserrmt analyze` without `--whiten` on the default model ({memory['source']}; its "
        "float32 safetensors cache, converted once before the runs), every target matrix (heads "
        "excluded), threshold mp. **in-memory**: `load_model` builds the whole float32 model, then "
        "`analyze_model` decomposes each matrix. **streaming**: `open_checkpoint` reads the "
        "safetensors header, the model is built on the meta device (no weights), and each matrix "
        "is read from the file, decomposed in float64 and freed (`analyze_checkpoint`, what the "
        "CLI runs). Each variant runs in a fresh Python process, in-memory first; 'peak MiB' is "
        "the kernel's peak resident set (`VmHWM`, reset when the measurement starts, via "
        "`laserrmt.evaluate.track_peak_memory`) of the whole process, imported libraries "
        f"included ({memory['peak_source']}); 'resident at start' is the process before the "
        "measured span (Python, torch, transformers imported). 'seconds' is the wall time of "
        "the span (loading included). "
        "The machine is shared with other jobs: times carry their load."
    )
    columns = ("variant", "resident at start MiB", "peak MiB", "seconds", "matrices")
    results = markdown_table(columns, rows)
    results += (
        f"\n\nPeak ratio in-memory / streaming: {memory['peak_bytes'] / streaming['peak_bytes']:.2f}. "
        f"Largest relative difference between the two runs' records: {difference:.1e} "
        "(identical records give 0)."
    )
    path = write_result(
        "scale",
        "Memory at scale: streaming against in-memory",
        [
            ("Protocol", protocol),
            ("Weight-only analysis of the default model", results),
            ("The other scale measurements", SIBLINGS),
        ],
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
