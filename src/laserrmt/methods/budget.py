"""Activation-aware low rank under a global parameter budget.

The seed's "global budget → inter-layer allocation → intra-layer optimisation": calibration
inputs give every target its input Gram matrix (streamed block by block); each weight is
decomposed in the space that matches its output error (SVD-LLM whitening, ASVD scaling, FWSVD
Fisher weighting, or none); the tail energies of those spectra are the loss curves from which
:func:`laserrmt.budget.allocate_ranks` removes directions globally, least weighted loss per
parameter saved first. ``allocation="uniform"`` gives every matrix the same ratio instead (the
SVD-LLM / ASVD recipe), for comparison at equal size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from laserrmt.budget import (
    Allocation,
    LossCurve,
    allocate_ranks,
    allocation_to_plan,
    largest_paying_rank,
)
from laserrmt.errors import InvalidOptionError
from laserrmt.models.architectures import is_causal_lm
from laserrmt.models.targets import Target, weight_matrix
from laserrmt.plan import CompressionPlan, ModuleDecision
from laserrmt.rmt import choose_rank
from laserrmt.stats.calibration import collect_fisher_diagonal, collect_input_statistics
from laserrmt.stats.importance import IMPORTANCE_KINDS, layer_importance
from laserrmt.surgery.whiten import WHITEN_METHODS, WeightedSVD, weighted_svd

ALLOCATIONS = ("global", "uniform")


@dataclass
class BudgetOutcome:
    plan: CompressionPlan
    svd_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(repr=False)
    allocation: Allocation | None = None
    free_ranks: dict[str, int] = field(default_factory=dict)


def budget_plan(
    model: nn.Module,
    targets: Sequence[Target],
    calibration: torch.Tensor,
    *,
    target_params: float,
    whiten: str = "svdllm",
    allocation: str = "global",
    importance: str = "auto",
    fisher_windows: int = 4,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> BudgetOutcome:
    """Decide every target's rank from one budget; the model is not modified."""
    _check(whiten, allocation, importance, target_params)
    if importance == "auto":
        importance = "fisher" if is_causal_lm(model) else "none"
    names = [t.name for t in targets]
    batches = list(calibration.split(1))
    stats = collect_input_statistics(model, batches, names, blockwise=True, progress=progress)
    fisher: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    if whiten == "fisher" or importance == "fisher":
        # A whole-model backward per window: a few windows rank layers well enough.
        fisher.update(
            collect_fisher_diagonal(model, batches[:fisher_windows], names, progress=progress)
        )
    spectra: dict[str, WeightedSVD] = {}
    free_ranks: dict[str, int] = {}
    for target in tqdm(
        targets, desc=f"weighted SVD ({whiten})", unit="matrix", disable=not progress
    ):
        s = stats[target.name]
        spectra[target.name] = weighted_svd(
            weight_matrix(model.get_submodule(target.name)),
            whiten=whiten,
            gram=s.gram,
            n_samples=s.n_samples,
            fisher=fisher[target.name],
            module=target.name,
        )
        # The RMT rule in the weighted space: directions standing above the MP bulk.
        values = spectra[target.name].s.numpy()
        free_ranks[target.name] = choose_rank(values, target.shape, "mp").rank
    curves = {
        name: LossCurve(t.shape, spectra[name].s.numpy())
        for name, t in zip(names, targets, strict=True)
    }
    extras = {
        name: {"whiten": whiten, "importance": importance, "free_rank": free_ranks[name]}
        for name in names
    }

    if allocation == "uniform":
        plan = uniform_plan(targets, target_params, extras, settings)
        chosen = None
    else:
        scores = layer_importance(
            importance,
            names,
            fisher=fisher if importance == "fisher" else None,
            singular_values={n: curves[n].singular_values for n in names},
            model=model,
            batches=batches,
        )
        chosen = allocate_ranks(curves, target_fraction=target_params, importance=scores)
        plan = allocation_to_plan(chosen, method="budget", settings=settings, extras=extras)
    cache = {name: spectra[name].as_tuple() for name in names}
    return BudgetOutcome(plan, cache, chosen, free_ranks)


def uniform_plan(
    targets: Sequence[Target],
    ratio: float,
    extras: dict[str, dict[str, Any]],
    settings: dict[str, Any] | None,
) -> CompressionPlan:
    """Every matrix keeps k = ⌊(1 − ratio)·mn/(m+n)⌋, removing ``ratio`` of its own parameters."""
    decisions = []
    for t in targets:
        m, n = t.shape
        rank = int(np.floor((1 - ratio) * m * n / (m + n)))
        if rank < 1 or rank > largest_paying_rank(t.shape):
            decisions.append(
                ModuleDecision(
                    t.name,
                    t.shape,
                    min(m, n),
                    min(m, n),
                    "keep",
                    "uniform ratio gives no paying rank",
                    extras[t.name],
                )
            )
            continue
        decisions.append(
            ModuleDecision(
                t.name,
                t.shape,
                min(m, n),
                rank,
                "factorize",
                f"uniform ratio {ratio:.0%}",
                extras[t.name],
            )
        )
    return CompressionPlan.from_decisions(decisions, method="uniform", settings=settings)


def _check(whiten: str, allocation: str, importance: str, target_params: float | None) -> None:
    if whiten not in WHITEN_METHODS:
        raise InvalidOptionError(
            f"unknown --whiten {whiten!r}; choose one of {', '.join(WHITEN_METHODS)}"
        )
    if allocation not in ALLOCATIONS:
        raise InvalidOptionError(
            f"unknown --allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}"
        )
    if importance not in (*IMPORTANCE_KINDS, "auto"):
        raise InvalidOptionError(
            f"unknown --importance {importance!r}; choose auto or one of {', '.join(IMPORTANCE_KINDS)}"
        )
    if target_params is None or not 0 < target_params < 1:
        raise InvalidOptionError(
            "--method budget needs --target-params F, the fraction of target parameters to remove, in (0, 1)"
        )
