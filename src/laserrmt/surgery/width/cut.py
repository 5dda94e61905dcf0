"""One entry for every kind of width cut, and the replay of a saved width decision."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from laserrmt.errors import PlanError
from laserrmt.evaluate import count_parameters
from laserrmt.models.widths import SiteKind, WidthSite
from laserrmt.plan import WidthPlan
from laserrmt.stats.activations import SiteStatistics, collect_site_statistics
from laserrmt.stats.forward import batches_fingerprint
from laserrmt.surgery.width.attention import cut_attention
from laserrmt.surgery.width.residual import residual_width, slice_residual_stream
from laserrmt.surgery.width.units import cut_units

__all__ = ["WidthCut", "apply_width_plan", "cut_width"]


@dataclass
class WidthCut:
    """What :func:`cut_width` did to one site."""

    site: str
    kind: SiteKind
    width_before: int
    width_after: int
    kept: list[int]
    parameters_before: int
    parameters_after: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cut_width(
    model: nn.Module,
    site: WidthSite,
    statistics: SiteStatistics,
    k: int,
    *,
    kept: Sequence[int] | None = None,
) -> WidthCut:
    """Cut ``site`` to ``k`` units (or ``k`` directions) in place; returns the record.

    Unit sites keep the units :func:`~laserrmt.surgery.width.units.select_units` picks (or
    ``kept``) and fold the reconstruction of the dropped ones into the consumer
    (:mod:`~laserrmt.surgery.width.units`); attention sites keep ``k / heads`` directions per
    head (:mod:`~laserrmt.surgery.width.attention`); the residual site projects onto the
    top-``k`` eigen-directions (:func:`~laserrmt.surgery.width.residual.slice_residual_stream`).
    ``k = width`` leaves the function the model computes unchanged.

    Raises:
        PlanError: ``k`` outside ``1..width`` or statistics of another width.
    """
    if statistics.width != site.width:
        raise PlanError(
            f"site {site.name} is {site.width} wide but its statistics are {statistics.width} "
            "wide; collect the statistics on the model as it is now"
        )
    if not 1 <= k <= site.width:
        raise PlanError(f"site {site.name}: cannot keep {k} of {site.width}; keep 1..{site.width}")
    before = count_parameters(model)["params_total"]
    if site.kind in ("attn_vo", "attn_qk"):
        k_head, width = cut_attention(model, site, statistics, k)
        units = list(range(k_head))
    elif site.kind == "residual":
        width = residual_width(model, k)
        slice_residual_stream(model, statistics.second_moment, width)
        units = list(range(width))
    else:
        units = cut_units(model, site, statistics, k, kept)
        width = k
    after = count_parameters(model)["params_total"]
    return WidthCut(site.name, site.kind, site.width, width, units, before, after)


def apply_width_plan(
    model: nn.Module,
    plan: WidthPlan,
    calibration: Iterable[torch.Tensor | Mapping[str, Any]] | None,
    *,
    progress: bool = True,
) -> list[WidthCut]:
    """Replay a width decision on the model it was made for, cut by cut, in plan order.

    A cut's reconstruction (which directions, how the dropped units are rebuilt) is computed
    from the activation statistics of the model *as the earlier cuts left it*, so the plan
    stores how to recompute them: the calibration batches' fingerprint. Replayed on the same
    original model with the same batches, every statistic and every cut is the one the run made.

    Raises:
        PlanError: the plan says the run also trained the model (its weights are not in a plan),
            no or other calibration batches, or a site the model does not have.
    """
    plan.check_replayable()
    for decision in plan.decisions:
        for name in (*decision.producers, *decision.followers, decision.consumer):
            try:
                model.get_submodule(name)
            except AttributeError:
                raise PlanError(
                    f"site {decision.site} names module {name}, which {type(model).__name__} "
                    "does not have; the plan was made for another model"
                ) from None
    if not plan.decisions:
        return []
    if calibration is None:
        raise PlanError(
            "a width plan rebuilds its cuts from activation statistics; pass the calibration "
            "batches it was made with (calibration=...)"
        )
    batches = list(calibration)
    expected = plan.calibration.get("fingerprint")
    if expected is None or batches_fingerprint(batches) != expected:
        raise PlanError(
            "these calibration batches are not the ones the width plan was made with "
            "(fingerprint differs); pass the same batches in the same order"
        )
    cuts = []
    for decision in tqdm(plan.decisions, desc="width cuts", disable=not progress):
        site = WidthSite(
            decision.site,
            decision.kind,
            decision.width,
            decision.producers,
            decision.followers,
            decision.consumer,
        )
        stats = collect_site_statistics(model, batches, [site], progress=False)[site.name]
        cuts.append(cut_width(model, site, stats, decision.kept_width, kept=decision.kept))
    return cuts
