"""Target discovery: the weight matrices of a model that rank reduction may act on.

A *target* is a module whose weight is one matrix applied to activations: ``nn.Linear``,
``nn.Conv1d`` and ``nn.Conv2d`` with ``groups == 1``, and Hugging Face's GPT-2 style
``Conv1D``. Its matrix is always seen as ``m × n`` = out × in: :func:`weight_matrix`
transposes ``Conv1D`` (stored in × out) and reshapes a convolution kernel of shape
``(out, in, kh, kw)`` to ``out × in·kh·kw``, the matrix that acts on unfolded input patches.

Modules that hold a weight matrix but cannot be targets (grouped and depthwise convolutions,
transposed and 3-D convolutions, ``nn.MultiheadAttention`` whose packed projection is a bare
parameter) are listed with the reason by :func:`unsupported_modules`, never skipped silently.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from laserrmt.errors import TargetSelectionError
from laserrmt.models.architectures import ROLES, block_index, is_embedding_or_head, module_role

HFConv1D: type[nn.Module] | None
try:  # transformers is a dependency, but discovery must work on plain torch models too.
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover - transformers is installed with laserrmt
    HFConv1D = None

TARGET_KINDS = ("linear", "conv1d", "conv2d", "hf_conv1d")


@dataclass(frozen=True)
class Target:
    """One weight matrix of a model.

    ``name`` is the module's full dotted name (``model.get_submodule(name)`` gives it),
    ``shape`` the matrix seen as out × in, ``block`` the transformer block index and ``role``
    its job in the block (see :mod:`laserrmt.models.architectures`), ``None`` when unknown.
    ``is_head`` marks output heads and layers tied to an input embedding.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    block: int | None
    role: str | None
    is_head: bool = False

    @property
    def params(self) -> int:
        """Number of entries of the matrix, m·n (biases not counted)."""
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (``shape`` as a list)."""
        record = asdict(self)
        record["shape"] = list(self.shape)
        record["params"] = self.params
        return record


def target_kind(module: nn.Module) -> str | None:
    """The target kind of a module (one of :data:`TARGET_KINDS`), or ``None`` if not a target.

    Only modules whose weight is a single dense matrix qualify; grouped convolutions do not.
    """
    if HFConv1D is not None and isinstance(module, HFConv1D):
        return "hf_conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d) and module.groups == 1:
        return "conv1d"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv2d"
    return None


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a target module as an ``out × in`` matrix.

    The result is a detached view sharing storage with the parameter: read it freely, but
    change weights only through :func:`set_weight_matrix`.
    """
    kind = target_kind(module)
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    if kind == "hf_conv1d":
        return weight.detach().t()
    if kind == "linear":
        return weight.detach()
    if kind in ("conv1d", "conv2d"):
        return weight.detach().reshape(weight.shape[0], -1)
    raise TypeError(f"{type(module).__name__} is not a target module (Linear, Conv1d/2d, Conv1D)")


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write an ``out × in`` matrix back into a target module's weight, in place.

    The inverse of :func:`weight_matrix`: ``Conv1D`` gets the transpose, convolutions the
    kernel shape. The parameter keeps its dtype and device.
    """
    current = weight_matrix(module)
    if tuple(matrix.shape) != tuple(current.shape):
        raise ValueError(
            f"matrix of shape {tuple(matrix.shape)} does not fit a weight seen as "
            f"{tuple(current.shape)}"
        )
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    value = matrix.detach().to(device=weight.device, dtype=weight.dtype)
    if target_kind(module) == "hf_conv1d":
        value = value.t()
    with torch.no_grad():
        weight.copy_(value.reshape(weight.shape))


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    if target_kind(module) == "hf_conv1d":
        return int(weight.shape[1]), int(weight.shape[0])
    out = int(weight.shape[0])
    return out, int(weight.numel() // out) if out else 0


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Target modules in ``named_modules`` order, with their kind."""
    inside_mha = _modules_inside_multihead_attention(model)
    for name, module in model.named_modules():
        kind = target_kind(module)
        if kind is None or name in inside_mha:
            continue
        yield name, module, kind


def find_targets(model: nn.Module, *, include_heads: bool = False) -> list[Target]:
    """Every weight matrix of ``model`` that rank reduction may act on, in module order.

    Output heads (``lm_head``, classifiers, layers tied to an input embedding) are left out
    unless ``include_heads`` is true. Modules that hold a matrix of a kind that cannot be
    reduced are reported by :func:`unsupported_modules`.
    """
    targets = []
    for name, module, kind in _candidates(model):
        head = is_embedding_or_head(name, module, model)
        if head and not include_heads:
            continue
        targets.append(
            Target(
                name=name,
                kind=kind,
                shape=_matrix_shape(module),
                block=block_index(name),
                role=module_role(name),
                is_head=head,
            )
        )
    return targets


