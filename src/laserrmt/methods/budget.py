"""Activation-aware low rank under a global parameter budget.

The seed's "global budget → inter-layer allocation → intra-layer optimisation": calibration
inputs give every target its input Gram matrix (streamed block by block); each weight is
decomposed in the space that matches its output error (SVD-LLM whitening, ASVD scaling, FWSVD
Fisher weighting, or none); the tail energies of those spectra are the loss curves from which
:func:`laserrmt.allocation.allocate_ranks` removes directions globally, least weighted loss per
parameter saved first. ``allocation="uniform"`` gives every matrix the same ratio instead (the
SVD-LLM / ASVD recipe), for comparison at equal size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from laserrmt.allocation import (
    Allocation,
    LossCurve,
    allocate_ranks,
    allocation_to_plan,
    largest_paying_rank,
)
from laserrmt.errors import BudgetError, InvalidOptionError, PlanError
from laserrmt.models.architectures import is_causal_lm, is_embedding_or_head
from laserrmt.models.targets import Target, weight_matrix
from laserrmt.plan import CompressionPlan, FactorSource, ModuleDecision
from laserrmt.rmt import choose_rank
from laserrmt.stats.calibration import (
    ActivationStatistics,
    collect_fisher_diagonal,
    collect_input_statistics,
)
from laserrmt.stats.importance import IMPORTANCE_KINDS, layer_importance
from laserrmt.surgery.io import weight_bytes
from laserrmt.surgery.lowrank import LowRankLinear
from laserrmt.surgery.quantize import int8_matrix_bytes, is_quantizable
from laserrmt.surgery.whiten import DEFAULT_FLOOR, WHITEN_METHODS, WeightedSVD, weighted_svd

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
    target_params: float | None = None,
    target_bytes: int | None = None,
    quantize: str | None = None,
    whiten: str = "svdllm",
    allocation: str = "global",
    importance: str = "auto",
    fisher_windows: int = 4,
    floor: float = DEFAULT_FLOOR,
    calibration_source: Mapping[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> BudgetOutcome:
    """Decide every target's rank from one budget; the model is not modified.

    The budget is ``target_params`` (the fraction of target parameters to remove) or
    ``target_bytes`` (the weights' bytes after compression and, with ``quantize="int8"``,
    quantization; see :func:`planned_weight_bytes`); the latter needs ``allocation="global"``.
    ``floor`` is the whitening's relative floor. ``calibration_source`` names where the
    ``calibration`` windows came from (``source``, ``n_windows``, ``window``, ``seed``; see
    :class:`~laserrmt.plan.FactorSource`): the plan records it so that a replay recomputes the
    same whitened factors (:func:`replay_factors`); without it a whitened plan cannot be
    replayed and says so.
    """
    _check(whiten, allocation, importance, target_params, target_bytes)
    if importance == "auto":
        importance = "fisher" if is_causal_lm(model) else "none"
    names = [t.name for t in targets]
    batches = list(calibration.split(1))
    stats = collect_input_statistics(model, batches, names, blockwise=True, progress=progress)
    fisher: dict[str, torch.Tensor] = {}
    if whiten == "fisher" or importance == "fisher":
        # A whole-model backward per window: a few windows rank layers well enough.
        fisher = collect_fisher_diagonal(model, batches[:fisher_windows], names, progress=progress)
    spectra = weighted_decompositions(model, names, whiten, stats, fisher, floor, progress)
    # Only the singular values come to the host (numpy: the RMT rule and the allocation); the
    # factors stay on the model's device for the cut.
    values = {name: spectra[name].s.cpu().numpy() for name in names}
    # The RMT rule in the weighted space: directions standing above the MP bulk.
    free_ranks = {t.name: choose_rank(values[t.name], t.shape, "mp").rank for t in targets}
    curves = {
        name: LossCurve(t.shape, values[name]) for name, t in zip(names, targets, strict=True)
    }
    extras = {
        name: {"whiten": whiten, "importance": importance, "free_rank": free_ranks[name]}
        for name in names
    }

    if allocation == "uniform":
        plan = uniform_plan(targets, target_params, extras, settings)  # type: ignore[arg-type]
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
        if target_bytes is not None:
            removed = removal_for_size(model, targets, curves, scores, target_bytes, quantize)
            chosen = allocate_ranks(curves, target_params_removed=removed, importance=scores)
        else:
            chosen = allocate_ranks(curves, target_fraction=target_params, importance=scores)
        plan = allocation_to_plan(chosen, method="budget", settings=settings, extras=extras)
    plan.factors = FactorSource(
        whiten=whiten,
        floor=floor if whiten != "none" else None,
        calibration=(
            {**calibration_source, "tokens_sha256": windows_digest(calibration)}
            if whiten != "none" and calibration_source is not None
            else None
        ),
        fisher_windows=fisher_windows if whiten == "fisher" else None,
    )
    cache = {name: spectra[name].as_tuple() for name in names}
    return BudgetOutcome(plan, cache, chosen, free_ranks)


def weighted_decompositions(
    model: nn.Module,
    names: Sequence[str],
    whiten: str,
    stats: Mapping[str, ActivationStatistics],
    fisher: Mapping[str, torch.Tensor],
    floor: float,
    progress: bool = True,
) -> dict[str, WeightedSVD]:
    """Every named weight's generalised SVD for ``whiten``, from the statistics it needs."""
    spectra: dict[str, WeightedSVD] = {}
    for name in tqdm(names, desc=f"weighted SVD ({whiten})", unit="matrix", disable=not progress):
        s = stats.get(name)
        spectra[name] = weighted_svd(
            weight_matrix(model.get_submodule(name)),
            whiten=whiten,
            gram=None if s is None else s.gram,
            n_samples=None if s is None else s.n_samples,
            fisher=fisher.get(name),
            floor=floor,
            module=name,
        )
    return spectra


