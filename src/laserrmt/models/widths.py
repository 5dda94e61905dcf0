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

import torch
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
    "shared_channel_sites",
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
    flattened. That rule holds for plain chains (``nn.Sequential`` CNNs such as LeNet/VGG);
    in networks with skip connections (ResNet) it also lists convolutions whose output is added
    to a skip connection, which cannot be cut alone: :func:`shared_channel_sites` finds them on
    a batch (RMT-KD skips them and says so). ``"residual"``: the residual stream of a
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


def shared_channel_sites(
    model: nn.Module, sites: Sequence[WidthSite], batch: Any
) -> dict[str, str]:
    """The ``"channels"`` sites whose channels are not theirs alone to cut, each with the reason.

    A channel site can be cut when its consumer reads the producer's channels and nothing else,
    and nothing else reads them. A skip connection breaks either: the consumer reads the
    channels *plus* a shortcut (the convolution before a residual add), or the channels also
    travel around the consumer (the stem of a ResNet, whose output is a block's identity
    shortcut). Both are tested on ``batch`` (a calibration batch; model in eval mode, no grad),
    exactly rather than by reading the code:

    1. the producer's output held fixed while the input changes must leave the consumer's
       input unchanged;
    2. the producer's output changed while the consumer's input is held fixed must leave the
       model's output unchanged.

    Other kinds of site are not tested (their layouts are known per architecture).
    """
    found = {}
    for site in sites:
        if site.kind == "channels":
            reason = _shared_reason(model, site, batch)
            if reason:
                found[site.name] = reason
    return found


def _shared_reason(model: nn.Module, site: WidthSite, batch: Any) -> str:
    from laserrmt.stats.forward import output_logits, run_forward

    producer = model.get_submodule(site.producers[0])
    consumer = model.get_submodule(site.consumer)
    produced: list[torch.Tensor] = []
    read: list[tuple[Any, ...]] = []
    outputs: list[torch.Tensor] = []

    def keep_output(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        produced.append(output.clone())

    def keep_input(module: nn.Module, args: tuple[Any, ...], kwargs: Any) -> None:
        read.append(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))

    def after(batch: Any, output: Any) -> None:
        outputs.append(output_logits(output))

    run_forward(
        model,
        [batch],
        [(producer, "output", keep_output), (consumer, "input", keep_input)],
        after_each=after,
    )
    reference_read, reference_out = list(read), outputs[0]

    calls = iter(produced)
    read.clear()
    run_forward(
        model,
        [_perturbed(batch)],
        [(producer, "output", lambda m, a, o: next(calls)), (consumer, "input", keep_input)],
    )
    if not all(_same(a, b) for a, b in zip(read, reference_read, strict=True)):
        return (
            f"{site.consumer} also reads what {site.name} does not produce (a skip connection "
            "adds into its input)"
        )

    given = iter(reference_read)
    outputs.clear()
    run_forward(
        model,
        [batch],
        [
            (producer, "output", lambda m, a, o: _perturbed(o)),
            (consumer, "input", lambda m, a, k: (next(given), k)),
        ],
        after_each=after,
    )
    if not _same(outputs[0], reference_out):
        return (
            f"{site.name}'s output also reaches the model's output around {site.consumer} (a "
            "skip connection reads it)"
        )
    return ""


def _perturbed(value: Any) -> Any:
    """Floating-point tensors plus noise of their own scale (seeded); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
        return value + noise.to(value.device) * (value.std() + 1)
    if isinstance(value, Mapping):
        return {k: _perturbed(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_perturbed(v) for v in value)
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal up to float rounding (the same operations on the same numbers, maybe reordered)."""
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if not isinstance(a, torch.Tensor):
        return bool(a == b)
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=0, atol=1e-5 * (1 + scale)))