def unsupported_modules(model: nn.Module) -> list[tuple[str, str]]:
    """Modules that hold a weight matrix but are not targets, as ``(name, reason)`` pairs."""
    inside_mha = _modules_inside_multihead_attention(model)
    skipped = []
    for name, module in model.named_modules():
        reason = None
        if name in inside_mha:
            reason = "inside nn.MultiheadAttention, which reads this weight directly"
        elif isinstance(module, nn.MultiheadAttention):
            reason = "nn.MultiheadAttention packs q, k, v in a bare parameter (in_proj_weight)"
        elif isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            reason = f"{kind} convolution (groups={module.groups}) has no single weight matrix"
        elif isinstance(module, nn.Conv3d):
            reason = "3-D convolutions are not supported"
        elif isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            reason = "transposed convolutions are not supported"
        elif isinstance(module, nn.Bilinear):
            reason = "a bilinear layer's weight is a 3-D tensor"
        if reason is not None:
            skipped.append((name, reason))
    return skipped


def _modules_inside_multihead_attention(model: nn.Module) -> set[str]:
    # nn.MultiheadAttention calls F.multi_head_attention_forward with out_proj.weight, so a
    # replaced out_proj would be bypassed rather than used.
    names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            names.update(f"{prefix}{child}" for child, _ in module.named_modules() if child)
    return names


def select_targets(targets: Sequence[Target], patterns: Sequence[str] | None) -> list[Target]:
    """The targets matched by any of ``patterns``, in the order of ``targets``.

    Each pattern is one of, tried in this order:

    - ``role:<glob>``: targets whose role matches the shell-style glob (``role:mlp.down``,
      ``role:attn.*``);
    - ``block:<i>`` or ``block:<i>-<j>``: targets in block ``i``, or blocks ``i`` to ``j``
      inclusive;
    - an exact module name (``model.layers.3.mlp.down_proj``);
    - the name of a parent module: every target below it (``model.layers.3`` is block 3,
      never block 30);
    - otherwise a regular expression, matched with :func:`re.search` against the name
      (``mlp\\.down_proj$``; anchor with ``^``/``$`` for a full match).

    ``None`` or an empty sequence selects every target. A pattern that matches nothing raises
    :class:`~laserrmt.errors.TargetSelectionError`.
    """
    if not patterns:
        return list(targets)
    chosen: set[str] = set()
    for pattern in patterns:
        match = _matcher(pattern, targets)
        matched = [t.name for t in targets if match(t)]
        if not matched:
            raise TargetSelectionError(_no_match_message(pattern, targets))
        chosen.update(matched)
    return [t for t in targets if t.name in chosen]


def _matcher(pattern: str, targets: Sequence[Target]) -> Callable[[Target], bool]:
    if pattern.startswith("role:"):
        glob = pattern.removeprefix("role:").strip()
        return lambda t: t.role is not None and fnmatch.fnmatchcase(t.role, glob)
    if pattern.startswith("block:"):
        low, high = _block_range(pattern)
        return lambda t: t.block is not None and low <= t.block <= high
    names = {t.name for t in targets}
    if pattern in names:
        return lambda t: t.name == pattern
    prefix = pattern.rstrip(".") + "."
    if any(name.startswith(prefix) for name in names):
        return lambda t: t.name.startswith(prefix)
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise TargetSelectionError(
            f"target pattern {pattern!r} is neither a module name nor a valid regular "
            f"expression ({exc}); escape special characters or use role:/block: patterns"
        ) from None
    return lambda t: regex.search(t.name) is not None


def _block_range(pattern: str) -> tuple[int, int]:
    spec = pattern.removeprefix("block:").strip()
    match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", spec)
    if match is None:
        raise TargetSelectionError(
            f"target pattern {pattern!r} is not block:<i> or block:<i>-<j> (e.g. block:3, block:0-5)"
        )
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if high < low:
        raise TargetSelectionError(
            f"target pattern {pattern!r} has an empty range; write the smaller block first"
        )
    return low, high


def _no_match_message(pattern: str, targets: Sequence[Target]) -> str:
    if not targets:
        return f"target pattern {pattern!r} matches nothing: the model has no target matrices"
    examples = ", ".join(t.name for t in targets[:3])
    hint = ""
    if pattern.startswith("role:"):
        roles = sorted({t.role for t in targets if t.role is not None})
        hint = f"; roles in this model: {', '.join(roles) or 'none known'}"
        if not roles:
            hint += f" (known roles: {', '.join(ROLES)})"
    elif pattern.startswith("block:"):
        blocks = sorted({t.block for t in targets if t.block is not None})
        hint = f"; blocks in this model: {blocks[0]}-{blocks[-1]}" if blocks else "; no blocks"
    else:
        hint = "; output heads are excluded unless --include-heads"
    return (
        f"target pattern {pattern!r} matches none of the {len(targets)} targets "
        f"(e.g. {examples}){hint}"
    )
