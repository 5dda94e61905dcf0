"""Healing: a short fine-tune of the low-rank factors towards the uncompressed model.

Only the factors of the compressed layers train; everything else stays frozen. The loss is the
KL divergence from the dense model's next-token distribution (the distillation loss of
:mod:`laserrmt.distill`, one implementation for healing and RMT-KD), on calibration text only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from laserrmt.distill import distill
from laserrmt.errors import InvalidOptionError
from laserrmt.surgery.lowrank import LowRankConv1d, LowRankConv2d, LowRankLinear

_FACTORIZED = (LowRankLinear, LowRankConv1d, LowRankConv2d)


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every factorized layer (their factors and biases)."""
    return [p for m in model.modules() if isinstance(m, _FACTORIZED) for p in m.parameters()]


def heal(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    *,
    steps: int,
    lr: float,
    alpha: float = 0.0,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the factors of ``student`` for ``steps`` steps; returns the training log."""
    trainable = factor_parameters(student)
    if not trainable:
        raise InvalidOptionError(
            "--heal-steps needs factorized layers to train, and this plan factorized none; "
            "lower the budget's ratio or drop --heal-steps"
        )
    log = distill(
        student,
        teacher,
        list(windows.split(1)),
        steps=steps,
        lr=lr,
        alpha=alpha,
        temperature=temperature,
        task="causal-lm",
        trainable=trainable,
        progress=progress,
        seed=seed,
    )
    return {
        "steps": steps,
        "lr": lr,
        "alpha": alpha,
        "temperature": temperature,
        "windows": int(windows.shape[0]),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "loss_first": float(log.losses[0]),
        "loss_last": float(log.losses[-1]),
    }
