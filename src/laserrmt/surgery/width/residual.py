"""The residual stream of a Llama-style (pre-RMSNorm) transformer, the SliceGPT route.

Ashkboos et al., ICLR 2024, "computational invariance": every RMSNorm scale is folded into the
linear layers that read the normalised stream, after which RMSNorm commutes with any orthogonal
``Q`` (``‖Qᵀx‖ = ‖x‖``). One rotation ``Q`` (the eigenvectors of the residual activations'
second moment pooled over all block boundaries) is applied to the embedding, to every layer
that reads the stream (from the input side) and every layer that writes to it (from the output
side), and to the head; then the minor directions are deleted. The stream is linear, so this is
a true projection onto the top directions. The cut changes the model's config
(``hidden_size``) rather than registering resized layers, because every layer of the stream
changes with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from laserrmt.errors import InvalidOptionError, PlanError, TargetSelectionError
from laserrmt.models.architectures import residual_layout
from laserrmt.models.placement import float64_device

__all__ = ["residual_width", "rotate_residual_stream", "slice_residual_stream"]


def residual_width(model: nn.Module, k: int) -> int:
    """``k`` rounded up to a width the model's config accepts (a multiple of the head count).

    transformers validates ``hidden_size % num_attention_heads == 0`` when a config is saved,
    even though ``head_dim`` is pinned; rounding up keeps a few more directions, never fewer.
    """
    config = getattr(model, "config", None)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    d = residual_layout(model).width
    return min(d, -(-k // heads) * heads)


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
    differ). The function the model computes is unchanged (SliceGPT, Theorem 1). The products
    are formed in float64 on the weights' device, wherever ``Q`` was computed.
    """
    layout = residual_layout(model)
    d = layout.width
    device = float64_device(layout.embedding.weight.device)
    q = q.to(device=device, dtype=torch.float64)
    if q.shape != (d, d) or not torch.allclose(
        q.T @ q, torch.eye(d, dtype=torch.float64, device=device), atol=1e-8
    ):
        raise InvalidOptionError(f"Q must be an orthogonal {d} × {d} matrix")

    def fold_norm(norm: nn.Module, readers: Sequence[nn.Linear]) -> None:
        scale = _norm_scale(norm).detach().to(device, torch.float64)
        for linear in readers:
            w = linear.weight.detach().to(device, torch.float64)
            # reader(diag(s) n(x)) = (W diag(s)) n(x); in the rotated stream n(Qᵀx) = Qᵀ n(x).
            linear.weight.data = ((w * scale) @ q).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            _norm_scale(norm).fill_(1.0)

    for norm, readers in layout.norms:
        fold_norm(norm, readers)
    for linear in layout.writers:
        w = linear.weight.detach().to(device, torch.float64)
        linear.weight.data = (q.T @ w).to(linear.weight.device, linear.weight.dtype)
        if linear.bias is not None:
            bias = linear.bias.detach().to(device, torch.float64)
            linear.bias.data = (q.T @ bias).to(linear.bias.device, linear.bias.dtype)
    embedding = layout.embedding.weight.detach().to(device, torch.float64)
    head = layout.head
    if head is None:
        raise TargetSelectionError(f"{type(model).__name__} has no output head to rotate")
    tied = head.weight is layout.embedding.weight
    head_weight = head.weight.detach().to(device, torch.float64)
    embedding_weight = layout.embedding.weight
    layout.embedding.weight = nn.Parameter(
        (embedding @ q).to(embedding_weight.device, embedding_weight.dtype)
    )
    final_scale = _norm_scale(layout.final_norm).detach().to(device, torch.float64)
    head.weight = nn.Parameter(
        ((head_weight * final_scale) @ q).to(head.weight.device, head.weight.dtype)
    )
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
    normalised exactly as before. The eigendecomposition runs in float64 on the model's device.
    """
    layout = residual_layout(model)
    d = layout.width
    if not 1 <= k <= d:
        raise PlanError(f"cannot keep {k} of {d} residual directions; keep 1..{d}")
    device = float64_device(layout.embedding.weight.device)
    c = second_moment.detach().to(device, torch.float64)
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
