"""Apply a :class:`~laserrmt.plan.CompressionPlan` to a model: the only place that swaps layers.

Every decision is checked against the model before anything changes (the module exists, is a
supported layer, has the planned shape, does not share its weight with another module), so a
plan that does not fit the model raises :class:`~laserrmt.errors.PlanError` on an untouched
model. Then each ``factorize`` decision replaces its layer by a low-rank module and each
``denoise`` decision overwrites its weight in place; ``keep`` decisions are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import nn
from tqdm.auto import tqdm

from laserrmt.errors import LaserRMTError, PlanError
from laserrmt.plan import CompressionPlan, ModuleDecision, WidthPlan
from laserrmt.surgery.lowrank import denoise_, factorize, restore_, weight_as_matrix
from laserrmt.surgery.replace import set_submodule

if TYPE_CHECKING:
    from laserrmt.surgery.width import WidthCut


@dataclass
class AppliedChange:
    """One change :func:`apply_plan` made.

    Attributes:
        module: full module name.
        mode: ``"factorize"`` or ``"denoise"``.
        rank: rank kept.
        shape: (m, n) of the weight matrix.
        params_before: ``m·n``.
        params_after: ``k(m + n)`` when factorized, ``m·n`` when denoised.
        original: with ``keep_originals=True``, what :func:`revert_changes` needs: the replaced
            module (factorize) or an exact copy of the original weight (denoise); else ``None``.
    """

    module: str
    mode: str
    rank: int
    shape: tuple[int, int]
    params_before: int
    params_after: int
    original: nn.Module | torch.Tensor | None = None


@overload
def apply_plan(
    model: nn.Module,
    plan: CompressionPlan,
    *,
    svd_cache: Mapping[str, Sequence[Any]] | None = None,
    calibration: Iterable[Any] | None = None,
    progress: bool = True,
    keep_originals: bool = False,
    factorizer: Callable[..., nn.Module] = factorize,
) -> list[AppliedChange]: ...


@overload
def apply_plan(
    model: nn.Module,
    plan: WidthPlan,
    *,
    svd_cache: Mapping[str, Sequence[Any]] | None = None,
    calibration: Iterable[Any] | None = None,
    progress: bool = True,
    keep_originals: bool = False,
    factorizer: Callable[..., nn.Module] = factorize,
) -> list[WidthCut]: ...


def apply_plan(
    model: nn.Module,
    plan: CompressionPlan | WidthPlan,
    *,
    svd_cache: Mapping[str, Sequence[Any]] | None = None,
    calibration: Iterable[Any] | None = None,
    progress: bool = True,
    keep_originals: bool = False,
    factorizer: Callable[..., nn.Module] = factorize,
) -> list[AppliedChange] | list[WidthCut]:
    """Factorize or denoise each planned module of ``model`` in place.

    A :class:`~laserrmt.plan.WidthPlan` is replayed by
    :func:`laserrmt.surgery.width.apply_width_plan` instead, on its ``calibration`` batches.

    Args:
        model: the model to change.
        plan: decisions keyed by full module name.
        svd_cache: module name → ``(U, S, Vh)`` of its out × in weight matrix (float64, torch or
            numpy, at least ``rank`` triplets), so the SVDs computed during analysis are reused;
            modules without an entry get a fresh float64 SVD.
        calibration: the batches a width plan was made with (width plans only).
        progress: show a progress bar on stderr.
        keep_originals: keep what :func:`revert_changes` needs in each change (memory: the
            replaced layers and the denoised weights stay alive).
        factorizer: builds a ``factorize`` decision's layer, called as
            ``factorizer(module, rank, svd=..., name=...)``; e.g.
            :func:`laserrmt.surgery.sparse.sparse_factorizer` for low rank plus sparse.

    Returns:
        The changes made, in plan order (``keep`` decisions make none).

    Raises:
        PlanError: a planned module that does not exist, has another shape, is not a supported
            layer, or shares its weight with another module; nothing has been changed then.
        NumericalError: a factorization produced NaN/Inf (names the module). Modules earlier in
            the plan have been changed by then; they are listed in the message.
    """
    if isinstance(plan, WidthPlan):
        from laserrmt.surgery.width import apply_width_plan  # it imports this package's parts

        return apply_width_plan(model, plan, calibration, progress=progress)
    cache = svd_cache or {}
    active = [d for d in plan.decisions.values() if d.mode != "keep"]
    sharing = _shared_parameter_names(model)
    for decision in plan.decisions.values():
        _validate(model, decision, sharing)

    changes: list[AppliedChange] = []
    bar = tqdm(active, desc="surgery", unit="module", disable=not progress or not active)
    for decision in bar:
        name = decision.module
        module = model.get_submodule(name)
        svd = cache.get(name)
        try:
            if decision.mode == "factorize":
                replacement = factorizer(module, decision.rank, svd=svd, name=name)
                set_submodule(model, name, replacement)
                original: nn.Module | torch.Tensor | None = module
            else:
                original = denoise_(module, decision.rank, svd=svd, name=name)
        except LaserRMTError as exc:
            if changes:
                done = ", ".join(c.module for c in changes)
                raise type(exc)(f"{exc} (already changed: {done})") from None
            raise
        changes.append(
            AppliedChange(
                module=name,
                mode=decision.mode,
                rank=decision.rank,
                shape=decision.shape,
                params_before=decision.params_before,
                params_after=decision.params_after,
                original=original if keep_originals else None,
            )
        )
    return changes


def revert_changes(model: nn.Module, changes: Sequence[AppliedChange]) -> None:
    """Undo changes made by :func:`apply_plan` with ``keep_originals=True`` (newest first).

    Factorized modules get their original layer back and denoised ones their exact original
    weight, so the model is bit-identical to before.
    """
    missing = [c.module for c in changes if c.original is None]
    if missing:
        raise PlanError(
            f"cannot revert {', '.join(missing)}: apply the plan with keep_originals=True"
        )
    for change in reversed(changes):
        if change.mode == "factorize":
            assert isinstance(change.original, nn.Module)
            set_submodule(model, change.module, change.original)
        else:
            assert isinstance(change.original, torch.Tensor)
            restore_(model.get_submodule(change.module), change.original, name=change.module)


def _validate(model: nn.Module, decision: ModuleDecision, sharing: dict[int, list[str]]) -> None:
    name = decision.module
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise PlanError(
            f"module {name} named in the plan does not exist in {type(model).__name__}; "
            "the plan was made for another model"
        ) from None
    try:
        matrix = weight_as_matrix(module, name)
    except LaserRMTError as exc:
        raise PlanError(str(exc)) from None
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    if shape != decision.shape:
        raise PlanError(
            f"module {name} has a {shape[0]}×{shape[1]} weight but the plan says "
            f"{decision.shape[0]}×{decision.shape[1]}; the plan was made for another model"
        )
    if decision.mode == "keep":
        return
    others = [n for n in sharing.get(id(module.weight), []) if n != f"{name}.weight"]
    if others:
        raise PlanError(
            f"module {name} shares its weight with {', '.join(others)} (tied weights); "
            f"to {decision.mode} it would change or duplicate the shared matrix, so set its mode "
            "to 'keep' or untie the weights first"
        )
    parent = _parent(model, name)
    if decision.mode == "factorize" and isinstance(parent, nn.MultiheadAttention):
        raise PlanError(
            f"module {name} belongs to nn.MultiheadAttention, which reads its weight directly; "
            "use mode 'denoise' for it"
        )


def _shared_parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id → every name it is reachable under (more than one means tied)."""
    names: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(pname)
    return {key: value for key, value in names.items() if len(value) > 1}


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model
