"""The ``analyze`` pipeline: weight spectra → RMT rank choice and diagnostics → table and report."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from laserrmt.models.checkpoint import Checkpoint
from laserrmt.models.placement import place_model, resolve_device, resolve_dtype
from laserrmt.models.streaming import BlockStream
from laserrmt.models.targets import Target, find_targets, select_targets, weight_matrix
from laserrmt.outputs import atomic_output_dir
from laserrmt.report.html import Report, Table
from laserrmt.report.plots import plot_block_role_heatmap, plot_spectral_density
from laserrmt.rmt import choose_rank, spectrum_diagnostics
from laserrmt.stats.calibration import collect_input_statistics
from laserrmt.stats.weights import SpectrumFailure, WeightSpectrum, weight_spectra
from laserrmt.surgery.whiten import weighted_spectrum

# The columns of spectra.csv, in order; spectra.json holds the same records.
COLUMNS = (
    "module",
    "kind",
    "block",
    "role",
    "shape",
    "params",
    "rank_full",
    "rank_kept",
    "status",
    "threshold",
    "sigma",
    "edge",
    "snr",
    "spectral_entropy",
    "stable_rank",
    "alpha",
    "n_spikes",
    "mp_softrank",
    "s_max",
)


@dataclass
class AnalysisResult:
    """Per-target spectral statistics (plain records) and what could not be analysed."""

    records: list[dict[str, Any]]
    failures: list[SpectrumFailure]
    threshold: str
    threshold_options: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    spectra: dict[str, WeightSpectrum] = field(default_factory=dict, repr=False)
    whiten: str | None = None

    def summary(self) -> dict[str, Any]:
        """Totals a person reads first."""
        params = sum(r["params"] for r in self.records)
        kept = sum(r["rank_kept"] for r in self.records)
        full = sum(r["rank_full"] for r in self.records)
        snrs = [r["snr"] for r in self.records if math.isfinite(r["snr"])]
        alphas = [r["alpha"] for r in self.records if r["alpha"] is not None]
        return {
            "matrices": len(self.records),
            "failed": len(self.failures),
            "params_in_targets": params,
            "threshold": self.threshold,
            "rank_kept_fraction": kept / full if full else float("nan"),
            # Matrices whose rank the rule could not judge (kept whole): see RankChoice.status.
            "not_judged": sum(r["status"] != "ok" for r in self.records),
            "median_snr": float(np.median(snrs)) if snrs else float("nan"),
            "median_alpha": float(np.median(alphas)) if alphas else float("nan"),
        } | (
            {
                "whitened_rank_kept_fraction": sum(r["whitened_rank_kept"] for r in self.records)
                / full
            }
            if self.whiten and full
            else {}
        )

    def svd_cache(self) -> dict[str, tuple[Any, Any, Any]]:
        """Module name → (U, S, Vh) for the spectra computed with vectors, for surgery to reuse."""
        return {name: s.svd for name, s in self.spectra.items() if s.u is not None}

    def to_json(self) -> list[dict[str, Any]]:
        return [_jsonable(r) for r in self.records]


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no inf/nan: write them as strings a person and ``float()`` both understand."""
    out = {}
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[key] = value
    return out


def analyze_model(
    model: nn.Module,
    *,
    targets: Sequence[str] | None = None,
    threshold: str = "mp",
    threshold_options: dict[str, Any] | None = None,
    include_heads: bool = False,
    keep_vectors: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    stream: BlockStream | None = None,
) -> AnalysisResult:
    """Analyse the spectrum of every selected weight matrix of ``model``.

    ``targets`` are selection patterns (names, regular expressions, ``role:…``, ``block:…``);
    ``threshold`` is one of :data:`laserrmt.rmt.THRESHOLD_METHODS`. Each matrix is decomposed once,
    in float64 on the model's device; with ``keep_vectors`` the singular vectors are kept on the
    result for later surgery. ``device`` and ``dtype`` (see
    :func:`~laserrmt.models.placement.place_model`) move and cast ``model`` in place first. With
    ``stream``, ``model`` is its meta-device skeleton and every matrix is read from the checkpoint
    only for its own decomposition, on the stream's device and dtype (see
    :func:`analyze_checkpoint`).
    """
    place_model(model, device, dtype)
    options = dict(threshold_options or {})
    timings: dict[str, float] = {}
    start = time.perf_counter()
    selected = select_targets(find_targets(model, include_heads=include_heads), targets)
    # Validate the threshold before the expensive part, so a typo fails in milliseconds.
    choose_rank(np.array([2.0, 1.0]), (2, 2), threshold, **options)
    timings["discover"] = time.perf_counter() - start

    start = time.perf_counter()
    spectra, failures = weight_spectra(
        model, selected, vectors=keep_vectors, progress=progress, stream=stream
    )
    timings["svd"] = time.perf_counter() - start

    start = time.perf_counter()
    records = [
        spectrum_record(spectra[t.name], threshold, options) for t in selected if t.name in spectra
    ]
    timings["statistics"] = time.perf_counter() - start
    return AnalysisResult(records, failures, threshold, options, timings, spectra)


