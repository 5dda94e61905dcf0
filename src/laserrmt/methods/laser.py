"""LaserRMT: weight-spectrum rank reduction with RMT-chosen ranks.

Two ways to decide which matrices to cut, both from the same analysis (one SVD per matrix):

* **one-shot**: every target gets the rank its threshold keeps;
* **loop** (laserRMT, done right): candidates ordered by a layer score, each reduced in turn
  and kept only when a calibration objective stays within a tolerance of the original model,
  else reverted exactly. Stop at a parameter target or after a maximum number of changes.

The ``reproduce_laserrmt`` preset follows the original project (Hartford et al., laserRMT,
2024): its IQR noise rule, the 15 lowest-SNR candidates, dense reconstruction, and a change kept
only when it strictly improves perplexity — but measured on calibration text, not the test split.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from laserrmt.analyze import AnalysisResult
from laserrmt.errors import InvalidOptionError
from laserrmt.methods.objectives import Objective
from laserrmt.plan import MODES, CompressionPlan, ModuleDecision, resolve_mode
from laserrmt.surgery.apply import apply_plan, revert_changes

#: Layer scores a loop can order candidates by, and whether low values come first.
#: Low SNR and low stable rank (energy in few directions) mean truncation removes little that
#: matters; high normalised spectral entropy means a spectrum close to noise.
SCORES: dict[str, bool] = {"snr": True, "stable_rank": True, "spectral_entropy": False}
SELECTIONS = ("oneshot", "loop")
LASERRMT_CANDIDATES = 15


@dataclass
class LoopStep:
    """One candidate tried by the loop."""

    module: str
    rank: int
    rank_full: int
    mode: str
    objective: float
    accepted: bool
    params_removed: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LaserOutcome:
    plan: CompressionPlan
    steps: list[LoopStep] = field(default_factory=list)
    reference: float | None = None


def rank_candidates(analysis: AnalysisResult, score: str) -> list[dict[str, Any]]:
    """Records ordered so that the first is the most promising to cut."""
    if score not in SCORES:
        raise InvalidOptionError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    ascending = SCORES[score]

    def key(record: dict[str, Any]) -> float:
        value = float(record[score])
        if score == "stable_rank":
            value /= record["rank_full"]
        return value if ascending else -value

    return sorted(analysis.records, key=key)


def _decision(record: dict[str, Any], mode: str, method: str) -> ModuleDecision:
    shape = (record["shape"][0], record["shape"][1])
    chosen, reason = resolve_mode(shape, max(1, record["rank_kept"]), mode)
    if record.get("status", "ok") != "ok":  # the threshold found no noise edge to cut at
        chosen, reason = "keep", f"kept whole: {method} threshold status {record['status']}"
    return ModuleDecision(
        module=record["module"],
        shape=shape,
        rank_full=record["rank_full"],
        rank=max(1, record["rank_kept"]),
        mode=chosen,
        reason=reason,
        extras={"threshold": method, "snr": record["snr"], "sigma": record["sigma"]},
    )


def oneshot_plan(
    analysis: AnalysisResult,
    *,
    mode: str = "factorize",
    score: str = "snr",
    target_params: float | None = None,
    settings: dict[str, Any] | None = None,
) -> CompressionPlan:
    """Every target at its threshold rank; with ``target_params`` (a fraction of the target
    parameters to remove), only the best-scored ones until that fraction is removed."""
    _check_mode(mode, target_params)
    total = sum(r["params"] for r in analysis.records)
    decisions, removed = [], 0
    for record in rank_candidates(analysis, score):
        decision = _decision(record, mode, analysis.threshold)
        if target_params is not None and removed >= target_params * total:
            decision = ModuleDecision(
                decision.module,
                decision.shape,
                decision.rank_full,
                decision.rank,
                "keep",
                "parameter target already met",
                decision.extras,
            )
        decisions.append(decision)
        removed += decision.params_before - decision.params_after
    return CompressionPlan.from_decisions(decisions, method="laser-oneshot", settings=settings)


def laser_loop(
    model: nn.Module,
    analysis: AnalysisResult,
    objective: Objective,
    *,
    mode: str = "factorize",
    score: str = "snr",
    target_params: float | None = None,
    max_changes: int | None = None,
    max_candidates: int | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> LaserOutcome:
    """Reduce candidates one at a time and keep what the objective tolerates.

    ``model`` is changed in place and ends with the accepted changes applied. The SVDs kept on
    ``analysis`` (``keep_vectors=True``) are reused for every candidate; a revert restores the
    original module or weight exactly.
    """
    _check_mode(mode, target_params)
    total = sum(r["params"] for r in analysis.records)
    candidates = rank_candidates(analysis, score)[:max_candidates]
    svd_cache = analysis.svd_cache()
    reference = objective.calibrate(model)
    decisions: dict[str, ModuleDecision] = {}
    steps: list[LoopStep] = []
    removed = accepted = 0
    bar = tqdm(
        candidates, desc=f"laser loop ({objective.name})", unit="matrix", disable=not progress
    )
    for record in bar:
        if target_params is not None and removed >= target_params * total:
            break
        if max_changes is not None and accepted >= max_changes:
            break
        decision = _decision(record, mode, analysis.threshold)
        if decision.mode == "keep":
            decisions[decision.module] = decision
            continue
        start = time.perf_counter()
        single = CompressionPlan.from_decisions([decision])
        changes = apply_plan(
            model, single, svd_cache=svd_cache, progress=False, keep_originals=True
        )
        value = objective(model)
        ok = objective.accepts(value)
        if ok:
            objective.record(value)
            accepted += 1
            removed += decision.params_before - decision.params_after
            decisions[decision.module] = decision
        else:
            revert_changes(model, changes)
            decisions[decision.module] = ModuleDecision(
                decision.module,
                decision.shape,
                decision.rank_full,
                decision.rank,
                "keep",
                f"reverted: {objective.name} {value:.4g} against reference {reference:.4g}",
                decision.extras,
            )
        steps.append(
            LoopStep(
                decision.module,
                decision.rank,
                decision.rank_full,
                decision.mode,
                value,
                ok,
                decision.params_before - decision.params_after if ok else 0,
                time.perf_counter() - start,
            )
        )
        bar.set_postfix(accepted=accepted, objective=f"{objective.best:.4g}")
    plan = CompressionPlan.from_decisions(
        decisions.values(), method="laser-loop", settings=settings
    )
    return LaserOutcome(plan, steps, reference)


def _check_mode(mode: str, target_params: float | None) -> None:
    if mode not in MODES:
        raise InvalidOptionError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if target_params is not None:
        if not 0 < target_params < 1:
            raise InvalidOptionError(
                f"--target-params is the fraction of target parameters to remove, in (0, 1); got {target_params}"
            )
        if mode == "denoise":
            raise InvalidOptionError(
                "--mode denoise keeps dense matrices and removes no parameter; "
                "use --mode factorize with --target-params"
            )
