"""``RUN_DIR/report.html`` from a monitored run, once or periodically while the run writes."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from laserrmt.errors import InvalidOptionError
from laserrmt.monitor.hook import PLAN_FILE
from laserrmt.monitor.run import (
    MonitorRun,
    advice_plan,
    detect_events,
    last_records,
    read_run,
    records_path,
)
from laserrmt.monitor.summary import WELL_TRAINED_ALPHA
from laserrmt.outputs import write_text_atomic
from laserrmt.report.html import Report, Table
from laserrmt.report.plots import plot_spectral_density

REPORT_FILE = "report.html"
# Spectrum figures: the modules with the most events, this many of them.
_SPECTRUM_MODULES = 3
# Lines per time-series panel before the legend is left out (it would cover the plot).
_LEGEND_LINES = 12

_SERIES = (
    ("n_tw", "Tracy–Widom-significant spikes"),
    ("alpha", "power-law α (well-trained: 2–6)"),
    ("spectral_entropy", "spectral entropy (dashed: MP noise)"),
    ("stable_rank", "stable rank"),
)


def _time_series(run: MonitorRun, folder: Path) -> list[tuple[str, Path]]:
    modules = run.modules()
    rows = run.weights()
    figures = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4), dpi=100)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.95, max(len(modules), 1)))
    for ax, (key, label) in zip(axes.flat, _SERIES, strict=True):
        for colour, module in zip(colours, modules, strict=True):
            points = [
                (r["step"], float(r[key]))
                for r in rows
                if r["module"] == module and r.get(key) is not None
            ]
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, marker=".", lw=1, color=colour, label=module)
        if key == "alpha":
            for bound in WELL_TRAINED_ALPHA:
                ax.axhline(bound, color="#999", ls=":", lw=1)
        if key == "spectral_entropy":
            for colour, module in zip(colours, modules, strict=True):
                noise = [
                    r["entropy_mp"] for r in rows if r["module"] == module and "entropy_mp" in r
                ]
                if noise:
                    ax.axhline(noise[0], color=colour, ls="--", lw=0.7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    if 0 < len(modules) <= _LEGEND_LINES:
        axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    path = folder / "series.png"
    fig.savefig(path)
    plt.close(fig)
    figures.append(("per-matrix time series (colour: position in the model)", path))
    if run.activations():
        path = folder / "activation_series.png"
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for colour, module in zip(colours, modules, strict=True):
            points = [
                (r["step"], r["n_mp"])
                for r in run.activations()
                if r["module"] == module and r.get("n_mp") is not None
            ]
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, marker=".", lw=1, color=colour, label=module)
        ax.set_title("activation directions above the MP edge (probe batch)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        figures.append(("activation spectra on the probe batch", path))
    return figures


def _spike_heatmap(run: MonitorRun, folder: Path) -> Path | None:
    modules = run.modules()
    steps = sorted({r["step"] for r in run.weights()})
    if not steps:
        return None
    grid = np.full((len(modules), len(steps)), np.nan)
    for r in run.weights():
        if r.get("n_tw") is not None:
            grid[modules.index(r["module"]), steps.index(r["step"])] = r["n_tw"]
    # A budget shards the matrices across steps: show each one's last value until its next.
    for row in grid:
        for j in range(1, len(steps)):
            if math.isnan(row[j]):
                row[j] = row[j - 1]
    fig, ax = plt.subplots(
        figsize=(min(12, 3 + 0.15 * len(steps)), 1.5 + 0.2 * len(modules)), dpi=100
    )
    image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).astype(int))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
    ax.set_yticks(range(len(modules)), modules, fontsize=6)
    ax.set_xlabel("step")
    ax.set_title("Tracy–Widom-significant spikes per matrix and step", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = folder / "spikes.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _spectra(
    run: MonitorRun, events: list[dict[str, Any]], steps: Sequence[int] | None, folder: Path
) -> list[tuple[str, Path]]:
    with_spectrum = [r for r in run.weights() if "singular_values" in r]
    if not with_spectrum:
        return []
    counts = {m: sum(e["module"] == m for e in events) for m in run.modules()}
    chosen = sorted(counts, key=lambda m: -counts[m])[:_SPECTRUM_MODULES]
    figures: list[tuple[str, Path]] = []
    for module in chosen:
        rows = [r for r in with_spectrum if r["module"] == module]
        if not rows:
            continue
        wanted = list(steps) if steps else [rows[0]["step"], rows[-1]["step"]]
        for step in dict.fromkeys(wanted):
            # The observation at or just before the step asked for (sharded runs skip steps).
            before = [r for r in rows if r["step"] <= step]
            if not before:
                continue
            r = before[-1]
            shape = (int(r["shape"][0]), int(r["shape"][1]))
            path = folder / f"esd_{len(figures)}.png"
            plot_spectral_density(
                np.asarray(r["singular_values"]),
                shape,
                float(r["sigma"]),
                path,
                title=f"{module} at step {r['step']}",
            )
            figures.append((f"{module}, step {r['step']}: spectrum and MP fit", path))
    return figures


def render_report(run_dir: str | os.PathLike[str], *, steps: Sequence[int] | None = None) -> Path:
    """Write ``report.html`` and ``advice_plan.json`` into the run folder; returns the report.

    ``steps`` chooses the steps whose spectra are drawn (default: first and last).
    """
    run = read_run(run_dir)
    folder = run.path.parent
    events = detect_events(run)
    plan = advice_plan(run)
    plan.save(folder / PLAN_FILE)
    last = last_records(run)
    state = "finished" if run.ended else "running or killed"
    report = Report(f"Spectral monitor: {run.header['model']}")
    report.summary += [
        ("run", str(folder)),
        ("state", state + (" (last line cut short and dropped)" if run.truncated else "")),
        ("matrices", len(run.modules())),
        ("steps recorded", len(run.steps())),
        ("last step", run.steps()[-1] if run.steps() else None),
        ("events", len(events)),
        (
            "advice plan",
            f"{PLAN_FILE}: {plan.params_removed():,} of "
            f"{plan.params_before():,} target parameters removed",
        ),
    ]
    report.notes.append(
        "Spikes: singular values above the Tracy–Widom edge (level "
        f"{run.header['settings']['alpha']}, σ by median matching). α: Martin & Mahoney's "
        "heavy-tail exponent, well-trained in 2–6. Entropy collapse: the effective rank p^H "
        "falls below 2 (the energy sits in one direction)."
    )
    report.tables.append(
        Table(
            "Events",
            ("step", "since", "module", "event", "detail"),
            [(e["step"], e["since"], e["module"], e["kind"], e["detail"]) for e in events],
        )
    )
    report.tables.append(
        Table(
            "Last spectrum per matrix",
            (
                "module",
                "step",
                "shape",
                "status",
                "σ",
                "spikes > MP",
                "spikes > TW",
                "α",
                "entropy",
                "entropy (MP noise)",
                "stable rank",
                "MP soft rank",
            ),
            [
                (
                    m,
                    r["step"],
                    r["shape"],
                    r["status"],
                    r.get("sigma"),
                    r.get("n_mp"),
                    r.get("n_tw"),
                    r.get("alpha"),
                    r.get("spectral_entropy"),
                    r.get("entropy_mp"),
                    r.get("stable_rank"),
                    _number(r.get("mp_softrank")),
                )
                for m, r in last.items()
            ],
        )
    )
    report.tables.append(
        Table(
            "Compression advice",
            ("module", "shape", "rank", "rank_full", "mode", "reason"),
            [(d.module, list(d.shape), d.rank, d.rank_full, d.mode, d.reason) for d in plan],
            note=f"apply with: laserrmt compress MODEL --plan {folder / PLAN_FILE}",
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        figures = _time_series(run, Path(tmp))
        heatmap = _spike_heatmap(run, Path(tmp))
        if heatmap is not None:
            figures.append(("spikes over (matrix, step)", heatmap))
        figures += _spectra(run, events, steps, Path(tmp))
        report.figures = figures
        html = report.render()
    return write_text_atomic(folder / REPORT_FILE, html)


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) else value


def watch(
    run_dir: str | os.PathLike[str],
    *,
    interval: float = 10.0,
    idle: float = 120.0,
    max_seconds: float | None = None,
    steps: Sequence[int] | None = None,
    on_render: Callable[[Path], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Re-render the report every ``interval`` seconds while the run writes; returns the number
    of renders. Stops when the run has written its end record, when the record file has not
    grown for ``idle`` seconds, or after ``max_seconds``."""
    if interval <= 0 or idle <= 0 or (max_seconds is not None and max_seconds <= 0):
        raise InvalidOptionError("--interval, --idle and --max-seconds must be positive")
    path = records_path(run_dir)
    start = last_growth = clock()
    size = -1
    renders = 0
    while True:
        current = path.stat().st_size if path.exists() else -1
        now = clock()
        if current != size:
            size, last_growth = current, now
            if current > 0:
                report = render_report(run_dir, steps=steps)
                renders += 1
                if on_render is not None:
                    on_render(report)
                if read_run(run_dir).ended:
                    return renders
        if now - last_growth >= idle or (max_seconds is not None and now - start >= max_seconds):
            return renders
        sleep(interval)
