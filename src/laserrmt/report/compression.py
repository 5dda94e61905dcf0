"""The report of a compression run: before/after table, per-module decisions, loop trace, figures."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from laserrmt.data.text import PROTOCOL_NAME
from laserrmt.report.html import Report, Table, markdown_table
from laserrmt.report.plots import plot_block_role_heatmap

#: (label, key, better) rows of the before/after table; better is "lower" or "higher".
COMPARISON_ROWS = (
    ("perplexity (evaluation split)", "perplexity", "lower"),
    ("parameters (total)", "params_total", "lower"),
    ("parameters (target matrices)", "params_targets", "lower"),
    ("weights size (bytes)", "size_bytes", "lower"),
    ("prefill 128 tokens (ms, median)", "prefill_ms", "lower"),
    ("decode (tokens/s, median)", "decode_tokens_per_s", "higher"),
    ("peak memory (bytes)", "peak_memory_bytes", "lower"),
)


def comparison_rows(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[list[Any]]:
    """Rows of ``metric | before | after | after/before`` for the metrics both runs have."""
    rows = []
    for label, key, _ in COMPARISON_ROWS:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        ratio = a / b if b else float("nan")
        rows.append([label, b, a, f"{ratio:.3f}×"])
    return rows


def comparison_markdown(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    return markdown_table(
        ("metric", "before", "after", "after/before"), comparison_rows(before, after)
    )


def plot_loop_trace(
    steps: list[dict[str, Any]], reference: float, objective: str, path: Path
) -> Path:
    """Objective after each candidate; accepted changes filled, reverted ones hollow."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    xs = range(1, len(steps) + 1)
    values = [s["objective"] for s in steps]
    ax.plot(xs, values, color="#999", lw=0.8)
    for x, s in zip(xs, steps, strict=True):
        ax.scatter(
            x,
            s["objective"],
            s=22,
            facecolor="#55a868" if s["accepted"] else "none",
            edgecolor="#55a868" if s["accepted"] else "#c44e52",
        )
    ax.axhline(reference, color="#4c72b0", ls="--", lw=1, label="original model")
    ax.set_xlabel("candidate (in score order)")
    ax.set_ylabel(objective + " (calibration)")
    ax.set_title("selection loop: filled = kept, hollow = reverted", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_healing(healing: Mapping[str, Any], path: Path) -> Path:
    """The loss of every healing step, its moving average, and the learning rate."""
    losses = healing["losses"]
    steps = range(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    ax.plot(steps, losses, color="#bbb", lw=0.8, label="step")
    ax.plot(steps, healing["running"], color="#4c72b0", lw=1.4, label="moving average")
    ax.set_xlabel("step")
    ax.set_ylabel("KL to the original model (calibration)")
    ax.legend(fontsize=8, loc="upper right")
    lr_axis = ax.twinx()
    lr_axis.plot(steps, healing["lrs"], color="#dd8452", lw=1, ls="--")
    lr_axis.set_ylabel("learning rate", color="#dd8452")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def healing_summary(healing: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Report lines of a healing run: what trained, for how long, and the KL before and after."""
    lora = f" (adapters of rank {healing['lora_rank']})" if healing.get("lora_rank") else ""
    return [
        (
            "healing",
            f"{healing['steps']} steps of {healing['accumulate']} × {healing['batch_size']} "
            f"windows, {healing['tokens']:,} tokens, {healing['params']}{lora}: "
            f"{healing['trainable_parameters']:,} trainable parameters",
        ),
        (
            "healing learning rate",
            f"{healing['schedule']}, peak {healing['lr']:g}, warm-up {healing['warmup_steps']} steps",
        ),
        (
            "healing KL (first → last step)",
            f"{healing['loss_first']:.4f} → {healing['loss_last']:.4f}",
        ),
    ]


def _text_name(data: Mapping[str, Any] | None, split: str) -> str:
    """A user's text (a TextSource record) or the pinned protocol's split, as reports name it."""
    if data is None:
        return f"the pinned protocol's {split} split ({PROTOCOL_NAME})"
    return f"your data {data['path']} ({data['format']}, SHA-256 {data['sha256'][:12]}…)"


def _evaluation_text(after: Mapping[str, Any]) -> str:
    protocol = after.get("protocol") or {}
    if protocol.get("name") == "user-data":
        return _text_name(protocol["data"], "evaluation")
    if protocol.get("name") == PROTOCOL_NAME:
        return _text_name(None, "evaluation")
    return f"{protocol.get('name', 'unnamed')} windows"


def compression_report(
    *,
    source: str,
    result: Mapping[str, Any],
    plan_rows: list[dict[str, Any]],
    analysis_records: list[dict[str, Any]],
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    folder: Path,
) -> Report:
    """Build the report of one run; figures are written into ``folder``."""
    settings = result["settings"]
    summary = result["plan_summary"]
    report = Report(f"laserrmt compress — {source}")
    report.summary = [
        ("model", source),
        (
            "method",
            f"{settings['method']} ({settings['select']}, threshold {settings['threshold']}, mode {settings['mode']})",
        ),
        (
            "target parameters removed",
            f"{summary['params_removed']:,} of {summary['params_before']:,} "
            f"({summary['params_removed'] / max(1, summary['params_before']):.1%})",
        ),
        ("modules", ", ".join(f"{k} {v}" for k, v in summary["modes"].items())),
        ("calibration text", _text_name(settings.get("calibration_data"), "calibration")),
    ] + [(f"time: {k}", f"{v:.1f} s") for k, v in result["timings"].items()]
    healing = result.get("healing")
    if healing:
        report.summary += healing_summary(healing)
        report.figures.append(
            ("Healing: loss and learning rate", plot_healing(healing, folder / "healing.png"))
        )
    if settings.get("reproduce_laserrmt"):
        report.notes.append(
            "Reproduction of the original laserRMT recipe (IQR noise rule, 15 lowest-SNR "
            "candidates, dense reconstruction, strict improvement), but decided on calibration "
            "text: the evaluation split is never used for decisions."
        )
    if before and after:
        report.tables.append(
            Table(
                "Before and after",
                ("metric", "before", "after", "after/before"),
                comparison_rows(before, after),
                note=f"Perplexity on {_evaluation_text(after)}; latency is the median of "
                "repeated runs after a warm-up, measured in this run on this machine.",
            )
        )
    if result.get("loop"):
        steps = result["loop"]
        report.tables.append(
            Table(
                "Selection loop",
                ("module", "rank", "of", "mode", "objective", "kept", "params removed", "s"),
                [
                    [
                        s["module"],
                        s["rank"],
                        s["rank_full"],
                        s["mode"],
                        s["objective"],
                        "yes" if s["accepted"] else "reverted",
                        s["params_removed"],
                        s["seconds"],
                    ]
                    for s in steps
                ],
            )
        )
        ref = result.get("objective_reference")
        if ref is not None:
            report.figures.append(
                (
                    "Selection loop trace",
                    plot_loop_trace(steps, ref, settings["objective"], folder / "loop.png"),
                )
            )
    report.tables.append(
        Table(
            "Per-module decisions",
            ("module", "shape", "rank", "of", "mode", "params before", "params after", "reason"),
            [
                [
                    r["module"],
                    r["shape"],
                    r["rank"],
                    r["rank_full"],
                    r["mode"],
                    r["params_before"],
                    r["params_after"],
                    r["reason"],
                ]
                for r in plan_rows
            ],
        )
    )
    decided = {r["module"]: r for r in plan_rows}
    records = [
        r
        | {
            "kept_fraction": (
                decided[r["module"]]["rank"]
                if decided[r["module"]]["mode"] != "keep"
                else r["rank_full"]
            )
            / r["rank_full"]
        }
        for r in analysis_records
        if r["module"] in decided
    ]
    heat = plot_block_role_heatmap(
        records,
        "kept_fraction",
        folder / "heatmap_kept.png",
        title="fraction of rank kept after compression",
        cmap="magma",
    )
    if heat is not None:
        report.figures.append(("Fraction of rank kept (1 = unchanged)", heat))
    return report
