"""Activation-aware low rank under a global parameter budget.

The seed's "global budget → inter-layer allocation → intra-layer optimisation": calibration
inputs give every target its input Gram matrix (streamed block by block); each weight is
decomposed in the space that matches its output error (SVD-LLM whitening, ASVD scaling, FWSVD
Fisher weighting, or none); the tail energies of those spectra are the loss curves from which
:func:`laserrmt.allocation.allocate_ranks` removes directions globally, least weighted loss per
parameter saved first. ``allocation="uniform"`` gives every matrix the same ratio instead (the
SVD-LLM / ASVD recipe), for comparison at equal size.

Memory stays at one block: the first pass keeps only each matrix's singular values and spills
the factors to disk block by block (:class:`laserrmt.surgery.spill.FactorSpill`); the cut
reads each module's allocated triplets back one at a time.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
    BlocksNotFoundError,
    collect_fisher_diagonal,
    find_blocks,
    iter_activation_statistics,
)
from laserrmt.stats.importance import IMPORTANCE_KINDS, layer_importance
from laserrmt.surgery.io import weight_bytes
from laserrmt.surgery.lowrank import LowRankLinear
from laserrmt.surgery.quantize import int8_matrix_bytes, is_quantizable
from laserrmt.surgery.spill import FactorSpill
from laserrmt.surgery.whiten import DEFAULT_FLOOR, WHITEN_METHODS, SharedWhitening, weighted_svd

ALLOCATIONS = ("global", "uniform")


@dataclass
class BudgetOutcome:
    """The plan and, on disk, the factors it cuts with (``svd_cache`` for
    :func:`~laserrmt.surgery.apply.apply_plan`, read one module at a time at its planned rank).

    Use it in a ``with`` block (or call :meth:`close`) so the spilled factors are removed.
    """

    plan: CompressionPlan
    svd_cache: FactorSpill = field(repr=False)
    allocation: Allocation | None = None
    free_ranks: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        self.svd_cache.close()

    def __enter__(self) -> BudgetOutcome:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
    spill_dir: str | Path | None = None,
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

    Two passes keep memory at one block: block by block, the block's statistics give its
    weighted SVDs, whose singular values stay in memory and whose factors go to a temporary
    folder under ``spill_dir`` (:class:`~laserrmt.surgery.spill.FactorSpill`); then the
    allocation. The returned outcome owns that folder.
    """
    _check(whiten, allocation, importance, target_params, target_bytes)
    if importance == "auto":
        importance = "fisher" if is_causal_lm(model) else "none"
    names = [t.name for t in targets]
    shapes = {t.name: t.shape for t in targets}
    batches = list(calibration.split(1))
    fisher_rows: dict[str, torch.Tensor] = {}
    if whiten == "fisher" or importance == "fisher":
        # A whole-model backward per window: a few windows rank layers well enough.
        fisher_rows = collect_fisher_diagonal(
            model, batches[:fisher_windows], names, rows=True, progress=progress
        )
    spill = FactorSpill(spill_dir)
    try:
        values = spill_weighted_factors(
            model,
            names,
            whiten,
            batches,
            fisher_rows,
            floor,
            spill,
            # The allocation never factorizes past the last rank that saves parameters.
            {name: largest_paying_rank(shapes[name]) for name in names},
            progress,
        )
        plan, chosen, free_ranks = decide_ranks(
            targets,
            values,
            whiten=whiten,
            allocation=allocation,
            importance=importance,
            fisher_rows=fisher_rows,
            target_params=target_params,
            target_bytes=target_bytes,
            quantize=quantize,
            settings=settings,
            model=model,
            batches=batches,
        )
    except BaseException:
        spill.close()
        raise
    plan.factors = factor_source(whiten, floor, calibration, calibration_source, fisher_windows)
    spill.ranks = {d.module: d.rank for d in plan if d.mode != "keep"}
    return BudgetOutcome(plan, spill, chosen, free_ranks)


def factor_source(
    whiten: str,
    floor: float,
    calibration: torch.Tensor,
    calibration_source: Mapping[str, Any] | None,
    fisher_windows: int,
) -> FactorSource:
    """How a budget plan's factors were computed, as the plan records it for a replay."""
    return FactorSource(
        whiten=whiten,
        floor=floor if whiten != "none" else None,
        calibration=(
            {**calibration_source, "tokens_sha256": windows_digest(calibration)}
            if whiten != "none" and calibration_source is not None
            else None
        ),
        fisher_windows=fisher_windows if whiten == "fisher" else None,
    )