def analyze_checkpoint(
    checkpoint: Checkpoint,
    *,
    targets: Sequence[str] | None = None,
    threshold: str = "mp",
    threshold_options: dict[str, Any] | None = None,
    include_heads: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[AnalysisResult, str]:
    """:func:`analyze_model` without building the model: the result and the model's description.

    Targets are found on a meta-device skeleton of the checkpoint's model (no weight memory),
    then each matrix is read from the checkpoint, decomposed and freed: peak memory is one
    matrix and its decomposition. Each matrix is materialised on ``device`` as ``dtype``
    (default: the CPU, float32), as :func:`analyze_model` would see it on a model loaded and
    placed so; the records equal :func:`analyze_model`'s on that model.
    """
    start = time.perf_counter()
    stream = BlockStream(
        checkpoint,
        trust_remote_code=trust_remote_code,
        device=resolve_device(device) if device is not None else "cpu",
        dtype=resolve_dtype(dtype) if dtype is not None else None,
    )
    build_s = time.perf_counter() - start
    result = analyze_model(
        stream.model,
        targets=targets,
        threshold=threshold,
        threshold_options=threshold_options,
        include_heads=include_heads,
        progress=progress,
        stream=stream,
    )
    result.timings["discover"] += build_s
    return result, stream.source


def add_whitened_ranks(
    result: AnalysisResult,
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    whiten: str = "svdllm",
    progress: bool = True,
) -> None:
    """Add ``whitened_rank_kept``: the directions of the activation-weighted matrix (W·S for
    ``svdllm``) that the same threshold keeps — the rank the calibration data says is free."""
    names = [r["module"] for r in result.records]
    start = time.perf_counter()
    stats = collect_input_statistics(
        model, list(calibration.split(1)), names, fisher=whiten == "fisher", progress=progress
    )
    result.timings["calibration"] = time.perf_counter() - start
    start = time.perf_counter()
    for record in tqdm(
        result.records, desc=f"{whiten} spectra", unit="matrix", disable=not progress
    ):
        name, st = record["module"], stats[record["module"]]
        values = weighted_spectrum(
            weight_matrix(model.get_submodule(name)),
            whiten=whiten,
            gram=st.gram,
            n_samples=st.n_samples,
            fisher=st.fisher,
            module=name,
        )
        shape = (record["shape"][0], record["shape"][1])
        choice = choose_rank(values, shape, result.threshold, **result.threshold_options)
        record["whitened_rank_kept"] = choice.rank
        record["whitened_status"] = choice.status
    result.whiten = whiten
    result.timings["whitened_spectra"] = time.perf_counter() - start


def spectrum_record(
    spectrum: WeightSpectrum, threshold: str, options: dict[str, Any]
) -> dict[str, Any]:
    """One row of the analysis table."""
    target: Target = spectrum.target
    s = spectrum.singular_values
    choice = choose_rank(s, target.shape, threshold, **options)
    diagnostics = spectrum_diagnostics(s, target.shape, choice)
    record: dict[str, Any] = {
        "module": target.name,
        "kind": target.kind,
        "block": target.block,
        "role": target.role,
        "shape": list(target.shape),
        "params": target.shape[0] * target.shape[1],
        "rank_full": len(s),
        "rank_kept": choice.rank,
        "status": choice.status,
        "threshold": choice.method,
        "sigma": choice.sigma,
        "edge": choice.edge,
        "s_max": float(s[0]),
    }
    record.update(diagnostics)
    return record


def write_tables(result: AnalysisResult, folder: Path) -> None:
    """``spectra.json`` and ``spectra.csv`` (same records, same column order)."""
    rows = result.to_json()
    ordered = [{c: r.get(c) for c in COLUMNS} | r for r in rows]
    (folder / "spectra.json").write_text(json.dumps(ordered, indent=1) + "\n")
    with open(folder / "spectra.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ordered[0]) if ordered else COLUMNS)
        writer.writeheader()
        for row in ordered:
            writer.writerow(
                {k: ("x".join(map(str, v)) if isinstance(v, list) else v) for k, v in row.items()}
            )


def choose_plot_modules(
    result: AnalysisResult, requested: Sequence[str] | None, n: int = 3
) -> list[str]:
    """The modules whose spectra are drawn: those asked for, else the n lowest- and highest-SNR."""
    names = [r["module"] for r in result.records]
    if requested:
        targets = [result.spectra[name].target for name in names]
        return [t.name for t in select_targets(targets, requested)]
    by_snr = sorted(result.records, key=lambda r: r["snr"])
    chosen = [r["module"] for r in by_snr[:n]] + [r["module"] for r in by_snr[-n:]]
    return list(dict.fromkeys(chosen))


def write_analysis(
    result: AnalysisResult,
    out_dir: str | Path,
    *,
    model_source: str,
    plot_modules: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write tables, figures and ``report.html`` atomically into ``out_dir``."""
    start = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_tables(result, tmp)
        figures: list[tuple[str, Path]] = []
        by_name = {r["module"]: r for r in result.records}
        for name in choose_plot_modules(result, plot_modules):
            r = by_name[name]
            spectrum = result.spectra[name]
            path = tmp / f"esd_{name.replace('.', '_')}.png"
            sigma = choose_rank(spectrum.singular_values, spectrum.target.shape, "mp").sigma
            plot_spectral_density(
                spectrum.singular_values,
                spectrum.target.shape,
                sigma,
                path,
                title=f"{name}  {r['shape'][0]}×{r['shape'][1]}  SNR {r['snr']:.3g}  "
                f"kept {r['rank_kept']}/{r['rank_full']} ({result.threshold})",
                kept_edge=r["edge"],
                kept_label=f"{result.threshold} threshold",
            )
            figures.append((f"Spectral density of {name}", path))
        for value, title, cmap in (
            ("snr", "SNR (signal / noise singular-value mass)", "viridis"),
            ("kept_fraction", f"fraction of rank kept ({result.threshold})", "magma"),
        ):
            records = [
                r | {"kept_fraction": r["rank_kept"] / r["rank_full"]} for r in result.records
            ]
            heat = plot_block_role_heatmap(
                records, value, tmp / f"heatmap_{value}.png", title=title, cmap=cmap
            )
            if heat is not None:
                figures.append((title, heat))
        report = analysis_report(result, model_source, figures)
        report.write(tmp / "report.html")
    result.timings["report"] = time.perf_counter() - start
    return Path(out_dir)


def analysis_report(
    result: AnalysisResult, model_source: str, figures: list[tuple[str, Path]]
) -> Report:
    summary = result.summary()
    report = Report(f"laserrmt analyze — {model_source}")
    report.summary = [
        ("model", model_source),
        ("matrices analysed", summary["matrices"]),
        ("parameters in these matrices", summary["params_in_targets"]),
        ("threshold", f"{result.threshold} {result.threshold_options or ''}".strip()),
        ("rank kept (all matrices)", f"{summary['rank_kept_fraction']:.1%}"),
        ("matrices the threshold could not judge (kept whole)", summary["not_judged"]),
        ("median SNR", summary["median_snr"]),
        ("median power-law α", summary["median_alpha"]),
    ]
    if result.whiten:
        report.summary.append(
            (
                f"rank kept in the {result.whiten}-weighted space",
                f"{summary['whitened_rank_kept_fraction']:.1%}",
            )
        )
    report.summary += [
        (f"time: {stage}", f"{seconds:.1f} s") for stage, seconds in result.timings.items()
    ]
    report.notes.append(
        "SNR = Σ s above the edge / Σ s at or below it (edge of the chosen threshold). "
        "Eigenvalues are s²/N with N the larger dimension. Weights that went through "
        "quantization (e.g. GGUF checkpoints) carry quantization noise in their bulk."
    )
    report.notes.append(
        "status: ok = the threshold applied; too_short = fewer than 5 singular values, too few "
        "for a noise bulk; no_bulk = the values below the median are not a Marchenko–Pastur "
        "bulk of the estimated σ (e.g. a matrix of rank ≥ p/2 with little noise), so no "
        "noise edge exists. Matrices not ok keep their full rank."
    )
    if result.failures:
        report.tables.append(
            Table(
                "Matrices not analysed",
                ("module", "reason"),
                [(f.module, f.reason) for f in result.failures],
            )
        )
    columns = [c for c in COLUMNS if c not in ("kind", "threshold")]
    if result.whiten:
        at = columns.index("status") + 1
        columns[at:at] = ["whitened_rank_kept", "whitened_status"]
    report.tables.append(
        Table(
            "Per-matrix spectra",
            columns,
            [[r[c] for c in columns] for r in result.records],
        )
    )
    report.figures = figures
    return report
