"""Activation statistics of width sites, and how many of their directions are signal.

For every :class:`~laserrmt.models.widths.WidthSite` the hidden units ``h`` (d of them) are
streamed over calibration batches in float64, in one pass for all sites
(:func:`laserrmt.stats.forward.run_forward`): the sum ``Σ h``, the Gram ``Σ h hᵀ`` and, along
the axes the rows run on (the tokens of a sequence, the rows and columns of an image), the
lag-k products ``Σ h_t h_{t+k}`` per unit for ``k ≤ MAX_LAG``. From those come the uncentred
second moment (what the cuts reconstruct with), the covariance and the effective sample size
(what the rank rule needs: :mod:`laserrmt.rmt.activations` explains why both).

Rows are tokens for transformer sites and spatial positions for channel sites (RMT-KD step 1):
the channels of a convolution's input are the features, not its unfolded patches. Padded
tokens are rows like any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from laserrmt.errors import InvalidOptionError, NumericalError, PlanError, TargetSelectionError
from laserrmt.models.architectures import residual_layout
from laserrmt.models.widths import WidthSite, attention_layout
from laserrmt.rmt.activations import (
    activation_rank,
    effective_sample_size,
    truncated_autocorrelation,
)
from laserrmt.stats.forward import Hook, run_forward

__all__ = [
    "MAX_LAG",
    "SiteRank",
    "SiteStatistics",
    "SiteWatch",
    "attention_head_ranks",
    "collect_site_statistics",
    "site_rank",
]

MAX_LAG = 32
"""The longest lag whose autocorrelation enters the effective sample size. AR(1) noise with
ρ = 0.9 decays below the truncation level by lag ~30; longer memory is rare in activations."""


@dataclass
class SiteStatistics:
    """The activation statistics of one site's units, float64 on the CPU.

    ``second_moment`` is the uncentred ``C = Σ h hᵀ / n`` and ``mean`` the mean ``μ`` (``None``:
    taken as zero); ``n_effective`` is the number of independent rows the ``n_samples``
    correlated rows are worth (``None``: ``n_samples``). For an ``attn_qk`` site the fields are
    those of the queries and ``key_moment`` / ``key_mean`` those of the keys (all heads
    concatenated).
    """

    site: str
    second_moment: torch.Tensor = field(repr=False)
    n_samples: int
    key_moment: torch.Tensor | None = field(default=None, repr=False)
    mean: torch.Tensor | None = field(default=None, repr=False)
    key_mean: torch.Tensor | None = field(default=None, repr=False)
    n_effective: float | None = None

    @property
    def width(self) -> int:
        return int(self.second_moment.shape[0])

    @property
    def independent_rows(self) -> float:
        return float(self.n_samples if self.n_effective is None else self.n_effective)

    def covariance(self) -> torch.Tensor:
        """``C − μμᵀ``: the centred second moment the rank rule reads."""
        return _centred(self.second_moment, self.mean)

    def key_covariance(self) -> torch.Tensor:
        if self.key_moment is None:
            raise PlanError(f"site {self.site}: query-key statistics need the key second moment")
        return _centred(self.key_moment, self.key_mean)


def _centred(moment: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    c = moment.to(torch.float64)
    return c if mean is None else c - torch.outer(mean, mean).to(c)


class _Moments:
    """Streamed ``Σ h``, ``Σ h hᵀ``, the row count and per-axis lag products of a unit stream."""

    def __init__(self, width: int) -> None:
        self.width = width
        # Allocated by the first batch, on its device (a GPU model sums on the GPU).
        self.gram: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.count = 0
        # axis position → [lag, (Σ h_t h_{t+k}, Σ h_t, Σ h_{t+k}), unit], and pair counts per lag
        self.lags: dict[int, torch.Tensor] = {}
        self.pairs: dict[int, torch.Tensor] = {}

    def add(self, x: torch.Tensor) -> None:
        """``x``: units on the last axis, batch first, the axes between are sequence axes."""
        x = x.detach().to(torch.float64)
        if self.gram is None or self.total is None:
            self.gram = torch.zeros(self.width, self.width, dtype=torch.float64, device=x.device)
            self.total = torch.zeros(self.width, dtype=torch.float64, device=x.device)
        rows = x.reshape(-1, x.shape[-1])
        self.gram.addmm_(rows.T, rows)
        self.total += rows.sum(dim=0)
        self.count += int(rows.shape[0])
        for axis in range(1, x.dim() - 1):
            length = x.shape[axis]
            lags = self.lags.setdefault(
                axis, torch.zeros(MAX_LAG, 3, x.shape[-1], dtype=torch.float64, device=x.device)
            )
            pairs = self.pairs.setdefault(
                axis, torch.zeros(MAX_LAG, dtype=torch.float64, device=x.device)
            )
            for k in range(1, min(MAX_LAG, length - 1) + 1):
                head = x.narrow(axis, 0, length - k).reshape(-1, x.shape[-1])
                tail = x.narrow(axis, k, length - k).reshape(-1, x.shape[-1])
                lags[k - 1, 0] += (head * tail).sum(dim=0)
                lags[k - 1, 1] += head.sum(dim=0)
                lags[k - 1, 2] += tail.sum(dim=0)
                pairs[k - 1] += head.shape[0]

    def n_effective(self, mean: torch.Tensor, variance: torch.Tensor) -> float:
        # Dead units (zero variance) have no autocorrelation to speak of.
        live = variance > 1e-12 * float(variance.max()) if variance.numel() else variance > 0
        axes = []
        for axis, lags in self.lags.items():
            used = self.pairs[axis] > 0
            if not bool(live.any()) or not bool(used.any()):
                continue
            pairs = self.pairs[axis][used]
            product, first, second = lags[used, 0], lags[used, 1], lags[used, 2]
            # Σ (h_t − μ)(h_{t+k} − μ) / pairs, per unit, with the mean of all rows.
            lagged = (product - mean * (first + second)) / pairs[:, None] + mean * mean
            rho = (lagged[:, live] / variance[live]).mean(dim=1)
            axes.append(truncated_autocorrelation(rho.cpu().numpy(), pairs.cpu().numpy()))
        return effective_sample_size(self.count, int(mean.numel()), axes)

    def statistics(self, site: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        # The one host copy of a site: its d × d moment is read by the numpy RMT rule and by
        # scipy's pivoted QR (units.select_units), which have no GPU counterpart.
        assert self.gram is not None and self.total is not None  # collect checks count > 0
        self.gram, self.total = self.gram.cpu(), self.total.cpu()
        self.lags = {axis: lags.cpu() for axis, lags in self.lags.items()}
        self.pairs = {axis: pairs.cpu() for axis, pairs in self.pairs.items()}
        n = max(self.count, 1)
        moment = (self.gram + self.gram.T) / (2 * n)
        mean = self.total / n
        variance = (moment.diagonal() - mean * mean).clamp_min(0.0)
        if not bool(torch.isfinite(moment).all()):
            raise NumericalError(
                f"site {site}: its activation statistics contain NaN or Inf; run the model "
                "in float32 on finite inputs"
            )
        return moment, mean, self.n_effective(mean, variance)


def _units_last(site: WidthSite, consumer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The site's units on the last axis, batch first, sequence or image axes between."""
    d = site.width
    if isinstance(consumer, nn.Conv2d) or x.dim() == 4:
        return x.movedim(1, -1)
    if site.kind == "channels" and isinstance(consumer, nn.Linear):
        # A flattened [b, C·H·W] input: the channel is the slowest index after the batch, so the
        # positions run in raster order along one axis.
        return x.reshape(x.shape[0], d, -1).movedim(1, -1)
    return x.reshape(*x.shape[:-1], d)


