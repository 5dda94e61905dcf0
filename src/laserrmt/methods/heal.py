"""Healing: a short fine-tune of the compressed model towards the uncompressed one.

The loss is the KL divergence from the dense model's next-token distribution (the
distillation loss of :mod:`laserrmt.distill`, one implementation for healing and RMT-KD), on
calibration text only. What trains is one of :data:`HEAL_PARAMS`:

``factors``
    the factors (and biases) of the compressed layers (a width cut's resized layers too);
    everything else stays frozen.
``factors+norms``
    and the scales (and biases) of the normalisation layers (RMSNorm, LayerNorm), which
    re-balance the residual stream the cut disturbed, at a few thousand parameters.
``factors+norms+lora``
    and a low-rank adapter ``x ↦ B A x`` (rank ``r``, ``B = 0`` at the start, so the model is
    unchanged) on every target linear layer that stayed dense; after healing each adapter is
    merged into its weight, ``W ← W + B A``, so the saved model has the layers it had.

The dense model's distribution is computed once per batch *before* the surgery and kept as its
top-k classes plus a tail bucket (:func:`healing_teacher`), so healing holds no second copy of
the model. Under ``torchrun`` the steps run data-parallel (:func:`laserrmt.distill.distill`):
replicated with DDP, or with ``shard=True`` sharded with FSDP over the processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from laserrmt.distill import TopKLogits, distill, teacher_top_k, warmup_cosine
from laserrmt.errors import InvalidOptionError
from laserrmt.surgery.lowrank import LowRankConv1d, LowRankConv2d, LowRankLinear
from laserrmt.surgery.sparse import LowRankSparseLinear
from laserrmt.surgery.width.modules import ResizedConv2d, ResizedLinear

# A width cut's resized layers are the compressed layers of an RMT-KD model healed after a
# streamed run.
_FACTORIZED = (
    LowRankLinear,
    LowRankConv1d,
    LowRankConv2d,
    LowRankSparseLinear,
    ResizedLinear,
    ResizedConv2d,
)
#: The trainable sets of healing, each a superset of the one before.
HEAL_PARAMS = ("factors", "factors+norms", "factors+norms+lora")
#: The learning-rate schedules: ``cosine`` (linear warm-up, then a half cosine down to
#: :data:`COSINE_FLOOR` of the peak) or ``constant``.
SCHEDULES = ("cosine", "constant")
COSINE_FLOOR = 0.1
LORA_RANK = 8
#: The classes per position the teacher's cache keeps (``--heal-top-k``'s default).
HEAL_TOP_K = 64


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every factorized or resized layer (their factors and biases)."""
    return [p for m in model.modules() if isinstance(m, _FACTORIZED) for p in m.parameters()]


def _is_norm(module: nn.Module) -> bool:
    # Hugging Face families define their own RMSNorm classes (LlamaRMSNorm, …); batch norm is
    # left out because train mode would also move its running statistics.
    return isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.RMSNorm) or type(
        module
    ).__name__.endswith(("RMSNorm", "LayerNorm"))


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The scales and biases of every normalisation layer (RMSNorm, LayerNorm, GroupNorm)."""
    return [p for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)]


class LoRA(nn.Module):
    """``base(x) + B A x``: a trainable low-rank update beside a frozen linear layer.

    ``A`` (``[rank, in]``) starts random, ``B`` (``[out, rank]``) at zero, so the output is the
    base layer's until ``B`` trains. ``base`` is an ``nn.Linear`` or a transformers ``Conv1D``
    (GPT-2's linear layer, whose weight is stored transposed).
    """

    def __init__(self, base: nn.Module, rank: int) -> None:
        super().__init__()
        weight = base.weight
        assert isinstance(weight, torch.Tensor)
        transposed = not isinstance(base, nn.Linear)
        n_out, n_in = weight.shape[::-1] if transposed else weight.shape
        self.base = base
        self.transposed = transposed
        self.lora_a = nn.Parameter(
            torch.randn(rank, n_in, dtype=weight.dtype, device=weight.device) / math.sqrt(n_in)
        )
        self.lora_b = nn.Parameter(
            torch.zeros(n_out, rank, dtype=weight.dtype, device=weight.device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T

    def merged(self) -> nn.Module:
        """The base layer with the update added to its weight."""
        weight = self.base.weight
        assert isinstance(weight, torch.Tensor)
        with torch.no_grad():
            delta = self.lora_b @ self.lora_a
            weight += delta.T if self.transposed else delta
        return self.base


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_adapters(model: nn.Module, rank: int, seed: int = 0) -> list[str]:
    """Put a :class:`LoRA` of ``rank`` beside every target linear layer of ``model`` that is
    still dense (the heads are left alone: a tied head would carry the update into the input
    embedding); returns their names. The ``A`` factors are drawn with ``seed``.
    """
    from laserrmt.models.targets import find_targets

    if rank < 1:
        raise InvalidOptionError(f"--heal-lora-rank {rank}; use a rank of at least 1")
    dense = [
        t.name
        for t in find_targets(model)
        if isinstance(model.get_submodule(t.name), nn.Linear)
        or type(model.get_submodule(t.name)).__name__ == "Conv1D"
    ]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in dense:
            _set_module(model, name, LoRA(model.get_submodule(name), rank))
    return dense


def merge_adapters(model: nn.Module) -> int:
    """Merge every :class:`LoRA` of ``model`` into its base layer; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRA)]
    for name in names:
        _set_module(model, name, model.get_submodule(name).merged())  # type: ignore[operator]
    return len(names)


