"""A global parameter budget turned into one rank per matrix.

The user gives one number (parameters to remove, or a fraction of the target matrices'
parameters); every matrix's rank follows from its **loss curve**. A matrix ``m × n`` with
spectrum ``s_1 ≥ … ≥ s_p`` (of whichever space the factorization works in: plain weights, the
SVD-LLM whitened ``W S``, ASVD's scaled ``W D``…) loses ``L(k) = Σ_{i>k} s_i²`` at rank k, and
that loss is exact output error for the whitened spectrum (see :mod:`laserrmt.surgery.whiten`).
Directions are removed, across all matrices, in order of least (importance-weighted) loss per
parameter saved, until the budget is met: the "global budget → inter-layer allocation" step of
the LaserRMT seed; SVD-LLM V2 (Wang et al., NAACL 2025) similarly derives per-matrix ratios from
the theoretical truncation loss.

Parameter cost and the first jump
---------------------------------
A matrix stays dense (``m·n`` parameters) until its rank k satisfies ``k(m + n) < m·n``
(:func:`laserrmt.plan.factorize_pays`); below that each direction removed saves ``m + n``. So
the first move of a matrix is a jump from dense to some paying rank, saving
``m·n − k(m + n)`` at a loss ``L(k)``, and later moves are single directions. The greedy works on
the lower convex hull of each matrix's (parameters saved, loss) curve: the first move goes to
the rank ``k*`` that minimises the average cost ``L(k) / (m·n − k(m + n))``, and from there the
single steps cost ``s_k² / (m + n)``, which never decreases (the mediant of a minimal average
and the next step is no smaller). Hence every matrix's moves come in non-decreasing cost and
one priority queue merges them optimally for the fractional problem. When the last move is a
jump, it stops at the largest paying rank that meets the budget, so the removed count always
overshoots the target by less than ``m + n`` of the last matrix touched.

Which loss: relative or absolute
--------------------------------
``normalize="relative"`` (the default) divides each matrix's loss by its total
``Σ s_i²``: the fraction of that matrix's output energy (or weight energy) lost. Absolute
output errors are in each layer's own units (a ``down_proj`` writes into the residual stream
at a different scale than a ``q_proj`` feeds a softmax) and how much an error hurts downstream
is unknown, so the absolute loss would cut hardest wherever outputs happen to be small. The
relative loss is invariant to rescaling one matrix, which keeps the allocation from following
scale alone; importance scores (:mod:`laserrmt.stats.importance`) are the place to say which
layers matter more. ``normalize="absolute"`` is kept for comparison.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from laserrmt.errors import BudgetError, InvalidOptionError
from laserrmt.plan import CompressionPlan, Mode, ModuleDecision, factorize_pays

__all__ = [
    "NORMALIZATIONS",
    "Allocation",
    "LossCurve",
    "Normalization",
    "allocate_ranks",
    "allocation_to_plan",
    "largest_paying_rank",
]

Normalization = Literal["relative", "absolute"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)


def largest_paying_rank(shape: tuple[int, int]) -> int:
    """The largest k with ``k(m + n) < m·n``; 0 when no rank ≥ 1 saves parameters."""
    m, n = shape
    return (m * n - 1) // (m + n)


@dataclass(frozen=True)
class LossCurve:
    """The spectrum of one ``m × n`` matrix, from which the loss of every rank follows.

    Attributes:
        shape: ``(m, n)`` = (out, in).
        singular_values: the ``min(m, n)`` singular values of the matrix in the factorization's
            space, stored float64 and sorted descending.
    """

    shape: tuple[int, int]
    singular_values: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if len(shape) != 2 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in shape
        ):
            raise InvalidOptionError(f"loss curve shape {self.shape!r} must be two positive ints")
        values = np.asarray(self.singular_values, dtype=np.float64).reshape(-1)
        full = min(shape)
        if values.shape[0] != full:
            raise InvalidOptionError(
                f"a {shape[0]}×{shape[1]} matrix has {full} singular values, got "
                f"{values.shape[0]}; pass its whole spectrum"
            )
        if not np.isfinite(values).all() or (values < 0).any():
            raise InvalidOptionError(
                "singular values must be finite and non-negative; recompute the spectrum"
            )
        object.__setattr__(self, "shape", (int(shape[0]), int(shape[1])))
        object.__setattr__(self, "singular_values", np.sort(values)[::-1].copy())

    @property
    def rank_full(self) -> int:
        return min(self.shape)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    def tail_energies(self) -> np.ndarray:
        """``t[k] = Σ_{i>k} s_i²`` for k = 0..p (``t[p] = 0``), summed smallest first."""
        squares = self.singular_values**2
        tails = np.cumsum(squares[::-1])[::-1]
        return np.concatenate([tails, [0.0]])

    def loss(self, rank: int) -> float:
        """``Σ_{i>rank} s_i²``: the loss of truncating to ``rank``."""
        if not 0 <= rank <= self.rank_full:
            raise InvalidOptionError(f"rank {rank} is outside 0..{self.rank_full}")
        return float(self.tail_energies()[rank])


@dataclass
class Allocation:
    """The ranks a budget gives every matrix, and what they remove.

    Attributes:
        ranks: module → rank; ``min(m, n)`` for matrices left dense.
        shapes: module → ``(m, n)``.
        params_before: ``Σ m·n`` over all matrices (dense ones included).
        params_removed: parameters the allocation removes (factorized matrices store
            ``k(m + n)``).
        target_params_removed: the budget asked for.
        reachable_max: the most any allocation can remove (every paying matrix at rank 1).
        order: the moves in the order they were taken, ``(module, rank after the move)``.
        losses: module → loss at its rank (relative or absolute, per ``normalize``; unweighted).
        importance: module → importance weight used.
        unreducible: matrices whose factorization cannot save parameters at any rank ≥ 1
            (left dense).
        normalize: ``"relative"`` or ``"absolute"``.
    """

    ranks: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    params_before: int
    params_removed: int
    target_params_removed: int
    reachable_max: int
    order: list[tuple[str, int]] = field(repr=False)
    losses: dict[str, float] = field(repr=False)
    importance: dict[str, float] = field(repr=False)
    unreducible: list[str]
    normalize: str

    @property
    def params_after(self) -> int:
        return self.params_before - self.params_removed

    @property
    def fraction_removed(self) -> float:
        return self.params_removed / self.params_before if self.params_before else 0.0

    def reduced(self) -> list[str]:
        """Modules whose rank was lowered (hence factorized)."""
        return [name for name, k in self.ranks.items() if k < min(self.shapes[name])]

    def summary(self) -> dict[str, Any]:
        """JSON-ready totals, for a plan's settings or a report."""
        return {
            "params_before": self.params_before,
            "params_removed": self.params_removed,
            "target_params_removed": self.target_params_removed,
            "fraction_removed": self.fraction_removed,
            "reachable_max": self.reachable_max,
            "normalize": self.normalize,
            "n_reduced": len(self.reduced()),
            "unreducible": list(self.unreducible),
        }