def _site_hooks(model: nn.Module, site: WidthSite, moments: dict[str, _Moments]) -> list[Hook]:
    def into(key: str, width: int) -> _Moments:
        return moments.setdefault(key, _Moments(width))

    if site.kind in ("mlp", "channels"):
        consumer = model.get_submodule(site.consumer)
        acc = into(site.name, site.width)
        return [
            (
                consumer,
                "input",
                lambda m, args, kwargs: acc.add(_units_last(site, m, args[0].detach())),
            )
        ]
    if site.kind in ("attn_vo", "attn_qk"):
        attention = model.get_submodule(site.producers[0])
        parts = ("value",) if site.kind == "attn_vo" else ("query", "key")
        hooks: list[Hook] = []
        for part in parts:
            acc = into(f"{site.name}:{part}", site.width)
            hooks.append(
                (getattr(attention, part), "output", lambda m, a, out, acc=acc: acc.add(out))
            )
        return hooks
    layout = residual_layout(model)
    acc = into(site.name, site.width)

    def block_output(m: nn.Module, a: Any, out: Any) -> None:
        acc.add(out[0] if isinstance(out, tuple) else out)

    hooks = [(layout.embedding, "output", lambda m, a, out: acc.add(out))]
    return hooks + [(block, "output", block_output) for block in layout.blocks]


