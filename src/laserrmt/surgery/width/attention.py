"""Attention widths: the per-head value/output and query/key widths of encoder self-attention.

``attn_vo``: a head's output is a convex combination of its values (the softmax weights sum to
1). When the values lie in a ``k``-dimensional affine subspace ``μ + span(U_k)``, projecting
them on ``U_k`` and reading the projection back with ``O_h U_k``, plus ``O_h (I − U_k U_kᵀ) μ``
in the output bias, is exact (the constant passes through the convex combination unchanged).
``U_k`` are the top eigenvectors of the head's value covariance.

``attn_qk``: attention reads queries and keys only through the products ``qᵀk``; the cut keeps
the best rank-``k`` approximation of those products (:func:`query_key_maps`).

BERT derives one head size from ``hidden_size / num_attention_heads`` and uses it for all three
projections, so a narrowed head needs its own module, :class:`ReducedSelfAttention`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from laserrmt.errors import PlanError, TargetSelectionError
from laserrmt.models.architectures import SelfAttentionLayout
from laserrmt.models.placement import float64_device, model_device
from laserrmt.models.widths import WidthSite, attention_layout
from laserrmt.stats.activations import SiteStatistics
from laserrmt.surgery.registry import CompressedModule, dtype_from_name, dtype_name, register_module
from laserrmt.surgery.replace import set_submodule
from laserrmt.surgery.width.modules import ResizedLinear

__all__ = ["ReducedSelfAttention", "cut_attention", "query_key_maps"]


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


def _head_blocks(c: torch.Tensor, heads: int, device: torch.device) -> list[torch.Tensor]:
    # Host statistics go to the weights' device: the eigendecompositions run where they are used.
    size = c.shape[0] // heads
    c = c.detach().to(float64_device(device), torch.float64)
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


def cut_attention(
    model: nn.Module, site: WidthSite, statistics: SiteStatistics, k: int
) -> tuple[int, int]:
    """Cut an attention site to ``k`` total width (``k / heads`` per head, rounded up); returns
    the per-head and the total width kept."""
    layout = attention_layout(model, site)
    heads = layout.heads
    k_head = min(-(-k // heads), site.width // heads)
    attention = _reduced_from(model.get_submodule(layout.self_name), layout)
    device = model_device(attention)
    if site.kind == "attn_vo":
        maps = [
            _top_eigenvectors(c, k_head)
            for c in _head_blocks(statistics.covariance(), heads, device)
        ]
        attention.value = _per_head_rows(attention.value, maps)
        attention.v_head_size = k_head
        output = model.get_submodule(layout.output_name)
        assert isinstance(output, nn.Linear)  # encoder_self_attentions checked it
        w = output.weight.detach().to(torch.float64)
        size = w.shape[1] // heads
        mean = statistics.mean
        mu = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device) if mean is None else mean
        mu = mu.to(w.device, torch.float64)
        folded, shift = [], torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        for h in range(heads):
            part = slice(h * size, (h + 1) * size)
            u = maps[h].to(w.device)
            folded.append(w[:, part] @ u)
            # What the projection removes from the mean goes back in as a constant.
            shift += w[:, part] @ (mu[part] - u @ (u.T @ mu[part]))
        new_output = ResizedLinear(
            heads * k_head,
            output.out_features,
            bias=output.bias is not None or mean is not None,
            device=w.device,
            dtype=output.weight.dtype,
        )
        with torch.no_grad():
            new_output.weight.copy_(torch.cat(folded, dim=1).to(new_output.weight.dtype))
            if output.bias is not None:
                shift += output.bias.detach().to(torch.float64)
            if new_output.bias is not None:
                new_output.bias.copy_(shift.to(new_output.bias.dtype))
        set_submodule(model, layout.output_name, new_output)
    else:
        if statistics.key_moment is None:
            raise PlanError(f"site {site.name}: query-key statistics need the key second moment")
        pairs = [
            query_key_maps(cq, ck, k_head)
            for cq, ck in zip(
                _head_blocks(statistics.second_moment, heads, device),
                _head_blocks(statistics.key_moment, heads, device),
                strict=True,
            )
        ]
        attention.query = _per_head_rows(attention.query, [a for a, _ in pairs])
        attention.key = _per_head_rows(attention.key, [b for _, b in pairs])
        attention.qk_head_size = k_head
    set_submodule(model, layout.self_name, attention)
    return k_head, heads * k_head