def _resolve_target(
    target_params_removed: int | None, target_fraction: float | None, params_before: int
) -> int:
    if (target_params_removed is None) == (target_fraction is None):
        raise InvalidOptionError(
            "give exactly one budget: target_params_removed (a count) or target_fraction"
        )
    if target_fraction is not None:
        if (
            isinstance(target_fraction, bool)
            or not isinstance(target_fraction, numbers.Real)
            or not 0 < target_fraction < 1
        ):
            raise InvalidOptionError(
                f"target fraction {target_fraction!r} must be strictly between 0 and 1 "
                "(for example 0.2 to remove 20 % of the target matrices' parameters)"
            )
        return math.ceil(float(target_fraction) * params_before)
    if (
        isinstance(target_params_removed, bool)
        or not isinstance(target_params_removed, numbers.Integral)
        or target_params_removed < 0
    ):
        raise InvalidOptionError(
            f"target_params_removed {target_params_removed!r} must be a non-negative integer"
        )
    return int(target_params_removed)


def _resolve_importance(
    names: Sequence[str], importance: Mapping[str, float] | None
) -> dict[str, float]:
    if importance is None:
        return dict.fromkeys(names, 1.0)
    missing = [name for name in names if name not in importance]
    if missing:
        shown = ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
        raise InvalidOptionError(
            f"importance scores are missing for {len(missing)} matrices ({shown}); score every "
            "matrix (1.0 for neutral)"
        )
    weights: dict[str, float] = {}
    for name in names:
        value = importance[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or value < 0
        ):
            raise InvalidOptionError(
                f"importance of {name} is {value!r}; scores must be finite and non-negative"
            )
        weights[name] = float(value)
    return weights


