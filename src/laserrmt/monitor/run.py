"""Reading a monitored run back: its records, the events in them, and the compression advice.

Events are read off the RMT quantities of consecutive observations of the same matrix; none
has a tuned threshold:

``spike_emerged`` / ``spike_receded``
    the number of singular values above the Tracy–Widom edge (a level-α test against pure
    noise of the matrix's shape and estimated σ) went up / down: a direction is being learnt
    out of the noise bulk, or sank back into it.
``alpha_left_range`` / ``alpha_entered_range``
    the power-law exponent α of the eigenvalue tail left / entered Martin & Mahoney's
    well-trained range [2, 6] (:data:`~laserrmt.monitor.summary.WELL_TRAINED_ALPHA`).
``entropy_collapse`` / ``entropy_recovered``
    the effective rank p^H (spectral entropy H, Roy & Vetterli 2007) fell below / rose back to
    2: the spectrum has less entropy than two equal directions, so its energy sits in one
    direction (rank collapse). Pure noise of the same shape has H at the MP value
    (:func:`~laserrmt.monitor.summary.mp_noise_entropy`), p^H ≈ 0.6p for a square matrix.
``kept_fraction_jump``
    the rank rule's status changed (``ok`` ↔ ``no_bulk``): the matrix lost or regained the
    noise bulk the rule reads, so the fraction of the rank it would keep jumps to or from 1.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laserrmt.errors import DataError
from laserrmt.monitor.hook import RECORDS_FILE
from laserrmt.monitor.summary import WELL_TRAINED_ALPHA
from laserrmt.plan import CompressionPlan, Mode, ModuleDecision, resolve_mode

EVENT_KINDS = (
    "spike_emerged",
    "spike_receded",
    "alpha_left_range",
    "alpha_entered_range",
    "entropy_collapse",
    "entropy_recovered",
    "kept_fraction_jump",
)


@dataclass
class MonitorRun:
    """A run's records, in file order. ``truncated``: the last line was cut short (a killed
    run) and was dropped; ``ended``: the run closed its monitor."""

    path: Path
    header: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False
    truncated: bool = False

    def weights(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == "weight"]

    def activations(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == "activation"]

    def modules(self) -> list[str]:
        """Monitored modules in the model's order."""
        return [t["name"] for t in self.header["targets"]]

    def steps(self) -> list[int]:
        return sorted({r["step"] for r in self.records})


def records_path(run_dir: str | os.PathLike[str]) -> Path:
    path = Path(run_dir)
    return path if path.is_file() else path / RECORDS_FILE


def read_run(run_dir: str | os.PathLike[str]) -> MonitorRun:
    """Read ``RUN_DIR/monitor.jsonl`` (or that file itself), tolerating a cut-off last line.

    Raises:
        DataError: no record file, no header, or a damaged line before the last one.
    """
    path = records_path(run_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{path} does not exist; pass the run folder a SpectralMonitor wrote to"
        ) from None
    lines = text.split("\n")
    # Every complete record ends in a newline, so whatever follows the last one was cut short.
    truncated = lines[-1] != ""
    parsed = []
    for number, line in enumerate(lines[:-1], start=1):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(
                f"{path} line {number} is not a JSON record; the file was changed by something "
                "other than the monitor"
            ) from None
    if not parsed or parsed[0].get("type") != "header":
        raise DataError(f"{path} has no header record; it was not written by SpectralMonitor")
    run = MonitorRun(path, parsed[0], truncated=truncated)
    for record in parsed[1:]:
        if record.get("type") == "end":
            run.ended = True
        else:
            run.records.append(record)
    return run