class SiteWatch:
    """The hooks that stream the statistics of ``sites`` over every forward call made while they
    are attached (:func:`~laserrmt.stats.forward.run_forward`, or
    :func:`~laserrmt.stats.forward.attached` around calls of one streamed block), and the
    statistics they gathered (:meth:`statistics`)."""

    def __init__(self, model: nn.Module, sites: Sequence[WidthSite]) -> None:
        self.sites = list(sites)
        self._moments: dict[str, _Moments] = {}
        self.hooks = [
            hook for site in self.sites for hook in _site_hooks(model, site, self._moments)
        ]

    def statistics(self) -> dict[str, SiteStatistics]:
        """Each site's statistics over the calls seen so far.

        Raises:
            TargetSelectionError: a site whose modules never ran.
            NumericalError: NaN or Inf in a site's statistics.
        """
        moments = self._moments
        missing = [key for key, acc in moments.items() if acc.count == 0]
        if missing:
            raise TargetSelectionError(
                f"sites {missing} were never reached in the forward pass; name sites whose "
                "consumer runs"
            )
        out: dict[str, SiteStatistics] = {}
        for site in self.sites:
            if site.kind == "attn_qk":
                q_moment, q_mean, q_eff = moments[f"{site.name}:query"].statistics(site.name)
                k_moment, k_mean, k_eff = moments[f"{site.name}:key"].statistics(site.name)
                out[site.name] = SiteStatistics(
                    site.name,
                    q_moment,
                    moments[f"{site.name}:query"].count,
                    key_moment=k_moment,
                    mean=q_mean,
                    key_mean=k_mean,
                    n_effective=min(q_eff, k_eff),
                )
                continue
            acc = moments[f"{site.name}:value" if site.kind == "attn_vo" else site.name]
            moment, mean, n_eff = acc.statistics(site.name)
            out[site.name] = SiteStatistics(
                site.name, moment, acc.count, mean=mean, n_effective=n_eff
            )
        return out


def collect_site_statistics(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, Any]],
    sites: Sequence[WidthSite],
    *,
    progress: bool = True,
) -> dict[str, SiteStatistics]:
    """Stream the statistics of each site's units over calibration batches, one pass for all.

    MLP and channel sites hook the input of the consumer; attention sites the outputs of the
    value (``attn_vo``) or query and key (``attn_qk``) projections; the residual site pools the
    stream over the embedding and every block output. Batches are model inputs (tensors passed
    positionally, or keyword dicts).

    Raises:
        InvalidOptionError: no batches.
        TargetSelectionError: a site whose modules never ran.
        NumericalError: NaN or Inf in a site's statistics.
    """
    listed = list(batches)
    if not listed:
        raise InvalidOptionError("no calibration batches; pass at least one batch")
    watch = SiteWatch(model, sites)
    run_forward(model, listed, watch.hooks, desc="width statistics", progress=progress)
    return watch.statistics()


# ---------------------------------------------------------------------------------------------
# How many directions are signal


@dataclass
class SiteRank:
    """The RMT width decision for one site: ``rank`` of ``width`` directions are signal.

    For attention sites ``rank`` is ``heads × max(per-head counts)`` (every head keeps the same
    number of directions, so the heads stay one reshape) and ``per_head`` lists each head's
    count; ``sigma`` and ``edge`` are those of the head that set the maximum. ``status`` is the
    rank rule's (:data:`laserrmt.rmt.thresholds.RANK_STATUSES`; for attention the first head
    that could not be judged): anything but ``"ok"`` keeps the whole width.
    """

    rank: int
    width: int
    sigma: float
    edge: float
    per_head: list[int] | None = None
    status: str = "ok"


