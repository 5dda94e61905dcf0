"""Width reduction: make layers narrower where their activations carry only a few directions.

RMT-KD (arXiv 2509.15724) measures the spectrum of a hidden representation on calibration data,
keeps the ``k`` directions above the Marchenko–Pastur bulk and shrinks the layer to ``k``. The
stages live apart:

* where the widths are: :mod:`laserrmt.models.widths` (:class:`WidthSite`,
  :func:`find_width_sites`);
* what they carry: :mod:`laserrmt.stats.activations` (:func:`collect_site_statistics`, one
  forward pass under hooks for every site) and how many directions are signal: the rule
  :func:`laserrmt.rmt.activations.activation_rank` applied per site by :func:`site_rank`;
* the decision as a value: :class:`laserrmt.plan.WidthPlan`;
* the cuts, one file per kind of site: :mod:`.units` (MLP and CNN units across a
  nonlinearity), :mod:`.attention` (per-head value/output and query/key widths),
  :mod:`.residual` (the residual stream, SliceGPT); :mod:`.cut` dispatches
  (:func:`cut_width`) and replays a plan (:func:`apply_width_plan`).

Importing this package registers every layer a width cut can leave in a model
(:class:`ResizedLinear`, :class:`ResizedConv2d`, :class:`ResizedBatchNorm2d`,
:class:`ReducedSelfAttention`), so that :func:`laserrmt.surgery.io.load` rebuilds them.
"""

from laserrmt.models.widths import SiteKind, WidthSite, find_width_sites, residual_site
from laserrmt.rmt.activations import activation_rank
from laserrmt.stats.activations import (
    SiteRank,
    SiteStatistics,
    attention_head_ranks,
    collect_site_statistics,
    site_rank,
)
from laserrmt.surgery.width.attention import ReducedSelfAttention, query_key_maps
from laserrmt.surgery.width.cut import WidthCut, apply_width_plan, cut_width
from laserrmt.surgery.width.modules import ResizedBatchNorm2d, ResizedConv2d, ResizedLinear
from laserrmt.surgery.width.residual import (
    residual_width,
    rotate_residual_stream,
    slice_residual_stream,
)
from laserrmt.surgery.width.units import reconstruction_matrix, select_units

__all__ = [
    "ReducedSelfAttention",
    "ResizedBatchNorm2d",
    "ResizedConv2d",
    "ResizedLinear",
    "SiteKind",
    "SiteRank",
    "SiteStatistics",
    "WidthCut",
    "WidthSite",
    "activation_rank",
    "apply_width_plan",
    "attention_head_ranks",
    "collect_site_statistics",
    "cut_width",
    "find_width_sites",
    "query_key_maps",
    "reconstruction_matrix",
    "residual_site",
    "residual_width",
    "rotate_residual_stream",
    "select_units",
    "site_rank",
    "slice_residual_stream",
]