@contextmanager
def _adapters(model: nn.Module, rank: int | None, seed: int) -> Iterator[list[nn.Parameter]]:
    """The adapters' parameters while healing runs; merged on leaving, also on error."""
    if rank is None:
        yield []
        return
    add_adapters(model, rank, seed)
    try:
        yield [p for m in model.modules() if isinstance(m, LoRA) for p in (m.lora_a, m.lora_b)]
    finally:
        merge_adapters(model)


def check_healing_options(params: str, schedule: str, warmup: float) -> None:
    """Refuse an unknown trainable set or schedule, or a warm-up outside [0, 1)."""
    for option, value, choices in (
        ("heal-params", params, HEAL_PARAMS),
        ("heal-schedule", schedule, SCHEDULES),
    ):
        if value not in choices:
            raise InvalidOptionError(
                f"unknown --{option} {value!r}; choose one of {', '.join(choices)}"
            )
    if not 0.0 <= warmup < 1.0:
        raise InvalidOptionError(f"--heal-warmup {warmup}; give a fraction of the steps in [0, 1)")


def healing_steps(tokens: int, *, window: int, batch_size: int, accumulate: int) -> int:
    """The steps a budget of ``tokens`` input tokens buys: each step reads ``accumulate``
    batches of ``batch_size`` windows of ``window`` tokens; the last step may overshoot."""
    if tokens < 1:
        raise InvalidOptionError(f"--heal-tokens {tokens}; give a positive number of tokens")
    return math.ceil(tokens / (window * batch_size * accumulate))


def healing_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The training batches of healing: ``batch_size`` consecutive windows each (the last may
    be shorter)."""
    if batch_size < 1:
        raise InvalidOptionError(f"--heal-batch-size {batch_size}; use at least 1 window a step")
    if batch_size > windows.shape[0]:
        raise InvalidOptionError(
            f"--heal-batch-size {batch_size} exceeds the {windows.shape[0]} calibration windows; "
            "lower it or give more calibration text"
        )
    return list(windows.split(batch_size))


def healing_teacher(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    top_k: int = HEAL_TOP_K,
    temperature: float = 1.0,
) -> list[TopKLogits]:
    """The dense ``model``'s top-``top_k`` next-token distribution on the healing batches; call
    it before the surgery and pass the result to :func:`heal` as its teacher."""
    return teacher_top_k(
        model,
        healing_batches(windows, batch_size),
        k=top_k,
        temperature=temperature,
        task="causal-lm",
    )


def heal(
    student: nn.Module,
    teacher: nn.Module | Sequence[TopKLogits],
    windows: torch.Tensor,
    *,
    steps: int,
    lr: float = 3e-4,
    batch_size: int = 1,
    accumulate: int = 1,
    params: str = "factors+norms",
    lora_rank: int = LORA_RANK,
    schedule: str = "cosine",
    warmup: float = 0.05,
    alpha: float = 0.0,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    shard: bool = False,
) -> dict[str, Any]:
    """Fine-tune the ``params`` set of ``student`` (:data:`HEAL_PARAMS`) for ``steps`` steps
    of ``accumulate`` × ``batch_size`` windows; returns the training log.

    ``teacher`` is the dense model, or its :func:`healing_teacher` cache made with the same
    ``windows``, ``batch_size`` and ``temperature``. The learning rate follows ``schedule``
    (:data:`SCHEDULES`) with a warm-up over the first ``warmup`` fraction of the steps.
    ``shard`` shards the student with FSDP under ``torchrun`` instead of replicating it
    (refused without a process group).
    """
    check_healing_options(params, schedule, warmup)
    factors = factor_parameters(student)
    if not factors:
        raise InvalidOptionError(
            "healing needs factorized layers to train, and this plan factorized none; "
            "lower the budget's ratio or drop --heal-steps/--heal-tokens"
        )
    norms = norm_parameters(student) if params != "factors" else []
    warmup_steps = round(warmup * steps)
    floor = COSINE_FLOOR if schedule == "cosine" else 1.0
    with _adapters(student, lora_rank if params.endswith("lora") else None, seed) as adapters:
        trainable = factors + norms + adapters
        log = distill(
            student,
            teacher,
            healing_batches(windows, batch_size),
            steps=steps,
            lr=lr,
            alpha=alpha,
            temperature=temperature,
            task="causal-lm",
            trainable=trainable,
            accumulate=accumulate,
            lr_schedule=lambda step: warmup_cosine(step, steps, warmup_steps, floor),
            progress=progress,
            seed=seed,
            shard=shard,
        )
    if isinstance(teacher, nn.Module):
        kind, held, tail = (
            "model",
            sum(p.numel() * p.element_size() for p in teacher.parameters()),
            0.0,
        )
    else:
        cached = list(teacher)
        kind, held = f"top-{cached[0].k} cache", sum(c.nbytes for c in cached)
        # The top-k loss falls short of the full KL by this mass times the KL of the tails.
        tail = float(torch.cat([c.log_tail.exp().flatten() for c in cached]).mean())
    return {
        "steps": steps,
        "lr": lr,
        "schedule": schedule,
        "warmup_steps": warmup_steps,
        "alpha": alpha,
        "temperature": temperature,
        "windows": int(windows.shape[0]),
        "batch_size": batch_size,
        "accumulate": accumulate,
        "params": params,
        "sharded": shard,
        "lora_rank": lora_rank if adapters else None,
        "teacher": kind,
        "teacher_bytes": held,
        "teacher_tail_mass": tail,
        "trainable_parameters": log.trainable_parameters,
        "loss_first": float(log.losses[0]),
        "loss_last": float(log.losses[-1]),
        "losses": log.losses,
        "lrs": log.lrs,
        "running": log.running,
        "tokens": log.tokens,
        "seconds": log.seconds,
    }
