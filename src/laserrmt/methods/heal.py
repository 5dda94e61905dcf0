"""Healing: a short fine-tune of the low-rank factors towards the uncompressed model.

Only the factors of the compressed layers train; everything else stays frozen. The loss is the
KL divergence from the dense model's next-token distribution (the distillation loss of
:mod:`laserrmt.distill`, one implementation for healing and RMT-KD), on calibration text only.

The dense model's distribution is computed once per batch *before* the surgery and kept as its
top-k classes plus a tail bucket (:func:`healing_teacher`), so healing holds no second copy of
the model. Under ``torchrun`` the steps run data-parallel (:func:`laserrmt.distill.distill`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from laserrmt.distill import TopKLogits, distill, teacher_top_k
from laserrmt.errors import InvalidOptionError
from laserrmt.surgery.lowrank import LowRankConv1d, LowRankConv2d, LowRankLinear
from laserrmt.surgery.sparse import LowRankSparseLinear

_FACTORIZED = (LowRankLinear, LowRankConv1d, LowRankConv2d, LowRankSparseLinear)


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every factorized layer (their factors and biases)."""
    return [p for m in model.modules() if isinstance(m, _FACTORIZED) for p in m.parameters()]


def healing_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The training batches of healing: ``batch_size`` consecutive windows each (the last may
    be shorter)."""
    if batch_size < 1:
        raise InvalidOptionError(f"--heal-batch-size {batch_size}; use at least 1 window a step")
    if batch_size > windows.shape[0]:
        raise InvalidOptionError(
            f"--heal-batch-size {batch_size} exceeds the {windows.shape[0]} calibration windows; "
            "lower it or raise --calibration-windows"
        )
    return list(windows.split(batch_size))


def healing_teacher(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    top_k: int = 64,
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
    lr: float,
    batch_size: int = 1,
    alpha: float = 0.0,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the factors of ``student`` for ``steps`` steps of ``batch_size`` windows;
    returns the training log.

    ``teacher`` is the dense model, or its :func:`healing_teacher` cache made with the same
    ``windows``, ``batch_size`` and ``temperature``.
    """
    trainable = factor_parameters(student)
    if not trainable:
        raise InvalidOptionError(
            "--heal-steps needs factorized layers to train, and this plan factorized none; "
            "lower the budget's ratio or drop --heal-steps"
        )
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
        progress=progress,
        seed=seed,
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
        "alpha": alpha,
        "temperature": temperature,
        "windows": int(windows.shape[0]),
        "batch_size": batch_size,
        "teacher": kind,
        "teacher_bytes": held,
        "teacher_tail_mass": tail,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "loss_first": float(log.losses[0]),
        "loss_last": float(log.losses[-1]),
    }
