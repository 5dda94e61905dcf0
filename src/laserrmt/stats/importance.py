"""Layer-importance scores: how much each matrix's loss should count in a global budget.

The LaserRMT seed names three signals for layer importance, plus the neutral choice:

``none``
    every matrix 1.
``fisher``
    gradient sensitivity: the diagonal Fisher information of the matrix, ``Σ (∂L/∂W_ij)²``,
    per parameter (its mean), so large and small matrices are comparable.
``entropy``
    spectral concentration, ``1 − H / log p`` with ``H = −Σ p_i log p_i``, ``p_i = s_i² / Σ s²``
    (method.md §4): a spectrum with its energy in a few directions holds learned structure; a
    flat, noise-like one scores near 0.
``attention``
    attention-pattern entropy (method.md §7): per layer, the mean over heads and query positions
    of the attention row's entropy divided by its maximum ``log(#keys attended)``. Sharp, low-
    entropy attention is doing precise retrieval and is scored as more important
    (``1 − mean normalised entropy``); uniform attention scores 0. The layer's score goes to its
    attention matrices (q/k/v/qkv/o); every other matrix gets 1.

Every function returns ``{module name: score}`` normalised to mean 1 over the modules it
scores (for ``attention``: over the attention matrices; the others are 1, so the overall mean
is 1 too). Scores that are all equal, including all zero, mean "no preference" and give 1
everywhere. The scores are weights on each matrix's loss in
:func:`laserrmt.allocation.allocate_ranks`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from laserrmt.errors import InvalidOptionError, NumericalError, TargetSelectionError
from laserrmt.models.architectures import block_index, module_role
from laserrmt.stats.forward import Batch, run_forward

__all__ = [
    "IMPORTANCE_KINDS",
    "ImportanceKind",
    "attention_entropies",
    "attention_entropy_importance",
    "entropy_importance",
    "fisher_importance",
    "layer_importance",
    "normalize_scores",
    "uniform_importance",
]

ImportanceKind = Literal["none", "fisher", "entropy", "attention"]
IMPORTANCE_KINDS: tuple[str, ...] = get_args(ImportanceKind)


def normalize_scores(scores: Mapping[str, float]) -> dict[str, float]:
    """Scale non-negative scores to mean 1; all-equal (or all-zero) scores become all 1.

    Raises:
        NumericalError: a NaN, infinite or negative score.
    """
    values = np.array([float(v) for v in scores.values()], dtype=np.float64)
    for name, value in zip(scores, values, strict=True):
        if not math.isfinite(value) or value < 0:
            raise NumericalError(
                f"importance score of {name} is {value}; scores must be finite and non-negative"
            )
    if values.size == 0:
        return {}
    mean = float(values.mean())
    if mean == 0 or np.all(values == values[0]):
        return dict.fromkeys(scores, 1.0)
    return {name: float(value / mean) for name, value in zip(scores, values, strict=True)}


def uniform_importance(module_names: Iterable[str]) -> dict[str, float]:
    """Importance ``none``: every module 1."""
    return dict.fromkeys(module_names, 1.0)


def fisher_importance(fisher_stats: Mapping[str, Any]) -> dict[str, float]:
    """Importance ``fisher``: the mean diagonal Fisher information of each matrix.

    Args:
        fisher_stats: module → its diagonal Fisher (a tensor or array, any shape), or a
            statistics record with a ``fisher`` attribute
            (:class:`laserrmt.stats.calibration.InputStatistics` collected with ``fisher=True``).

    Raises:
        InvalidOptionError: a record without Fisher information.
        NumericalError: NaN/Inf or negative values, or Fisher zero for every module (the loss
            reaches none of them).
    """
    raw: dict[str, float] = {}
    for name, value in fisher_stats.items():
        fisher = getattr(value, "fisher", value)
        if fisher is None:
            raise InvalidOptionError(
                f"no Fisher information for {name}; collect calibration statistics with fisher=True"
            )
        # Checked and averaged where it was collected: only the mean comes to the host.
        f = (
            fisher.detach().to(torch.float64)
            if isinstance(fisher, torch.Tensor)
            else torch.as_tensor(np.asarray(fisher, dtype=np.float64))
        )
        if f.numel() == 0 or not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise NumericalError(
                f"Fisher information of {name} is empty, negative or not finite; recompute it"
            )
        raw[name] = float(f.mean())
    if raw and not any(raw.values()):
        raise NumericalError(
            "the Fisher information is zero for every matrix; check that the calibration loss "
            "depends on them"
        )
    return normalize_scores(raw)


def _spectral_concentration(values: np.ndarray, name: str) -> float:
    s = np.asarray(values, dtype=np.float64).reshape(-1)
    if s.size == 0 or not np.isfinite(s).all():
        raise NumericalError(f"singular values of {name} are empty or not finite")
    energy = s**2
    total = energy.sum()
    if not total > 0:
        raise NumericalError(f"matrix {name} is zero; its spectral entropy is undefined")
    if s.size == 1:
        return 1.0
    p = energy[energy > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    return max(0.0, 1.0 - entropy / math.log(s.size))


def entropy_importance(singular_values_by_module: Mapping[str, Any]) -> dict[str, float]:
    """Importance ``entropy``: ``1 − H / log p`` of each matrix's spectrum, normalised to mean 1.

    ``H`` is the spectral entropy of ``p_i = s_i² / Σ s_j²`` and ``p`` the number of singular
    values, so the raw score is 0 for a flat spectrum and 1 for rank one.

    Raises:
        NumericalError: a zero matrix or non-finite singular values.
    """
    raw = {
        name: _spectral_concentration(np.asarray(values), name)
        for name, values in singular_values_by_module.items()
    }
    return normalize_scores(raw)


# ---------------------------------------------------------------------------------------------
# Attention entropy


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Eager attention (the only one that returns attention maps), switched back afterwards."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None) if config is not None else None
    switch = getattr(model, "set_attn_implementation", None)
    changed = previous is not None and previous != "eager"
    if changed:
        if callable(switch):
            switch("eager")
        else:
            config._attn_implementation = "eager"  # type: ignore[union-attr]
    try:
        yield
    finally:
        if changed:
            if callable(switch):
                switch(previous)
            else:
                config._attn_implementation = previous  # type: ignore[union-attr]


def attention_entropies(model: nn.Module, batches: Iterable[Batch]) -> dict[int, float]:
    """Per layer, the mean normalised entropy of its attention rows, in [0, 1].

    For each head and query position the attention row ``a`` over the keys it may attend
    (those with ``a_j > 0``: the causal prefix, minus padding) has entropy ``−Σ a_j log a_j``,
    divided by ``log`` of that number of keys, so uniform attention gives exactly 1. Rows with
    a single key (the first token of a causal model) have no entropy to speak of and are
    skipped, as are padded query positions (``attention_mask`` of a mapping batch). A key whose
    weight underflows to exactly 0 counts as not attended; that only happens for logit gaps
    above ~100 and hardly changes the mean.

    The model runs under ``torch.no_grad`` in eval mode with eager attention
    (``output_attentions=True``); its attention implementation and training flags are
    restored afterwards. Memory: one batch's maps for every layer, ``layers·heads·T²`` floats.

    Raises:
        TargetSelectionError: the model returns no attention maps (not a Hugging Face
            transformer, or one whose attention cannot be switched to eager).
        InvalidOptionError: no batches.
    """
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}

    def observe(batch: Batch, outputs: Any) -> None:
        attentions = getattr(outputs, "attentions", None)
        if not attentions or any(a is None for a in attentions):
            raise TargetSelectionError(
                f"{type(model).__name__} returned no attention maps with "
                "output_attentions=True; use another importance (fisher, entropy or none)"
            )
        query_mask = None
        if isinstance(batch, Mapping) and batch.get("attention_mask") is not None:
            query_mask = batch["attention_mask"].to(torch.bool)
        for layer, maps in enumerate(attentions):
            total, rows = _normalised_entropy_sum(maps, query_mask)
            sums[layer] = sums.get(layer, 0.0) + total
            counts[layer] = counts.get(layer, 0) + rows

    with _eager_attention(model):
        seen = run_forward(model, batches, after_each=observe, extra={"output_attentions": True})
    if not seen:
        raise InvalidOptionError("no calibration batches were given for attention entropy")
    result: dict[int, float] = {}
    for layer, total in sums.items():
        if counts[layer] == 0:
            raise InvalidOptionError(
                f"layer {layer} has no query with two or more keys; use longer windows"
            )
        result[layer] = total / counts[layer]
    return result


def _normalised_entropy_sum(
    maps: torch.Tensor, query_mask: torch.Tensor | None
) -> tuple[float, int]:
    """Sum of normalised row entropies of ``[batch, heads, queries, keys]`` maps, and row count."""
    a = maps.detach().to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise NumericalError("attention maps contain NaN or Inf; check the model dtype")
    support = (a > 0).sum(dim=-1)
    entropy = -torch.xlogy(a, a).sum(dim=-1)
    valid = support >= 2
    if query_mask is not None:
        valid = valid & query_mask[:, None, :].to(valid.device)
    normalised = entropy[valid] / support[valid].to(torch.float64).log()
    return float(normalised.sum()), int(valid.sum())


def attention_entropy_importance(
    model: nn.Module, batches: Iterable[Batch], module_names: Sequence[str]
) -> dict[str, float]:
    """Importance ``attention``: ``1 − mean normalised attention entropy`` of each module's layer.

    Modules whose role (:func:`laserrmt.models.architectures.module_role`) is self-attention
    (``attn.*``) get their block's score, normalised to mean 1 over those modules; all other
    modules (MLP, cross-attention, unknown roles) get 1.

    Raises:
        TargetSelectionError: an attention module outside the layers the model reports, or a
            model without attention maps (see :func:`attention_entropies`).
    """
    attention = [name for name in module_names if (module_role(name) or "").startswith("attn.")]
    scores = uniform_importance(module_names)
    if not attention:
        return scores
    entropies = attention_entropies(model, batches)
    raw: dict[str, float] = {}
    for name in attention:
        layer = block_index(name)
        if layer is None or layer not in entropies:
            raise TargetSelectionError(
                f"{name} is an attention matrix but the model reports attention maps for layers "
                f"0..{len(entropies) - 1} only; use another importance for this model"
            )
        raw[name] = max(0.0, 1.0 - entropies[layer])
    scores.update(normalize_scores(raw))
    return scores


def layer_importance(
    kind: ImportanceKind | str,
    module_names: Sequence[str],
    *,
    fisher: Mapping[str, Any] | None = None,
    singular_values: Mapping[str, Any] | None = None,
    model: nn.Module | None = None,
    batches: Iterable[Batch] | None = None,
) -> dict[str, float]:
    """One importance score per module, by name of the signal (``--importance``).

    ``fisher`` needs ``fisher`` (module → Fisher or statistics), ``entropy`` needs
    ``singular_values`` (module → spectrum), ``attention`` needs ``model`` and ``batches``.

    Raises:
        InvalidOptionError: an unknown kind, or the inputs it needs missing or incomplete.
    """
    names = list(module_names)
    if kind == "none":
        return uniform_importance(names)
    if kind == "fisher":
        return fisher_importance(_select(fisher, names, "fisher", "Fisher information"))
    if kind == "entropy":
        return entropy_importance(_select(singular_values, names, "entropy", "singular values"))
    if kind == "attention":
        if model is None or batches is None:
            raise InvalidOptionError("importance 'attention' needs the model and calibration data")
        return attention_entropy_importance(model, batches, names)
    raise InvalidOptionError(
        f"unknown importance {kind!r}; use one of {', '.join(IMPORTANCE_KINDS)}"
    )


def _select(
    values: Mapping[str, Any] | None, names: Sequence[str], kind: str, what: str
) -> dict[str, Any]:
    if values is None:
        raise InvalidOptionError(f"importance {kind!r} needs the {what} of every target")
    missing = [name for name in names if name not in values]
    if missing:
        raise InvalidOptionError(
            f"importance {kind!r}: no {what} for {len(missing)} targets (first: {missing[0]})"
        )
    return {name: values[name] for name in names}