def decide_ranks(
    targets: Sequence[Target],
    values: Mapping[str, np.ndarray],
    *,
    whiten: str,
    allocation: str,
    importance: str,
    fisher_rows: Mapping[str, torch.Tensor],
    target_params: float | None,
    target_bytes: int | None = None,
    quantize: str | None = None,
    settings: dict[str, Any] | None = None,
    model: nn.Module | None = None,
    batches: Sequence[torch.Tensor] | None = None,
) -> tuple[CompressionPlan, Allocation | None, dict[str, int]]:
    """The budget's plan from every target's weighted singular values (``values``): the
    allocation, the allocation it came from (``None`` for a uniform one) and the RMT free ranks.

    ``fisher_rows`` are the Fisher row sums (``importance="fisher"``); ``model`` is needed by a
    byte budget and by the ``attention`` importance, ``batches`` by the latter.
    """
    names = [t.name for t in targets]
    shapes = {t.name: t.shape for t in targets}
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
        return uniform_plan(targets, target_params, extras, settings), None, free_ranks  # type: ignore[arg-type]
    scores = layer_importance(
        importance,
        names,
        # The importance reads the mean Fisher per parameter: the 0-d mean is its own mean.
        fisher=(
            {n: fisher_rows[n].sum() / (shapes[n][0] * shapes[n][1]) for n in names}
            if importance == "fisher"
            else None
        ),
        singular_values={n: curves[n].singular_values for n in names},
        model=model,
        batches=batches,
    )
    if target_bytes is not None:
        if model is None:
            raise InvalidOptionError("a budget in bytes needs the model to count its weights")
        removed = removal_for_size(model, targets, curves, scores, target_bytes, quantize)
        chosen = allocate_ranks(curves, target_params_removed=removed, importance=scores)
    else:
        chosen = allocate_ranks(curves, target_fraction=target_params, importance=scores)
    plan = allocation_to_plan(chosen, method="budget", settings=settings, extras=extras)
    return plan, chosen, free_ranks


def spill_weighted_factors(
    model: nn.Module,
    names: Sequence[str],
    whiten: str,
    batches: Sequence[torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    floor: float,
    spill: FactorSpill,
    keep: Mapping[str, int],
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Every named weight's generalised SVD for ``whiten``, one block at a time: its leading
    ``keep[name]`` triplets are written to ``spill`` as soon as the block is done and its
    singular values are returned (host numpy, for the RMT rule and the allocation).

    The input statistics (``svdllm``, ``asvd``) come block by block from
    :func:`~laserrmt.stats.calibration.iter_activation_statistics`; ``fisher`` holds the Fisher
    row sums (``fisher`` whitening). At most one block's statistics and factors are in memory.
    """
    try:
        blocks_name = find_blocks(model)[0] + "."
    except BlocksNotFoundError:
        blocks_name = None

    def block_of(name: str) -> str | None:
        if blocks_name is None or not name.startswith(blocks_name):
            return None
        return name[len(blocks_name) :].split(".", 1)[0]

    def statistics() -> Iterator[tuple[str, ActivationStatistics | None]]:
        if whiten not in ("svdllm", "asvd"):
            yield from ((name, None) for name in names)
            return
        for stats in iter_activation_statistics(model, batches, names, progress=progress):
            yield stats.module, stats
            del stats  # not held through the next block's forward

    left = Counter(block_of(name) for name in names)
    stream = statistics()
    values: dict[str, np.ndarray] = {}
    pending: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    bar = tqdm(
        total=len(names), desc=f"weighted SVD ({whiten})", unit="matrix", disable=not progress
    )
    shared = SharedWhitening()
    try:
        for name, stats in stream:
            svd = weighted_svd(
                weight_matrix(model.get_submodule(name)),
                whiten=whiten,
                gram=None if stats is None else stats.gram,
                n_samples=None if stats is None else stats.n_samples,
                fisher=fisher.get(name),
                floor=floor,
                module=name,
                shared=shared,
            )
            del stats
            values[name] = svd.s.cpu().numpy()
            if keep[name] > 0:
                k = keep[name]
                pending[name] = (svd.U[:, :k], svd.s[:k], svd.Vh[:k])
            del svd
            block = block_of(name)
            left[block] -= 1
            if left[block] == 0:
                spill.write(pending)
                pending.clear()
                shared.release()
            bar.update(1)
    finally:
        bar.close()
    return values


def replay_factors(
    model: nn.Module,
    plan: CompressionPlan,
    calibration: torch.Tensor,
    spill_dir: str | Path | None = None,
    progress: bool = True,
) -> FactorSpill:
    """The factors of ``plan``'s changed modules at their planned ranks, recomputed as
    :attr:`CompressionPlan.factors` says (only the statistics the whitening needs) on
    ``calibration``, the windows it names; the SVD cache for
    :func:`~laserrmt.surgery.apply.apply_plan`, spilled to a temporary folder under
    ``spill_dir`` (close it, or use it in a ``with`` block).

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
    ranks = {d.module: d.rank for d in plan if d.mode != "keep"}
    names = list(ranks)
    batches = list(calibration.split(1))
    fisher = {}
    if factors.whiten == "fisher":
        fisher = collect_fisher_diagonal(
            model, batches[: factors.fisher_windows], names, rows=True, progress=progress
        )
    floor = DEFAULT_FLOOR if factors.floor is None else factors.floor
    spill = FactorSpill(spill_dir)
    try:
        spill_weighted_factors(
            model, names, factors.whiten, batches, fisher, floor, spill, ranks, progress
        )
    except BaseException:
        spill.close()
        raise
    spill.ranks = ranks
    return spill


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