def _by_module(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        series[record["module"]].append(record)
    for rows in series.values():
        rows.sort(key=lambda r: r["step"])
    return series


def _in_range(alpha: float | None) -> bool | None:
    if alpha is None:
        return None
    low, high = WELL_TRAINED_ALPHA
    return low <= float(alpha) <= high


def _collapsed(record: dict[str, Any]) -> bool | None:
    if "effective_rank" not in record:
        return None
    return bool(record["effective_rank"] < 2.0)


def detect_events(run: MonitorRun) -> list[dict[str, Any]]:
    """The events of the module docstring, ordered by step then module order."""
    order = {name: i for i, name in enumerate(run.modules())}
    events: list[dict[str, Any]] = []
    for module, rows in _by_module(run.weights()).items():
        for before, after in itertools.pairwise(rows):
            events += _pair_events(module, before, after)
    events.sort(key=lambda e: (e["step"], order.get(e["module"], len(order))))
    return events


def _pair_events(
    module: str, before: dict[str, Any], after: dict[str, Any]
) -> list[dict[str, Any]]:
    def event(kind: str, detail: str) -> dict[str, Any]:
        return {
            "step": after["step"],
            "since": before["step"],
            "module": module,
            "kind": kind,
            "detail": detail,
        }

    out = []
    if before["status"] != after["status"] and "non_finite" not in (
        before["status"],
        after["status"],
    ):
        out.append(
            event(
                "kept_fraction_jump",
                f"status {before['status']} → {after['status']}: kept fraction "
                f"{before['kept_fraction']:.3g} → {after['kept_fraction']:.3g}",
            )
        )
    n0, n1 = before.get("n_tw"), after.get("n_tw")
    if n0 is not None and n1 is not None and n0 != n1:
        kind = "spike_emerged" if n1 > n0 else "spike_receded"
        out.append(event(kind, f"Tracy–Widom-significant spikes {n0} → {n1}"))
    a0, a1 = _in_range(before.get("alpha")), _in_range(after.get("alpha"))
    if a0 is not None and a1 is not None and a0 != a1:
        kind = "alpha_entered_range" if a1 else "alpha_left_range"
        out.append(event(kind, f"α {before['alpha']:.3g} → {after['alpha']:.3g} (range 2–6)"))
    c0, c1 = _collapsed(before), _collapsed(after)
    if c0 is not None and c1 is not None and c0 != c1:
        kind = "entropy_collapse" if c1 else "entropy_recovered"
        out.append(
            event(
                kind,
                f"effective rank {before['effective_rank']:.3g} → "
                f"{after['effective_rank']:.3g} (entropy {after['spectral_entropy']:.3g}, "
                f"MP noise {after['entropy_mp']:.3g})",
            )
        )
    return out


def last_records(run: MonitorRun) -> dict[str, dict[str, Any]]:
    """The latest weight record of every module that has one, in model order."""
    latest = {module: rows[-1] for module, rows in _by_module(run.weights()).items()}
    return {m: latest[m] for m in run.modules() if m in latest}


def advice_plan(run: MonitorRun, mode: str = "factorize") -> CompressionPlan:
    """A plain-SVD plan: every matrix at the rank its last spectrum supports.

    The rank is the number of Tracy–Widom-significant spikes (at least 1, as one-shot LaserRMT
    does). Matrices the rule could not judge (``too_short``, ``no_bulk``) or that held NaN/Inf
    are kept whole; factorizations that would not save parameters are kept dense
    (:func:`~laserrmt.plan.resolve_mode`). It fits the weights as they were at the last step
    recorded for each matrix (``extras.step``): apply it to the model saved at the end of the
    same run.
    """
    decisions = []
    for module, record in last_records(run).items():
        shape = (int(record["shape"][0]), int(record["shape"][1]))
        full = min(shape)
        chosen: Mode
        if record["status"] != "ok":
            rank, chosen, reason = full, "keep", f"kept whole: status {record['status']}"
        else:
            rank = max(1, int(record["n_tw"]))
            chosen, reason = resolve_mode(shape, rank, mode)
        decisions.append(
            ModuleDecision(
                module=module,
                shape=shape,
                rank_full=full,
                rank=rank,
                mode=chosen,
                reason=reason,
                extras={"step": record["step"], "threshold": "tw", "sigma": record.get("sigma")},
            )
        )
    return CompressionPlan.from_decisions(
        decisions,
        method="monitor",
        settings={
            "run": str(run.path),
            "threshold": "tw",
            "alpha": run.header["settings"]["alpha"],
            "last_step": max((r["step"] for r in run.weights()), default=None),
        },
    )