def allocate_ranks(
    curves: Mapping[str, LossCurve],
    *,
    target_params_removed: int | None = None,
    target_fraction: float | None = None,
    importance: Mapping[str, float] | None = None,
    normalize: Normalization | str = "relative",
) -> Allocation:
    """Choose every matrix's rank so that the budget is met at the least weighted loss.

    Moves (see the module doc) are taken from a priority queue in order of
    ``importance · Δloss / Δparameters``; ties go to the matrix listed first. The loop stops as
    soon as the removed parameters reach the target, so ``removed − target < m + n`` of the
    last matrix touched. No matrix gets a rank above ``min(m, n)`` or below 1; matrices that no
    rank can make smaller are left dense and listed in :attr:`Allocation.unreducible`.

    Args:
        curves: module → :class:`LossCurve`, in a fixed order (ties follow it).
        target_params_removed: parameters to remove; or
        target_fraction: fraction of ``Σ m·n`` to remove, in (0, 1) (rounded up to a count).
        importance: module → non-negative weight on its loss (higher keeps more rank);
            every module must have one. ``None`` weighs all equally.
        normalize: ``"relative"`` (loss over the matrix's total ``Σ s²``; default) or
            ``"absolute"``.

    Raises:
        InvalidOptionError: no or two budgets, a fraction outside (0, 1), missing or invalid
            importance scores, an unknown normalisation, or no curves.
        BudgetError: a budget above the reachable maximum; the message gives that maximum.
    """
    if normalize not in NORMALIZATIONS:
        raise InvalidOptionError(
            f"unknown loss normalisation {normalize!r}; use one of {', '.join(NORMALIZATIONS)}"
        )
    names = list(curves)
    if not names:
        raise InvalidOptionError("no matrices to allocate a budget over; select some targets")
    for name in names:
        if not isinstance(curves[name], LossCurve):
            raise InvalidOptionError(f"curve of {name} is a {type(curves[name]).__name__}")
    weights = _resolve_importance(names, importance)
    params_before = sum(curves[name].params for name in names)
    target = _resolve_target(target_params_removed, target_fraction, params_before)

    unreducible = [name for name in names if largest_paying_rank(curves[name].shape) < 1]
    reachable_max = sum(
        curves[name].params - sum(curves[name].shape) for name in names if name not in unreducible
    )
    if target > reachable_max:
        raise BudgetError(
            f"removing {target} parameters ({target / params_before:.1%} of {params_before}) is "
            f"not reachable: the largest reachable budget is {reachable_max} parameters "
            f"({reachable_max / params_before:.2%}, every matrix at rank 1); ask for at most that"
        )

    ranks = {name: curves[name].rank_full for name in names}
    costs: dict[str, np.ndarray] = {}  # weighted loss of every rank 0..p
    heap: list[tuple[float, int, str, int]] = []  # (cost per parameter, index, name, rank to)
    for index, name in enumerate(names):
        curve = curves[name]
        tails = curve.tail_energies()
        scale = tails[0] if normalize == "relative" and tails[0] > 0 else 1.0
        costs[name] = weights[name] * tails / scale
        if name in unreducible:
            continue
        m, n = curve.shape
        paying = np.arange(1, largest_paying_rank(curve.shape) + 1)
        saved = m * n - paying * (m + n)
        average = costs[name][paying] / saved
        # argmin takes the first minimum; reversing prefers the largest rank (smallest jump).
        best = paying[::-1][int(np.argmin(average[::-1]))]
        heapq.heappush(heap, (float(average[best - 1]), index, name, int(best)))

    removed = 0
    order: list[tuple[str, int]] = []
    while removed < target:
        _, index, name, rank_to = heapq.heappop(heap)
        curve = curves[name]
        m, n = curve.shape
        rank_from = ranks[name]
        if rank_from == curve.rank_full:
            # The jump from dense: stop at the largest paying rank that meets the budget.
            need = target - removed
            rank_to = max(rank_to, min(largest_paying_rank(curve.shape), (m * n - need) // (m + n)))
            removed += m * n - rank_to * (m + n)
        else:
            removed += (rank_from - rank_to) * (m + n)
        ranks[name] = rank_to
        order.append((name, rank_to))
        if rank_to > 1:
            step = float(costs[name][rank_to - 1] - costs[name][rank_to]) / (m + n)
            heapq.heappush(heap, (step, index, name, rank_to - 1))

    unweighted = {name: _unweighted_loss(curves[name], ranks[name], normalize) for name in names}
    return Allocation(
        ranks=ranks,
        shapes={name: curves[name].shape for name in names},
        params_before=params_before,
        params_removed=removed,
        target_params_removed=target,
        reachable_max=reachable_max,
        order=order,
        losses=unweighted,
        importance=weights,
        unreducible=unreducible,
        normalize=str(normalize),
    )


def _unweighted_loss(curve: LossCurve, rank: int, normalize: str) -> float:
    tails = curve.tail_energies()
    scale = tails[0] if normalize == "relative" and tails[0] > 0 else 1.0
    return float(tails[rank] / scale)


def allocation_to_plan(
    allocation: Allocation,
    *,
    method: str = "budget",
    settings: Mapping[str, Any] | None = None,
    extras: Mapping[str, Mapping[str, Any]] | None = None,
) -> CompressionPlan:
    """The allocation as a :class:`CompressionPlan`: ``factorize`` where the rank was lowered,
    ``keep`` elsewhere (with the reason: not needed by the budget, or cannot pay).

    Args:
        method: the plan's method name.
        settings: the options to record; the allocation's totals are added under ``"budget"``.
        extras: module → extra JSON values for its decision (whitening floor, free rank…).
    """
    decisions = []
    for name, rank in allocation.ranks.items():
        m, n = allocation.shapes[name]
        full = min(m, n)
        extra: dict[str, Any] = {
            "loss": allocation.losses[name],
            "importance": allocation.importance[name],
            "loss_normalization": allocation.normalize,
        }
        extra.update(dict((extras or {}).get(name, {})))
        mode: Mode
        if rank < full:
            if not factorize_pays((m, n), rank):  # the allocator never lands here
                raise AssertionError(f"allocation gave {name} a rank that does not pay")
            mode = "factorize"
            reason = (
                f"budget: rank {rank} of {full}, {rank * (m + n)} parameters instead of {m * n}"
            )
        elif name in allocation.unreducible:
            mode = "keep"
            reason = f"factorizing a {m}×{n} matrix saves no parameters at any rank; kept dense"
        else:
            mode = "keep"
            reason = "budget met without reducing this matrix; kept dense"
        decisions.append(
            ModuleDecision(
                module=name,
                shape=(m, n),
                rank_full=full,
                rank=rank,
                mode=mode,
                reason=reason,
                extras=extra,
            )
        )
    recorded = dict(settings or {})
    recorded["budget"] = allocation.summary()
    return CompressionPlan.from_decisions(decisions, method=method, settings=recorded)