def _head_blocks(c: torch.Tensor, heads: int) -> list[np.ndarray]:
    size = c.shape[0] // heads
    a = c.detach().cpu().to(torch.float64).numpy()
    return [a[h * size : (h + 1) * size, h * size : (h + 1) * size] for h in range(heads)]


def attention_head_ranks(
    site: WidthSite, statistics: SiteStatistics, heads: int, *, tau: float, estimator: str
) -> list[tuple[int, float, float, str]]:
    """Per head ``(k, sigma, edge, status)``: directions of the head's covariance above the MP edge
    (``attn_qk``: the smaller of the query and key counts, since ``rank(Q Kᵀ) ≤ min(rank Q,
    rank K)``). Every head uses the site's effective sample size, matched to the edge at the
    width of all heads; at small width/samples ratios both are Bartlett's ``n / Σρ(k)²``."""
    n = statistics.independent_rows
    out = []
    if site.kind == "attn_vo":
        for c in _head_blocks(statistics.covariance(), heads):
            choice = activation_rank(c, n, tau=tau, estimator=estimator)
            out.append((int(choice.rank), float(choice.sigma), float(choice.edge), choice.status))
        return out
    for cq, ck in zip(
        _head_blocks(statistics.covariance(), heads),
        _head_blocks(statistics.key_covariance(), heads),
        strict=True,
    ):
        q = activation_rank(cq, n, tau=tau, estimator=estimator)
        k = activation_rank(ck, n, tau=tau, estimator=estimator)
        smaller = q if int(q.rank) <= int(k.rank) else k
        unjudged = next((c.status for c in (q, k) if c.status != "ok"), "ok")
        out.append((int(smaller.rank), float(smaller.sigma), float(smaller.edge), unjudged))
    return out


def carries_mean(model: nn.Module, site: WidthSite) -> bool:
    """Whether a cut of ``site`` must spend one kept direction on the units' mean.

    A cut that ends in a ``Linear`` (MLP, flattened channels) or in the values' convex
    combination (``attn_vo``) restores the mean through a bias, exactly; a zero-padded
    convolution cannot (at the borders the padding is zero, not the mean) and the residual
    stream is rotated without an intercept, so there the mean is one more direction to keep.
    """
    if site.kind == "residual":
        return True
    if site.kind == "channels":
        return isinstance(model.get_submodule(site.consumer), nn.Conv2d)
    return False


def site_rank(
    model: nn.Module,
    site: WidthSite,
    statistics: SiteStatistics,
    *,
    tau: float = 0.5,
    estimator: str = "mp_fit",
) -> SiteRank:
    """How many directions of ``site`` lie above the Marchenko–Pastur edge, and so the width to
    keep (see :func:`laserrmt.rmt.activations.activation_rank` on the covariance and the
    effective sample size; attention sites per head, :func:`attention_head_ranks`; one more for
    the mean where the cut cannot restore it, :func:`carries_mean`)."""
    if site.kind in ("attn_vo", "attn_qk"):
        heads = attention_layout(model, site).heads
        per_head = attention_head_ranks(site, statistics, heads, tau=tau, estimator=estimator)
        best = max(range(heads), key=lambda h: per_head[h][0])
        k_head, sigma, edge, _ = per_head[best]
        status = next((p[3] for p in per_head if p[3] != "ok"), "ok")
        return SiteRank(
            heads * k_head, statistics.width, sigma, edge, [p[0] for p in per_head], status
        )
    choice = activation_rank(
        statistics.covariance().cpu().numpy(),
        statistics.independent_rows,
        tau=tau,
        estimator=estimator,
    )
    k = int(choice.rank)
    if carries_mean(model, site) and statistics.mean is not None:
        k = min(k + 1, statistics.width)
    return SiteRank(
        k, statistics.width, float(choice.sigma), float(choice.edge), status=choice.status
    )
