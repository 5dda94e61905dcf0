"""Cutting a width across a nonlinearity: keep ``k`` units, reconstruct the others.

The channels of a convolution followed by BatchNorm/ReLU/pooling, the intermediate width of an
MLP (``act(W_in x)`` or ``act(W_gate x) ⊙ W_up x``). A rotation ``U_kᵀ`` of the hidden units
cannot be moved into the producing layer, because ``act(U_kᵀ W x) ≠ U_kᵀ act(W x)``. Inserting
the projection after the nonlinearity and folding it into the consumer (``W_out U_k``) is exact,
but it removes nothing: the producer still computes all ``d`` units. So the cut keeps ``k``
*units* (channels, neurons) instead of ``k`` directions, which removes parameters on both sides
(``(d − k)`` rows of every producer, ``(d − k)`` columns of the consumer):

1. the ``k`` units that best span the top-``k`` eigen-directions of the units' (co)variance are
   chosen by a column-pivoted QR of ``Λ_k^{1/2} U_kᵀ`` (a subset-selection rule for the signal
   subspace; Golub & Van Loan §5.4.6, as in DEIM/CUR): a unit whose signal part is already
   explained by chosen units is skipped;
2. the dropped units are replaced by their least-squares regression on the kept ones and the
   regression is folded into the consumer. Selecting units commutes with every unit-wise
   operation (activation, gate product, BatchNorm, ReLU, max pooling), so the kept units are
   computed exactly; only the dropped ones are estimated.

When the consumer is an ``nn.Linear`` the regression has an intercept,
``h ≈ μ + R (h_S − μ_S)`` with ``R = Σ_{:,S} Σ_{S,S}⁺`` from the covariance ``Σ``, and the
intercept goes into the consumer's bias: units in a ``k``-dimensional *affine* subspace are
reconstructed exactly by ``k`` of them. A zero-padded convolution cannot take an intercept (at
the borders the padding is zero, not the mean), so there the regression is through the origin,
``R = C_{:,S} C_{S,S}⁺`` with the uncentred second moment ``C``, and the mean is one more
direction the kept units must carry (:func:`laserrmt.stats.activations.carries_mean`). With all
units kept ``R = I`` and the model is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch
from torch import nn

from laserrmt.errors import PlanError, TargetSelectionError
from laserrmt.models.placement import float64_device
from laserrmt.models.widths import WidthSite
from laserrmt.stats.activations import SiteStatistics
from laserrmt.surgery.replace import set_submodule
from laserrmt.surgery.width.modules import ResizedBatchNorm2d, ResizedConv2d, ResizedLinear

__all__ = ["cut_units", "reconstruction_matrix", "select_units"]


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

    Given the covariance instead of the second moment, ``R`` is the slope of the regression with
    an intercept. The pseudo-inverse drops eigenvalues under ``1e-12`` of the largest, so units
    that are (numerically) dead or exact copies do not blow up the weights. With every unit kept
    ``R`` is the identity, exactly.
    """
    d = int(second_moment.shape[0])
    kept = list(kept)
    device = float64_device(second_moment.device)
    if len(kept) == d and kept == list(range(d)):
        return torch.eye(d, dtype=torch.float64, device=device)
    c = second_moment.detach().to(device, torch.float64)
    c = (c + c.T) / 2
    sub = c[kept][:, kept]
    values, vectors = torch.linalg.eigh(sub)
    floor = 1e-12 * float(values.abs().max()) if values.numel() else 0.0
    inverse_values = torch.where(values > floor, 1.0 / values.clamp_min(floor or 1e-300), 0.0)
    pinv = (vectors * inverse_values) @ vectors.T
    r = c[:, kept] @ pinv
    # The kept units reconstruct themselves: make that exact rather than nearly so.
    r[kept] = torch.eye(len(kept), dtype=torch.float64, device=r.device)
    return r


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


def _fold_into_consumer(
    consumer: nn.Module, r: torch.Tensor, width: int, intercept: torch.Tensor | None
) -> nn.Module:
    """The consumer reading ``k`` units: input columns times ``R`` (d × k), plus the consumer's
    response to ``intercept`` (d) in its bias when there is one."""
    k = r.shape[1]
    if not isinstance(consumer, nn.Conv2d | nn.Linear):
        raise TargetSelectionError(
            f"a {type(consumer).__name__} cannot absorb a width cut; the consumer of a site "
            "must be nn.Linear or nn.Conv2d"
        )
    w = consumer.weight.detach().to(torch.float64)
    bias = consumer.bias
    if isinstance(consumer, nn.Conv2d):
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
        shift = None
    else:
        positions = consumer.in_features // width
        # Flattened channels (CNN → Linear) are [C, positions] in C order; tokens have 1 position.
        grouped = w.reshape(w.shape[0], width, positions)
        folded = torch.einsum("ocs,ck->oks", grouped, r.to(w.device)).reshape(w.shape[0], -1)
        shift = (
            None if intercept is None else torch.einsum("ocs,c->o", grouped, intercept.to(w.device))
        )
        new = ResizedLinear(
            k * positions,
            consumer.out_features,
            bias=bias is not None or shift is not None,
            device=consumer.weight.device,
            dtype=consumer.weight.dtype,
        )
    with torch.no_grad():
        new.weight.copy_(folded.to(new.weight.dtype))
        if new.bias is not None:
            total = torch.zeros(new.bias.shape, dtype=torch.float64, device=w.device)
            if bias is not None:
                total += bias.detach().to(torch.float64)
            if shift is not None:
                total += shift
            new.bias.copy_(total.to(new.bias.dtype))
    return new


def cut_units(
    model: nn.Module,
    site: WidthSite,
    statistics: SiteStatistics,
    k: int,
    kept: Sequence[int] | None = None,
) -> list[int]:
    """Keep ``k`` units of an MLP or channel site (``kept``, or :func:`select_units`' choice)
    and fold the reconstruction of the others into the consumer; returns the kept units."""
    consumer = model.get_submodule(site.consumer)
    linear = isinstance(consumer, nn.Linear)
    mean = statistics.mean
    moment = statistics.covariance() if linear else statistics.second_moment
    units = list(kept) if kept is not None else select_units(moment, k)
    if len(units) != k or len(set(units)) != k or not all(0 <= u < site.width for u in units):
        raise PlanError(
            f"site {site.name}: kept units must be {k} distinct indices below {site.width}"
        )
    units = sorted(units)
    r = reconstruction_matrix(moment, units)
    intercept = None
    if linear and mean is not None and k < site.width:
        m = mean.to(torch.float64)
        intercept = m - r @ m[units]
    set_submodule(model, site.consumer, _fold_into_consumer(consumer, r, site.width, intercept))
    for name in site.producers:
        module = model.get_submodule(name)
        rows = torch.tensor(units, dtype=torch.long, device=next(module.parameters()).device)
        if isinstance(module, nn.Conv2d):
            set_submodule(model, name, _select_rows_conv(module, rows))
        elif isinstance(module, nn.Linear):
            set_submodule(model, name, _select_rows_linear(module, rows))
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
        set_submodule(model, name, _select_batchnorm(module, rows))
    return units
