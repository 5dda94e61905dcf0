"""Width reduction: make layers narrower where their activations carry only a few directions.

RMT-KD (arXiv 2509.15724) measures the spectrum of a hidden representation on calibration data,
keeps the ``k`` directions above the Marchenko–Pastur bulk and shrinks the layer to ``k``. This
module does the cutting; the decision (``k``) comes from :func:`activation_rank`, which asks
:func:`laserrmt.rmt.thresholds.choose_rank` (the one implementation of the MP rule).

Two kinds of site
-----------------
**Across a nonlinearity** (the channels of a convolution followed by BatchNorm/ReLU/pooling,
the intermediate width of an MLP: ``act(W_in x)`` or ``act(W_gate x) ⊙ W_up x``). A rotation
``U_kᵀ`` of the hidden units cannot be moved into the producing layer, because ``act(U_kᵀ W x)
≠ U_kᵀ act(W x)``. Inserting the projection after the nonlinearity and folding it into the
consumer (``W_out U_k``) is exact, but it removes nothing: the producer still computes all
``d`` units, and the projection is just a low-rank factorization of the consumer. So the cut
here keeps ``k`` *units* (channels, neurons) instead of ``k`` directions, which is what removes
parameters on both sides (``(d − k)`` rows of every producer, ``(d − k)`` columns of the
consumer):

1. ``k`` is the number of eigen-directions of the consumer-input second moment
   ``C = E[h hᵀ]`` above the MP edge.
2. The ``k`` units that best span those directions are chosen by a column-pivoted QR of
   ``Λ_k^{1/2} U_kᵀ`` (a subset-selection rule for the signal subspace; Golub & Van Loan §5.4.6,
   as in DEIM/CUR): a unit whose signal part is already explained by chosen units is skipped.
3. The dropped units are replaced by their least-squares reconstruction from the kept ones,
   ``h ≈ R h_S`` with ``R = C_{:,S} C_{S,S}⁻¹`` (the linear regression of every unit on the kept
   units), and ``R`` is folded into the consumer: ``W_out' = W_out R``. Selecting units
   commutes with every unit-wise operation (activation, gate product, BatchNorm, ReLU, max
   pooling), so the kept units are computed exactly; only the dropped ones are estimated.

With all units kept ``R = I`` and the model is unchanged; when the activations lie in a
``k``-dimensional subspace the kept ``k`` units span it and the reconstruction is exact. The
second moment is *uncentred* on purpose: an intercept would be folded into the consumer's bias,
which is wrong at the zero-padded borders of a convolution.

**The residual stream** of a Llama-style (pre-RMSNorm) transformer, the SliceGPT route
(Ashkboos et al., ICLR 2024, "computational invariance"): every RMSNorm scale is folded into
the linear layers that read the normalised stream, after which RMSNorm commutes with any
orthogonal ``Q`` (``‖Qᵀx‖ = ‖x‖``). One rotation ``Q`` (the eigenvectors of the residual
activations' second moment pooled over all block boundaries) is applied to the embedding, to
every layer that reads the stream (from the input side) and every layer that writes to it (from
the output side), and to the head; then the minor directions are deleted. Here the stream is
linear, so this is a true projection onto the top directions. See :func:`slice_residual_stream`.

Saving
------
Every layer whose shape changes is replaced by a registered subclass of its own type
(:class:`ResizedLinear`, :class:`ResizedConv2d`, :class:`ResizedBatchNorm2d`) so that
:func:`laserrmt.surgery.io.save_compressed` records its shape and ``load`` / ``load_into``
rebuild it; the residual-stream route changes the model's config instead (``hidden_size``),
because every layer of the stream changes with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.linalg
import torch
from torch import nn

from laserrmt.errors import (
    InvalidOptionError,
    NumericalError,
    PlanError,
    TargetSelectionError,
)
from laserrmt.models.architectures import (
    SelfAttentionLayout,
    UnitLayout,
    block_index,
    channel_chains,
    encoder_self_attentions,
    mlp_layouts,
    residual_layout,
)
from laserrmt.surgery.registry import CompressedModule, dtype_from_name, dtype_name, register_module

SiteKind = Literal["channels", "mlp", "residual", "attn_vo", "attn_qk"]

__all__ = [
    "ReducedSelfAttention",
    "ResizedBatchNorm2d",
    "ResizedConv2d",
    "ResizedLinear",
    "SiteRank",
    "SiteStatistics",
    "WidthCut",
    "WidthSite",
    "activation_rank",
    "attention_head_ranks",
    "collect_site_statistics",
    "count_parameters",
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


# ---------------------------------------------------------------------------------------------
# Registered layers of a new width


@register_module
class ResizedLinear(nn.Linear, CompressedModule):
    """An ``nn.Linear`` whose width was changed by surgery (registered so it can be reloaded)."""

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": dtype_name(self.weight.dtype),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> ResizedLinear:
        return cls(
            int(cfg["in_features"]),
            int(cfg["out_features"]),
            bias=bool(cfg["bias"]),
            dtype=dtype_from_name(cfg["dtype"]),
        )


@register_module
class ResizedConv2d(nn.Conv2d, CompressedModule):
    """An ``nn.Conv2d`` with fewer input and/or output channels than the original."""

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
            "dtype": dtype_name(self.weight.dtype),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> ResizedConv2d:
        padding = cfg["padding"]
        return cls(
            int(cfg["in_channels"]),
            int(cfg["out_channels"]),
            tuple(cfg["kernel_size"]),
            stride=tuple(cfg["stride"]),
            padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(cfg["dilation"]),
            groups=int(cfg["groups"]),
            bias=bool(cfg["bias"]),
            padding_mode=cfg["padding_mode"],
            dtype=dtype_from_name(cfg["dtype"]),
        )


@register_module
class ResizedBatchNorm2d(nn.BatchNorm2d, CompressedModule):
    """An ``nn.BatchNorm2d`` over the channels a width cut kept."""

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "dtype": dtype_name(
                self.weight.dtype if self.weight is not None else self.running_mean.dtype
            ),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> ResizedBatchNorm2d:
        return cls(
            int(cfg["num_features"]),
            eps=float(cfg["eps"]),
            momentum=cfg["momentum"],
            affine=bool(cfg["affine"]),
            track_running_stats=bool(cfg["track_running_stats"]),
            dtype=dtype_from_name(cfg["dtype"]),
        )


# ---------------------------------------------------------------------------------------------
# Sites


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


def find_width_sites(model: nn.Module, kinds: Sequence[SiteKind] | None = None) -> list[WidthSite]:
    """Every width the model offers, shallow to deep.

    ``"mlp"``: the intermediate width of each transformer block's MLP (roles from
    :mod:`laserrmt.models.architectures`). ``"channels"``: the output channels of each
    ``Conv2d`` (groups = 1) whose next layer in registration order (after optional BatchNorm2d
    layers) is a ``Conv2d`` reading exactly those channels or a ``Linear`` reading them
    flattened. That rule holds for plain chains (``nn.Sequential`` CNNs such as LeNet/VGG),
    **not** for networks with skip connections (ResNet), where a convolution's output has
    several readers; name the sites yourself there. ``"residual"``: the residual stream of a
    Llama-style model (see :func:`slice_residual_stream`); only listed when asked for.
    ``"attn_vo"`` / ``"attn_qk"`` (both: ``"attention"``): the per-head value/output and
    query/key widths of BERT-style encoder self-attention (see :class:`ReducedSelfAttention`).

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
        layout = residual_layout(model)
        sites.append(WidthSite(name="residual_stream", kind="residual", width=layout.width))
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