def replay_factors(
    model: nn.Module, plan: CompressionPlan, calibration: torch.Tensor, progress: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The factors of ``plan``'s changed modules, recomputed as :attr:`CompressionPlan.factors`
    says (only the statistics the whitening needs) on ``calibration``, the windows it names;
    the SVD cache for :func:`~laserrmt.surgery.apply.apply_plan`.

    Raises:
        PlanError: the plan does not say enough to recompute its factors, or ``calibration`` is
            not the windows it was made with.
    """
    factors = plan.factors
    problem = factors.missing()
    if problem:
        raise PlanError(problem)
    if factors.calibration is not None and (
        windows_digest(calibration) != factors.calibration["tokens_sha256"]
    ):
        raise PlanError(
            "the calibration windows drawn for the plan differ from those it was made with "
            "(another tokenizer or text); replay it with the model and tokenizer it was made for"
        )
    names = [d.module for d in plan if d.mode != "keep"]
    batches = list(calibration.split(1))
    stats = {}
    if factors.whiten in ("svdllm", "asvd"):
        stats = collect_input_statistics(model, batches, names, blockwise=True, progress=progress)
    fisher = {}
    if factors.whiten == "fisher":
        fisher = collect_fisher_diagonal(
            model, batches[: factors.fisher_windows], names, progress=progress
        )
    floor = DEFAULT_FLOOR if factors.floor is None else factors.floor
    spectra = weighted_decompositions(model, names, factors.whiten, stats, fisher, floor, progress)
    return {name: spectra[name].as_tuple() for name in names}


def windows_digest(windows: torch.Tensor) -> str:
    """SHA-256 of token-id windows (shape and values), to tell whether two draws agree."""
    ids = windows.detach().cpu().to(torch.int64).contiguous().numpy().astype("<i8")
    return hashlib.sha256(repr(ids.shape).encode() + ids.tobytes()).hexdigest()


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


def _check(
    whiten: str,
    allocation: str,
    importance: str,
    target_params: float | None,
    target_bytes: int | None,
) -> None:
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
    if (target_params is None) == (target_bytes is None):
        raise InvalidOptionError(
            "--method budget needs one budget: --target-params F (the fraction of target "
            "parameters to remove, in (0, 1)) or --target-size BYTES"
        )
    if target_params is not None and not 0 < target_params < 1:
        raise InvalidOptionError(
            f"--target-params {target_params}: give the fraction of target parameters to "
            "remove, in (0, 1)"
        )
    if target_bytes is not None:
        if target_bytes <= 0:
            raise InvalidOptionError(f"--target-size {target_bytes}: must be a positive size")
        if allocation != "global":
            raise InvalidOptionError(
                "--target-size needs --allocation global; a uniform ratio takes --target-params"
            )


# ---------------------------------------------------------------------------------------------
# a budget in bytes


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, LowRankLinear):
        return module.out_features, module.in_features
    rows, cols = weight_matrix(module).shape
    return int(rows), int(cols)


def _element_size(module: nn.Module) -> int:
    return next(module.parameters()).element_size()


def planned_weight_bytes(
    model: nn.Module,
    targets: Sequence[Target],
    ranks: Mapping[str, int],
    quantize: str | None = None,
) -> int:
    """Bytes of the weights (:func:`~laserrmt.surgery.io.weight_bytes`) after every target is
    factorized at ``ranks[name]`` (``min(m, n)`` or absent: left dense) and, with
    ``quantize="int8"``, after :func:`~laserrmt.surgery.quantize.quantize_model_int8`; computed
    from shapes, without touching the model.
    """
    if quantize not in (None, "int8"):
        raise InvalidOptionError(f"unknown quantization {quantize!r}; use int8 or none")
    modules = dict(model.named_modules())
    target_names = {t.name for t in targets}

    def quantized(name: str) -> bool:
        module = modules[name]
        return (
            quantize == "int8"
            and is_quantizable(module)
            and not is_embedding_or_head(name, module, model)
        )

    total = weight_bytes(model)
    if quantize == "int8":  # linear layers that are not targets are quantized as they are
        for name, module in modules.items():
            if name in target_names or not quantized(name):
                continue
            if isinstance(module, LowRankLinear):
                m, n, k = module.out_features, module.in_features, module.rank
                total -= _element_size(module) * k * (m + n)
                total += int8_matrix_bytes(m, k) + int8_matrix_bytes(k, n)
            else:
                m, n = _matrix_shape(module)
                total += int8_matrix_bytes(m, n) - _element_size(module) * m * n
    for target in targets:
        module = modules[target.name]
        m, n = target.shape
        size = _element_size(module)
        total -= size * m * n
        k = ranks.get(target.name, min(m, n))
        dense = k >= min(m, n)
        if quantized(target.name):
            total += (
                int8_matrix_bytes(m, n)
                if dense
                else (int8_matrix_bytes(m, k) + int8_matrix_bytes(k, n))
            )
        else:
            total += size * (m * n if dense else k * (m + n))
    return total


def removal_for_size(
    model: nn.Module,
    targets: Sequence[Target],
    curves: Mapping[str, LossCurve],
    importance: Mapping[str, float] | None,
    target_bytes: int,
    quantize: str | None = None,
) -> int:
    """The fewest target parameters :func:`allocate_ranks` must remove for the weights to take
    at most ``target_bytes`` (found by bisection; 0 when the model already fits).

    Raises:
        BudgetError: even every matrix at rank 1 does not fit; the message gives the smallest
            reachable size.
    """

    def planned(removed: int) -> int:
        if removed == 0:
            return planned_weight_bytes(model, targets, {}, quantize)
        ranks = allocate_ranks(curves, target_params_removed=removed, importance=importance).ranks
        return planned_weight_bytes(model, targets, ranks, quantize)

    if planned(0) <= target_bytes:
        return 0
    most = sum(c.params - sum(c.shape) for c in curves.values() if largest_paying_rank(c.shape))
    smallest = planned(most)
    if smallest > target_bytes:
        raise BudgetError(
            f"--target-size {target_bytes:,} bytes is not reachable: the smallest these targets "
            f"can make the weights is {smallest:,} bytes (every matrix at rank 1"
            + (
                ", int8); ask for at least that"
                if quantize
                else "); ask for at least that, or add --quantize int8"
            )
        )
    low, high = 0, most  # planned(low) > target_bytes >= planned(high)
    while high - low > 1:
        middle = (low + high) // 2
        if planned(middle) <= target_bytes:
            high = middle
        else:
            low = middle
    return high
