"""Width sites: the hidden widths a model offers for cutting, as plain values.

A :class:`WidthSite` names who computes a width's units, who else acts on them unit by unit and
who reads them; :func:`find_width_sites` lists them from the layouts of
:mod:`laserrmt.models.architectures`. Statistics (:mod:`laserrmt.stats.activations`), the width
decision (:class:`laserrmt.plan.WidthPlan`) and the cuts (:mod:`laserrmt.surgery.width`) all
speak of sites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from torch import nn

from laserrmt.errors import InvalidOptionError, TargetSelectionError
from laserrmt.models.architectures import (
    SelfAttentionLayout,
    UnitLayout,
    block_index,
    channel_chains,
    encoder_self_attentions,
    mlp_layouts,
    residual_layout,
)

SiteKind = Literal["channels", "mlp", "residual", "attn_vo", "attn_qk"]
SITE_KINDS: tuple[str, ...] = get_args(SiteKind)

__all__ = [
    "SITE_KINDS",
    "SiteKind",
    "WidthSite",
    "attention_layout",
    "find_width_sites",
    "residual_site",
]


@dataclass(frozen=True)
class WidthSite:
    """A hidden width that can be cut: who produces the units, who else is unit-wise, who reads.

    ``producers`` compute the units (their output rows are selected: a convolution; the gate and
    up projections; BERT's ``intermediate.dense``); ``followers`` act unit by unit and are cut
    along (BatchNorm2d); ``consumer`` reads the units (its input columns absorb the
    reconstruction). For ``kind="residual"`` the other fields are empty and the whole stream is
    the site.
    """

    name: str
    kind: SiteKind
    width: int
    producers: tuple[str, ...] = ()
    followers: tuple[str, ...] = ()
    consumer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WidthSite:
        return cls(
            name=str(data["name"]),
            kind=data["kind"],
            width=int(data["width"]),
            producers=tuple(data.get("producers", ())),
            followers=tuple(data.get("followers", ())),
            consumer=str(data.get("consumer", "")),
        )


def _unit_sites(kind: SiteKind, layouts: list[UnitLayout], suffix: str = "") -> list[WidthSite]:
    return [
        WidthSite(
            name=u.name + suffix,
            kind=kind,
            width=u.width,
            producers=u.producers,
            followers=u.followers,
            consumer=u.consumer,
        )
        for u in layouts
    ]


def _attention_sites(model: nn.Module) -> list[WidthSite]:
    sites = []
    for layout in encoder_self_attentions(model):
        prefix = layout.self_name[: -len(".self")]
        sites.append(
            WidthSite(
                name=f"{prefix}.vo",
                kind="attn_vo",
                width=layout.heads * layout.v_head_size,
                producers=(layout.self_name,),
                consumer=layout.output_name,
            )
        )
        sites.append(
            WidthSite(
                name=f"{prefix}.qk",
                kind="attn_qk",
                width=layout.heads * layout.qk_head_size,
                producers=(layout.self_name,),
                consumer=layout.self_name,
            )
        )
    return sites


def find_width_sites(model: nn.Module, kinds: Sequence[SiteKind] | None = None) -> list[WidthSite]:
    """Every width the model offers, shallow to deep.

    ``"mlp"``: the intermediate width of each transformer block's MLP (roles from
    :mod:`laserrmt.models.architectures`). ``"channels"``: the output channels of each
    ``Conv2d`` (groups = 1) whose next layer in registration order (after optional BatchNorm2d
    layers) is a ``Conv2d`` reading exactly those channels or a ``Linear`` reading them
    flattened. That rule holds for plain chains (``nn.Sequential`` CNNs such as LeNet/VGG),
    **not** for networks with skip connections (ResNet), where a convolution's output has
    several readers; name the sites yourself there. ``"residual"``: the residual stream of a
    Llama-style model (see :func:`laserrmt.surgery.width.slice_residual_stream`); only listed
    when asked for. ``"attn_vo"`` / ``"attn_qk"`` (both: ``"attention"``): the per-head
    value/output and query/key widths of BERT-style encoder self-attention (see
    :class:`laserrmt.surgery.width.ReducedSelfAttention`).

    Transformer sites come block by block, in forward order within a block (attention value
    and query/key widths, then the MLP).
    """
    wanted: tuple[str, ...] = (
        tuple(kinds) if kinds is not None else ("mlp", "attention", "channels")
    )
    known = {"mlp", "channels", "residual", "attention", "attn_vo", "attn_qk"}
    unknown = set(wanted) - known
    if unknown:
        raise InvalidOptionError(
            f"unknown site kinds {sorted(unknown)}; use {', '.join(sorted(known))}"
        )
    sites: list[WidthSite] = []
    if "residual" in wanted:
        sites.append(residual_site(model))
    block_sites: list[WidthSite] = []
    attention_kinds = {"attn_vo", "attn_qk"} if "attention" in wanted else set(wanted)
    block_sites.extend(s for s in _attention_sites(model) if s.kind in attention_kinds)
    if "mlp" in wanted:
        block_sites.extend(_unit_sites("mlp", mlp_layouts(model), ".mlp"))
    # Stable sort: attention before MLP within a block, as the forward pass meets them.
    block_sites.sort(key=lambda s: block_index(s.name) or 0)
    sites.extend(block_sites)
    if "channels" in wanted and not block_sites:
        sites.extend(_unit_sites("channels", channel_chains(model)))
    return sites


def residual_site(model: nn.Module) -> WidthSite:
    """The residual stream of a Llama-style model as one site."""
    return WidthSite(name="residual_stream", kind="residual", width=residual_layout(model).width)


def attention_layout(model: nn.Module, site: WidthSite) -> SelfAttentionLayout:
    """The self-attention an ``attn_vo`` / ``attn_qk`` site belongs to, as the model is now."""
    for layout in encoder_self_attentions(model):
        if layout.self_name == site.producers[0]:
            return layout
    raise TargetSelectionError(
        f"site {site.name}: {site.producers[0]} is not a BERT-style self-attention any more"
    )