# ---------------------------------------------------------------------------------------------
# Statistics of a site


@dataclass
class SiteStatistics:
    """The uncentred second moment ``C = Σ h hᵀ / n`` of a site's units, float64.

    For an ``attn_qk`` site ``second_moment`` is that of the queries and ``key_moment`` that of
    the keys (all heads, concatenated).
    """

    site: str
    second_moment: torch.Tensor = field(repr=False)
    n_samples: int
    key_moment: torch.Tensor | None = field(default=None, repr=False)

    @property
    def width(self) -> int:
        return int(self.second_moment.shape[0])


def _unit_rows(site: WidthSite, consumer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of unit values, one per sample: tokens, or spatial positions of an image."""
    d = site.width
    if isinstance(consumer, nn.Conv2d) or x.dim() == 4:
        return x.movedim(1, -1).reshape(-1, d)
    if site.kind == "channels" and isinstance(consumer, nn.Linear):
        # A flattened [b, C·H·W] input: the channel is the slowest index after the batch.
        flat = x.reshape(x.shape[0], d, -1)
        return flat.movedim(1, -1).reshape(-1, d)
    return x.reshape(-1, d)


def collect_site_statistics(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, Any]],
    sites: Sequence[WidthSite],
    *,
    progress: bool = True,
) -> dict[str, SiteStatistics]:
    """Stream the second moment of each site's units over calibration batches (float64).

    MLP sites use :func:`laserrmt.stats.calibration.collect_activation_statistics` on the input
    of the down projection (block by block on transformer models). Channel sites hook the input
    of the consumer with a private pre-hook, because the shared helper reports a convolution's
    input as unfolded patches and here the features must be the *channels* (spatial positions
    are samples, RMT-KD step 1). The residual site pools the stream over every block boundary.
    Batches are model inputs (tensors passed positionally, or keyword dicts).
    """
    listed = list(batches)
    if not listed:
        raise InvalidOptionError("no calibration batches; pass at least one batch")
    out: dict[str, SiteStatistics] = {}
    mlp = [s for s in sites if s.kind == "mlp"]
    if mlp:
        from laserrmt.stats.calibration import collect_activation_statistics

        stats = collect_activation_statistics(
            model, listed, [s.consumer for s in mlp], where="input", progress=progress
        )
        for site in mlp:
            st = stats[site.consumer]
            out[site.name] = SiteStatistics(site.name, st.second_moment(), st.n_samples)
    channel = [s for s in sites if s.kind == "channels"]
    if channel:
        out.update(_channel_statistics(model, listed, channel))
    attention = [s for s in sites if s.kind in ("attn_vo", "attn_qk")]
    if attention:
        out.update(_attention_statistics(model, listed, attention))
    for site in sites:
        if site.kind == "residual":
            out[site.name] = _residual_statistics(model, listed, site)
    for site in sites:
        if not bool(torch.isfinite(out[site.name].second_moment).all()):
            raise NumericalError(
                f"site {site.name}: its activation statistics contain NaN or Inf; run the model "
                "in float32 on finite inputs"
            )
    return out


def _run(model: nn.Module, batch: torch.Tensor | Mapping[str, Any]) -> None:
    from laserrmt.stats.calibration import _call_model  # the helper's batch convention

    _call_model(model, batch)


def _channel_statistics(
    model: nn.Module, batches: list[Any], sites: Sequence[WidthSite]
) -> dict[str, SiteStatistics]:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(site: WidthSite, module: nn.Module, args: tuple[Any, ...]) -> None:
        rows = _unit_rows(site, module, args[0].detach()).to(torch.float64)
        gram = rows.T @ rows
        sums[site.name] = sums[site.name] + gram if site.name in sums else gram
        counts[site.name] = counts.get(site.name, 0) + int(rows.shape[0])

    flags = [(m, m.training) for m in model.modules()]
    try:
        for site in sites:
            consumer = model.get_submodule(site.consumer)
            handles.append(consumer.register_forward_pre_hook(lambda m, a, s=site: hook(s, m, a)))
        model.eval()
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    missing = [s.name for s in sites if s.name not in sums]
    if missing:
        raise TargetSelectionError(
            f"sites {missing} were never reached in the forward pass; name sites whose "
            "consumer runs"
        )
    return {
        s.name: SiteStatistics(s.name, sums[s.name] / counts[s.name], counts[s.name]) for s in sites
    }


# ---------------------------------------------------------------------------------------------
# The decision: how many directions, which units


def activation_rank(
    second_moment: torch.Tensor | np.ndarray,
    n_samples: int,
    *,
    tau: float = 0.5,
    estimator: str = "mp_fit",
) -> Any:
    """The number of directions of ``C = X Xᵀ / n`` above the Marchenko–Pastur bulk.

    The singular values of the ``d × n`` activation matrix are ``sqrt(n · λ)``, so this is
    :func:`laserrmt.rmt.thresholds.choose_rank` with the MP rule on shape ``(d, n)``; ``tau``
    is the quantile the bulk fit starts from (RMT-KD's compression knob) and ``estimator`` the
    noise estimator (``"mp_fit"`` or ``"veraart"``). Returns its ``RankChoice``.
    """
    from laserrmt.rmt.thresholds import choose_rank

    c = (
        second_moment.detach().cpu().numpy()
        if isinstance(second_moment, torch.Tensor)
        else second_moment
    )
    c = np.asarray(c, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise InvalidOptionError(f"a second moment must be square; got shape {c.shape}")
    if not np.isfinite(c).all():
        raise NumericalError("the activation second moment contains NaN or Inf")
    eigenvalues = np.linalg.eigvalsh((c + c.T) / 2)[::-1]
    # Rounding makes the smallest eigenvalues of a PSD matrix slightly negative.
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    d, n = c.shape[0], int(n_samples)
    # With fewer samples than features only n eigenvalues can be non-zero: X has min(d, n)
    # singular values.
    return choose_rank(
        np.sqrt(n * eigenvalues[: min(d, n)]), (d, n), "mp", estimator=estimator, quantile=tau
    )


@dataclass
class SiteRank:
    """The RMT width decision for one site: ``rank`` of ``width`` directions are signal.

    For attention sites ``rank`` is ``heads × max(per-head counts)`` (every head keeps the same
    number of directions, so the heads stay one reshape) and ``per_head`` lists each head's
    count; ``sigma`` and ``edge`` are those of the head that set the maximum.
    """

    rank: int
    width: int
    sigma: float
    edge: float
    per_head: list[int] | None = None


def site_rank(
    model: nn.Module,
    site: WidthSite,
    statistics: SiteStatistics,
    *,
    tau: float = 0.5,
    estimator: str = "mp_fit",
) -> SiteRank:
    """How many directions of ``site`` lie above the Marchenko–Pastur edge (see
    :func:`activation_rank`; attention sites per head, :func:`attention_head_ranks`)."""
    if site.kind in ("attn_vo", "attn_qk"):
        heads = _layout_of(model, site).heads
        per_head = attention_head_ranks(site, statistics, heads, tau=tau, estimator=estimator)
        best = max(range(heads), key=lambda h: per_head[h][0])
        k_head, sigma, edge = per_head[best]
        return SiteRank(heads * k_head, statistics.width, sigma, edge, [p[0] for p in per_head])
    choice = activation_rank(
        statistics.second_moment, statistics.n_samples, tau=tau, estimator=estimator
    )
    return SiteRank(int(choice.rank), statistics.width, float(choice.sigma), float(choice.edge))


def select_units(second_moment: torch.Tensor, k: int) -> list[int]:
    """The ``k`` units that best span the top-``k`` eigen-directions of ``second_moment``.

    Column-pivoted QR of ``Λ_k^{1/2} U_kᵀ`` (k × d): the pivot order picks, step by step, the
    unit with the largest signal component not yet explained by the units already picked.
    Returned sorted (the order of the units in the layer is kept).
    """
    d = int(second_moment.shape[0])
    if not 1 <= k <= d:
        raise PlanError(f"cannot keep {k} of {d} units; keep between 1 and {d}")
    if k == d:
        return list(range(d))
    c = second_moment.detach().cpu().to(torch.float64).numpy()
    values, vectors = np.linalg.eigh((c + c.T) / 2)
    top = np.argsort(values)[::-1][:k]
    signal = np.sqrt(np.clip(values[top], 0.0, None))[:, None] * vectors[:, top].T
    _, _, pivots = scipy.linalg.qr(signal, mode="economic", pivoting=True)
    return sorted(int(i) for i in pivots[:k])


def reconstruction_matrix(second_moment: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """``R = C_{:,S} C_{S,S}⁺`` (d × k, float64): the least-squares estimate ``h ≈ R h_S``.

    The pseudo-inverse drops eigenvalues under ``1e-12`` of the largest, so units that are
    (numerically) dead or exact copies do not blow up the weights. With every unit kept ``R`` is
    the identity, exactly.
    """
    d = int(second_moment.shape[0])
    kept = list(kept)
    if len(kept) == d and kept == list(range(d)):
        return torch.eye(d, dtype=torch.float64)
    c = second_moment.detach().cpu().to(torch.float64)
    c = (c + c.T) / 2
    sub = c[kept][:, kept]
    values, vectors = torch.linalg.eigh(sub)
    floor = 1e-12 * float(values.abs().max()) if values.numel() else 0.0
    inverse_values = torch.where(values > floor, 1.0 / values.clamp_min(floor or 1e-300), 0.0)
    pinv = (vectors * inverse_values) @ vectors.T
    r = c[:, kept] @ pinv
    # The kept units reconstruct themselves: make that exact rather than nearly so.
    r[kept] = torch.eye(len(kept), dtype=torch.float64)
    return r


# ---------------------------------------------------------------------------------------------
# The cut


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


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


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    # The replacement behaves as the layer it replaces: same mode (BatchNorm!), same freezing.
    module.train(old.training)
    frozen = not any(p.requires_grad for p in old.parameters())
    if frozen:
        module.requires_grad_(False)
    setattr(parent, attr, module)


def _select_rows_linear(linear: nn.Linear, rows: torch.Tensor) -> ResizedLinear:
    new = ResizedLinear(
        linear.in_features,
        len(rows),
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[rows])
    return new


def _select_rows_conv(conv: nn.Conv2d, rows: torch.Tensor) -> ResizedConv2d:
    new = ResizedConv2d(
        conv.in_channels,
        len(rows),
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight[rows])
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias[rows])
    return new


def _select_batchnorm(bn: nn.BatchNorm2d, rows: torch.Tensor) -> ResizedBatchNorm2d:
    reference = bn.weight if bn.weight is not None else bn.running_mean
    new = ResizedBatchNorm2d(
        len(rows),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=None if reference is None else reference.device,
        dtype=None if reference is None else reference.dtype,
    )
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            source = getattr(bn, name)
            if source is not None:  # the scalar step count is copied whole
                getattr(new, name).copy_(source if source.dim() == 0 else source[rows])
    return new


def _fold_into_consumer(consumer: nn.Module, r: torch.Tensor, width: int) -> nn.Module:
    """The consumer reading ``k`` units: its input columns multiplied by ``R`` (d × k)."""
    k = r.shape[1]
    if isinstance(consumer, nn.Conv2d):
        w = consumer.weight.detach().to(torch.float64)
        folded = torch.einsum("oc...,ck->ok...", w, r.to(w.device))
        new: ResizedConv2d | ResizedLinear = ResizedConv2d(
            k,
            consumer.out_channels,
            consumer.kernel_size,  # type: ignore[arg-type]
            stride=consumer.stride,  # type: ignore[arg-type]
            padding=consumer.padding,  # type: ignore[arg-type]
            dilation=consumer.dilation,  # type: ignore[arg-type]
            groups=1,
            bias=consumer.bias is not None,
            padding_mode=consumer.padding_mode,
            device=consumer.weight.device,
            dtype=consumer.weight.dtype,
        )
    elif isinstance(consumer, nn.Linear):
        w = consumer.weight.detach().to(torch.float64)
        positions = consumer.in_features // width
        # Flattened channels (CNN → Linear) are [C, positions] in C order; tokens have 1 position.
        folded = torch.einsum(
            "ocs,ck->oks", w.reshape(w.shape[0], width, positions), r.to(w.device)
        )
        folded = folded.reshape(w.shape[0], k * positions)
        new = ResizedLinear(
            k * positions,
            consumer.out_features,
            bias=consumer.bias is not None,
            device=consumer.weight.device,
            dtype=consumer.weight.dtype,
        )
    else:
        raise TargetSelectionError(
            f"a {type(consumer).__name__} cannot absorb a width cut; the consumer of a site "
            "must be nn.Linear or nn.Conv2d"
        )
    with torch.no_grad():
        new.weight.copy_(folded.to(new.weight.dtype))
        bias = getattr(consumer, "bias", None)
        if bias is not None and new.bias is not None:
            new.bias.copy_(bias)
    return new


def cut_width(
    model: nn.Module,
    site: WidthSite,
    statistics: SiteStatistics,
    k: int,
    *,
    kept: Sequence[int] | None = None,
) -> WidthCut:
    """Cut ``site`` to ``k`` units (or ``k`` residual directions) in place; returns the record.

    Unit sites keep the units :func:`select_units` picks (or ``kept``) and fold the
    reconstruction :func:`reconstruction_matrix` of the dropped ones into the consumer; the
    residual site projects onto the top-``k`` eigen-directions (:func:`slice_residual_stream`).
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
    before = count_parameters(model)
    if site.kind in ("attn_vo", "attn_qk"):
        k_head, width = _cut_attention(model, site, statistics, k)
        return WidthCut(
            site.name,
            site.kind,
            site.width,
            width,
            list(range(k_head)),
            before,
            count_parameters(model),
        )
    if site.kind == "residual":
        k = residual_width(model, k)
        slice_residual_stream(model, statistics.second_moment, k)
        return WidthCut(
            site.name, site.kind, site.width, k, list(range(k)), before, count_parameters(model)
        )

    units = list(kept) if kept is not None else select_units(statistics.second_moment, k)
    if len(units) != k or len(set(units)) != k or not all(0 <= u < site.width for u in units):
        raise PlanError(
            f"site {site.name}: kept units must be {k} distinct indices below {site.width}"
        )
    units = sorted(units)
    r = reconstruction_matrix(statistics.second_moment, units)
    consumer = model.get_submodule(site.consumer)
    _set_submodule(model, site.consumer, _fold_into_consumer(consumer, r, site.width))
    for name in site.producers:
        module = model.get_submodule(name)
        rows = torch.tensor(units, dtype=torch.long, device=next(module.parameters()).device)
        if isinstance(module, nn.Conv2d):
            _set_submodule(model, name, _select_rows_conv(module, rows))
        elif isinstance(module, nn.Linear):
            _set_submodule(model, name, _select_rows_linear(module, rows))
        else:
            raise TargetSelectionError(
                f"{name} is a {type(module).__name__}; a site's producers must be nn.Linear or "
                "nn.Conv2d"
            )
    for name in site.followers:
        module = model.get_submodule(name)
        if not isinstance(module, nn.BatchNorm2d):
            raise TargetSelectionError(f"{name} is a {type(module).__name__}, not a BatchNorm2d")
        rows = torch.tensor(units, dtype=torch.long, device=module.running_mean.device)  # type: ignore[union-attr]
        _set_submodule(model, name, _select_batchnorm(module, rows))
    return WidthCut(site.name, site.kind, site.width, k, units, before, count_parameters(model))


def residual_width(model: nn.Module, k: int) -> int:
    """``k`` rounded up to a width the model's config accepts (a multiple of the head count).

    transformers validates ``hidden_size % num_attention_heads == 0`` when a config is saved,
    even though ``head_dim`` is pinned; rounding up keeps a few more directions, never fewer.
    """
    config = getattr(model, "config", None)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    d = residual_layout(model).width
    return min(d, -(-k // heads) * heads)


def residual_site(model: nn.Module) -> WidthSite:
    """The residual stream of a Llama-style model as one site."""
    return WidthSite(name="residual_stream", kind="residual", width=residual_layout(model).width)


# ---------------------------------------------------------------------------------------------
# The residual stream (SliceGPT)


def _residual_statistics(model: nn.Module, batches: list[Any], site: WidthSite) -> SiteStatistics:
    """The second moment of the residual stream pooled over the embedding and every block output."""
    layout = residual_layout(model)
    total = torch.zeros(site.width, site.width, dtype=torch.float64)
    count = 0

    def accumulate(x: torch.Tensor) -> None:
        nonlocal total, count
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64).cpu()
        total += rows.T @ rows
        count += rows.shape[0]

    handles = [layout.embedding.register_forward_hook(lambda m, a, out: accumulate(out))]
    for block in layout.blocks:
        handles.append(
            block.register_forward_hook(
                lambda m, a, out: accumulate(out[0] if isinstance(out, tuple) else out)
            )
        )
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    return SiteStatistics(site.name, total / max(count, 1), count)


def _norm_scale(norm: nn.Module) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TargetSelectionError(f"{type(norm).__name__} has no scale to fold; not an RMSNorm")
    return weight


def rotate_residual_stream(model: nn.Module, q: torch.Tensor) -> None:
    """Fold every RMSNorm scale into its readers, then rotate the residual stream by ``Q``.

    ``Q`` is a ``d × d`` orthogonal matrix (float64); afterwards the stream carries ``Qᵀ x``
    where the original carried ``x``, every norm scale is 1, and the head is untied from the
    embedding when they were tied (folding the final norm's scale into the head makes them
    differ). The function the model computes is unchanged (SliceGPT, Theorem 1).
    """
    layout = residual_layout(model)
    d = layout.width
    q = q.to(torch.float64)
    if q.shape != (d, d) or not torch.allclose(
        q.T @ q, torch.eye(d, dtype=torch.float64), atol=1e-8
    ):
        raise InvalidOptionError(f"Q must be an orthogonal {d} × {d} matrix")

    def fold_norm(norm: nn.Module, readers: Sequence[nn.Linear]) -> None:
        scale = _norm_scale(norm).detach().to(torch.float64)
        for linear in readers:
            w = linear.weight.detach().to(torch.float64)
            # reader(diag(s) n(x)) = (W diag(s)) n(x); in the rotated stream n(Qᵀx) = Qᵀ n(x).
            linear.weight.data = ((w * scale) @ q).to(linear.weight.dtype)
        with torch.no_grad():
            _norm_scale(norm).fill_(1.0)

    for norm, readers in layout.norms:
        fold_norm(norm, readers)
    for linear in layout.writers:
        w = linear.weight.detach().to(torch.float64)
        linear.weight.data = (q.T @ w).to(linear.weight.dtype)
        if linear.bias is not None:
            linear.bias.data = (q.T @ linear.bias.detach().to(torch.float64)).to(linear.bias.dtype)
    embedding = layout.embedding.weight.detach().to(torch.float64)
    head = layout.head
    if head is None:
        raise TargetSelectionError(f"{type(model).__name__} has no output head to rotate")
    tied = head.weight is layout.embedding.weight
    head_weight = head.weight.detach().to(torch.float64)
    layout.embedding.weight = nn.Parameter((embedding @ q).to(layout.embedding.weight.dtype))
    final_scale = _norm_scale(layout.final_norm).detach().to(torch.float64)
    head.weight = nn.Parameter(((head_weight * final_scale) @ q).to(head.weight.dtype))
    with torch.no_grad():
        _norm_scale(layout.final_norm).fill_(1.0)
    if tied and getattr(layout.config, "tie_word_embeddings", False):
        layout.config.tie_word_embeddings = False
        if hasattr(layout.config, "get_text_config"):
            layout.config.get_text_config().tie_word_embeddings = False


def slice_residual_stream(model: nn.Module, second_moment: torch.Tensor, k: int) -> None:
    """SliceGPT with one rotation: rotate onto the eigenvectors of ``second_moment``, keep ``k``.

    After :func:`rotate_residual_stream` with ``Q`` = eigenvectors (descending), the stream's
    coordinates are its principal components; deleting the last ``d − k`` keeps the
    ``k``-dimensional subspace that carries most of the stream's energy. Every layer that reads
    the stream loses ``d − k`` input columns, every writer ``d − k`` output rows, the embedding
    and head ``d − k`` columns, the norms ``d − k`` entries. The model's config gets
    ``hidden_size = k`` (``head_dim`` pinned), so the saved folder reloads with
    :func:`laserrmt.surgery.io.load`.

    RMSNorm divides by ``sqrt(mean(x²) + ε)`` over the width; over ``k`` of ``d`` coordinates the
    mean is ``d/k`` times too large for the same ``‖x‖``, so the norms get the constant scale
    ``sqrt(d/k)`` and ``ε`` becomes ``ε·d/k``: then a stream that lies in the kept subspace is
    normalised exactly as before.
    """
    layout = residual_layout(model)
    d = layout.width
    if not 1 <= k <= d:
        raise PlanError(f"cannot keep {k} of {d} residual directions; keep 1..{d}")
    c = second_moment.detach().cpu().to(torch.float64)
    _, vectors = torch.linalg.eigh((c + c.T) / 2)
    q = vectors.flip(-1)  # descending
    rotate_residual_stream(model, q)
    if k == d:
        return
    keep = slice(0, k)

    def shrink_in(linear: nn.Linear) -> None:
        linear.weight = nn.Parameter(linear.weight.detach()[:, keep].clone())
        linear.in_features = k

    def shrink_out(linear: nn.Linear) -> None:
        linear.weight = nn.Parameter(linear.weight.detach()[keep].clone())
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[keep].clone())
        linear.out_features = k

    for _norm, readers in layout.norms:
        for linear in readers:
            shrink_in(linear)
    for linear in layout.writers:
        shrink_out(linear)
    layout.embedding.weight = nn.Parameter(layout.embedding.weight.detach()[:, keep].clone())
    layout.embedding.embedding_dim = k
    assert layout.head is not None
    shrink_in(layout.head)
    scale = math.sqrt(d / k)
    all_norms = [n for n, _ in layout.norms] + [layout.final_norm]
    for norm in all_norms:
        weight = _norm_scale(norm)
        norm.weight = nn.Parameter(
            torch.full((k,), scale, dtype=weight.dtype, device=weight.device)
        )
        eps_name = "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps"
        setattr(norm, eps_name, getattr(norm, eps_name) * d / k)
    config = layout.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.head_dim = int(head_dim)
    config.hidden_size = k
    config.rms_norm_eps = float(config.rms_norm_eps) * d / k


# ---------------------------------------------------------------------------------------------
# Attention widths: per-head value/output and query/key


@register_module
class ReducedSelfAttention(CompressedModule):
    """Multi-head self-attention whose query/key and value heads are narrower than the original.

    A drop-in for BERT's ``BertSelfAttention`` (same ``forward`` arguments and ``(output,
    weights)`` return) with its own head sizes: ``qk_head_size`` for queries and keys,
    ``v_head_size`` for values. transformers' BERT derives one head size from
    ``hidden_size / num_attention_heads`` and uses it to reshape all three projections, so it
    cannot express a cut head; this module can. The softmax scale stays the *original*
    ``1/sqrt(head_dim)``, because the cut keeps the original query-key products (approximately)
    and those were scaled by it. The output is ``num_heads · v_head_size`` wide; the attention
    output projection that reads it is cut to match.

    Only bidirectional encoder attention is supported (no key/value cache, no cross-attention).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        qk_head_size: int,
        v_head_size: int,
        scaling: float,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.num_attention_heads = int(num_heads)
        self.qk_head_size = int(qk_head_size)
        self.v_head_size = int(v_head_size)
        self.scaling = float(scaling)
        self.dropout_p = float(dropout)
        kwargs: dict[str, Any] = {"bias": bias, "device": device, "dtype": dtype}
        self.query = nn.Linear(hidden_size, num_heads * qk_head_size, **kwargs)
        self.key = nn.Linear(hidden_size, num_heads * qk_head_size, **kwargs)
        self.value = nn.Linear(hidden_size, num_heads * v_head_size, **kwargs)

    def laserrmt_config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_heads": self.num_attention_heads,
            "qk_head_size": self.qk_head_size,
            "v_head_size": self.v_head_size,
            "scaling": self.scaling,
            "dropout": self.dropout_p,
            "bias": self.query.bias is not None,
            "dtype": dtype_name(self.query.weight.dtype),
        }

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> ReducedSelfAttention:
        return cls(
            int(cfg["hidden_size"]),
            int(cfg["num_heads"]),
            int(cfg["qk_head_size"]),
            int(cfg["v_head_size"]),
            float(cfg["scaling"]),
            dropout=float(cfg["dropout"]),
            bias=bool(cfg["bias"]),
            dtype=dtype_from_name(cfg["dtype"]),
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        # transformers < 5.23 passes the key/value cache as `past_key_values`, later as `cache`.
        if past_key_values is not None or cache is not None:
            raise TargetSelectionError(
                "ReducedSelfAttention is encoder attention and keeps no key/value cache; run "
                "the model without past_key_values"
            )
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TargetSelectionError(
                f"ReducedSelfAttention takes tensor masks (eager or sdpa attention), not "
                f"{type(attention_mask).__name__}; load the model with attn_implementation='sdpa'"
            )
        shape = hidden_states.shape[:-1]
        heads = self.num_attention_heads

        def split(x: torch.Tensor, size: int) -> torch.Tensor:
            return x.view(*shape, heads, size).transpose(-3, -2)

        q = split(self.query(hidden_states), self.qk_head_size)
        k = split(self.key(hidden_states), self.qk_head_size)
        v = split(self.value(hidden_states), self.v_head_size)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(q.dtype)
        # Boolean masks (sdpa: True = attend) and additive float masks (eager) both fit here.
        out = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.scaling,
        )
        return out.transpose(-3, -2).reshape(*shape, heads * self.v_head_size), None


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


def _layout_of(model: nn.Module, site: WidthSite) -> SelfAttentionLayout:
    for layout in encoder_self_attentions(model):
        if layout.self_name == site.producers[0]:
            return layout
    raise TargetSelectionError(
        f"site {site.name}: {site.producers[0]} is not a BERT-style self-attention any more"
    )


def _attention_statistics(
    model: nn.Module, batches: list[Any], sites: Sequence[WidthSite]
) -> dict[str, SiteStatistics]:
    """Second moments of the value (``attn_vo``) or query and key (``attn_qk``) projections."""
    sums: dict[tuple[str, str], torch.Tensor] = {}
    counts: dict[tuple[str, str], int] = {}

    def hook(key: tuple[str, str], output: torch.Tensor) -> None:
        rows = output.detach().reshape(-1, output.shape[-1]).to(torch.float64).cpu()
        gram = rows.T @ rows
        sums[key] = sums[key] + gram if key in sums else gram
        counts[key] = counts.get(key, 0) + int(rows.shape[0])

    wanted: dict[tuple[str, str], nn.Module] = {}
    for site in sites:
        attention = model.get_submodule(site.producers[0])
        for part in ("value",) if site.kind == "attn_vo" else ("query", "key"):
            wanted[(site.producers[0], part)] = getattr(attention, part)
    handles = [
        module.register_forward_hook(lambda m, a, out, key=key: hook(key, out))
        for key, module in wanted.items()
    ]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    missing = [key for key in wanted if key not in sums]
    if missing:
        raise TargetSelectionError(f"attention projections {missing} never ran in the forward pass")
    out = {}
    for site in sites:
        owner = site.producers[0]
        if site.kind == "attn_vo":
            key = (owner, "value")
            out[site.name] = SiteStatistics(site.name, sums[key] / counts[key], counts[key])
        else:
            q, k = (owner, "query"), (owner, "key")
            out[site.name] = SiteStatistics(
                site.name, sums[q] / counts[q], counts[q], key_moment=sums[k] / counts[k]
            )
    return out


def _head_blocks(c: torch.Tensor, heads: int) -> list[torch.Tensor]:
    size = c.shape[0] // heads
    c = c.detach().cpu().to(torch.float64)
    c = (c + c.T) / 2
    return [c[h * size : (h + 1) * size, h * size : (h + 1) * size] for h in range(heads)]


def _top_eigenvectors(c: torch.Tensor, k: int) -> torch.Tensor:
    _, vectors = torch.linalg.eigh(c)
    return vectors.flip(-1)[:, :k]


def _root(c: torch.Tensor) -> torch.Tensor:
    """``R`` with ``R Rᵀ = C`` (eigenvectors scaled by the square roots of the eigenvalues)."""
    values, vectors = torch.linalg.eigh(c)
    return vectors * values.clamp_min(0.0).sqrt()


def query_key_maps(
    c_query: torch.Tensor, c_key: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A``, ``B`` (``d × k``) with ``qᵀ A Bᵀ k ≈ qᵀ k`` for one head (float64).

    Attention reads queries and keys only through the products ``qᵀk``. Writing the second
    moments as ``C_q = R_q R_qᵀ`` and ``C_k = R_k R_kᵀ``, the mean squared error of the
    products over query/key pairs *drawn independently* is ``‖R_qᵀ (I − A Bᵀ) R_k‖²_F``; with
    the SVD ``R_qᵀ R_k = U Σ Vᵀ`` its minimum over rank ``k`` (Eckart–Young) is reached by

        ``A = R_k V_k Σ_k^{-1/2}``,  ``B = R_q U_k Σ_k^{-1/2}``

    (then ``R_qᵀ A Bᵀ R_k = U_k Σ_k V_kᵀ``; only the kept singular values are inverted, so no
    small eigenvalue of ``C_q`` or ``C_k`` is amplified). With ``k = d`` and full-rank moments
    ``A Bᵀ = I``: the products are unchanged. The cut is ``Q' = Aᵀ Q``, ``K' = Bᵀ K``.

    The products are preserved only approximately: the error criterion treats queries and keys
    as independent (in a sequence they are not), and it weighs every product alike while the
    softmax is dominated by the largest scores. When queries or keys lie exactly in a
    ``k``-dimensional subspace the error is zero.
    """
    r_q, r_k = _root(c_query), _root(c_key)
    u, s, vh = torch.linalg.svd(r_q.T @ r_k)
    floor = 1e-12 * float(s[0]) if s.numel() and float(s[0]) > 0 else 1e-300
    inv_root = torch.where(s[:k] > floor, s[:k].clamp_min(floor).rsqrt(), 0.0)
    a = r_k @ vh[:k].T * inv_root
    b = r_q @ u[:, :k] * inv_root
    return a, b


def attention_head_ranks(
    site: WidthSite, statistics: SiteStatistics, heads: int, *, tau: float, estimator: str
) -> list[tuple[int, float, float]]:
    """Per head ``(k, sigma, edge)``: directions above the MP edge (``attn_qk``: the smaller of
    the query and key counts, since ``rank(Q Kᵀ) ≤ min(rank Q, rank K)``)."""
    n = statistics.n_samples
    out = []
    if site.kind == "attn_vo":
        for c in _head_blocks(statistics.second_moment, heads):
            choice = activation_rank(c, n, tau=tau, estimator=estimator)
            out.append((int(choice.rank), float(choice.sigma), float(choice.edge)))
        return out
    if statistics.key_moment is None:
        raise PlanError(f"site {site.name}: query-key statistics need the key second moment")
    for cq, ck in zip(
        _head_blocks(statistics.second_moment, heads),
        _head_blocks(statistics.key_moment, heads),
        strict=True,
    ):
        q = activation_rank(cq, n, tau=tau, estimator=estimator)
        k = activation_rank(ck, n, tau=tau, estimator=estimator)
        smaller = q if int(q.rank) <= int(k.rank) else k
        out.append((int(smaller.rank), float(smaller.sigma), float(smaller.edge)))
    return out


def _reduced_from(module: nn.Module, layout: SelfAttentionLayout) -> ReducedSelfAttention:
    if isinstance(module, ReducedSelfAttention):
        return module
    query = module.query
    assert isinstance(query, nn.Linear)  # encoder_self_attentions listed only such modules
    new = ReducedSelfAttention(
        query.in_features,
        layout.heads,
        layout.qk_head_size,
        layout.v_head_size,
        layout.scaling,
        dropout=layout.dropout,
        bias=query.bias is not None,
        device=query.weight.device,
        dtype=query.weight.dtype,
    )
    with torch.no_grad():
        for part in ("query", "key", "value"):
            getattr(new, part).load_state_dict(getattr(module, part).state_dict())
    return new


def _per_head_rows(linear: nn.Linear, maps: Sequence[torch.Tensor]) -> nn.Linear:
    """A linear whose head ``h`` outputs ``maps[h]ᵀ`` times the original head ``h``."""
    heads = len(maps)
    size = linear.out_features // heads
    k = maps[0].shape[1]
    w = linear.weight.detach().to(torch.float64).reshape(heads, size, -1)
    new_w = torch.stack([m.to(w.device).T @ w[h] for h, m in enumerate(maps)]).reshape(
        heads * k, -1
    )
    new = nn.Linear(
        linear.in_features,
        heads * k,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(new_w.to(linear.weight.dtype))
        if linear.bias is not None:
            b = linear.bias.detach().to(torch.float64).reshape(heads, size)
            new_b = torch.stack([m.to(b.device).T @ b[h] for h, m in enumerate(maps)])
            new.bias.copy_(new_b.reshape(-1).to(linear.bias.dtype))
    new.train(linear.training)
    return new


def _cut_attention(
    model: nn.Module, site: WidthSite, statistics: SiteStatistics, k: int
) -> tuple[int, int]:
    """Cut an attention site to ``k`` total width (``k / heads`` per head, rounded up)."""
    layout = _layout_of(model, site)
    heads = layout.heads
    k_head = min(-(-k // heads), site.width // heads)
    attention = _reduced_from(model.get_submodule(layout.self_name), layout)
    if site.kind == "attn_vo":
        # A head's output is a convex combination of its values (the softmax weights sum to
        # 1), so it lies in the span of the values: projecting them on U_k and reading the
        # projection back with O_h U_k is exact when the values span only k directions.
        maps = [_top_eigenvectors(c, k_head) for c in _head_blocks(statistics.second_moment, heads)]
        attention.value = _per_head_rows(attention.value, maps)
        attention.v_head_size = k_head
        output = model.get_submodule(layout.output_name)
        assert isinstance(output, nn.Linear)  # encoder_self_attentions checked it
        w = output.weight.detach().to(torch.float64)
        size = w.shape[1] // heads
        folded = torch.cat(
            [w[:, h * size : (h + 1) * size] @ maps[h].to(w.device) for h in range(heads)], dim=1
        )
        new_output = ResizedLinear(
            heads * k_head,
            output.out_features,
            bias=output.bias is not None,
            device=w.device,
            dtype=output.weight.dtype,
        )
        with torch.no_grad():
            new_output.weight.copy_(folded.to(new_output.weight.dtype))
            if output.bias is not None:
                new_output.bias.copy_(output.bias)
        _set_submodule(model, layout.output_name, new_output)
    else:
        if statistics.key_moment is None:
            raise PlanError(f"site {site.name}: query-key statistics need the key second moment")
        pairs = [
            query_key_maps(cq, ck, k_head)
            for cq, ck in zip(
                _head_blocks(statistics.second_moment, heads),
                _head_blocks(statistics.key_moment, heads),
                strict=True,
            )
        ]
        attention.query = _per_head_rows(attention.query, [a for a, _ in pairs])
        attention.key = _per_head_rows(attention.key, [b for _, b in pairs])
        attention.qk_head_size = k_head
    _set_submodule(model, layout.self_name, attention)
    return k_head, heads * k_head
