"""What a selection loop measures after each change, on calibration windows only.

The original laserRMT decided keep/revert on the test split it then reported; here the windows
always come from the calibration split, so the evaluation split stays untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.evaluate import perplexity

OBJECTIVES = ("perplexity", "kl")


@dataclass
class Objective:
    """A number to keep low, and the rule that says whether a change is acceptable.

    ``tolerance`` means: for ``perplexity``, the relative increase over the original model's
    value that is accepted (0.02 = +2 %); for ``kl``, the mean KL divergence to the original
    model's next-token distribution, in nats per token. ``strict`` accepts only a change that
    improves on the best value so far (the original laserRMT rule).
    """

    name: str
    windows: torch.Tensor
    tolerance: float
    strict: bool = False
    reference: float = float("nan")
    best: float = float("nan")
    _teacher: list[torch.Tensor] = field(default_factory=list, repr=False)

    def calibrate(self, model: nn.Module) -> float:
        """Measure the unchanged model; must be called before the first change."""
        if self.name == "kl":
            # float32: a bfloat16 copy of the teacher puts the unchanged model itself at a KL
            # of ~5e-5 nats/token, a bias of the order of a tight tolerance.
            self._teacher = [torch.log_softmax(_logits(model, w), -1) for w in self.windows]
        self.reference = self.best = self(model)
        return self.reference

    def __call__(self, model: nn.Module) -> float:
        if self.name == "perplexity":
            value = perplexity(model, self.windows, progress=False).perplexity
        else:
            total, tokens = 0.0, 0
            for window, teacher in zip(self.windows, self._teacher, strict=True):
                student = torch.log_softmax(_logits(model, window), -1)
                kl = F.kl_div(student, teacher, log_target=True, reduction="sum")
                total += float(kl)
                tokens += student.shape[0]
            value = total / tokens
        if not math.isfinite(value):
            raise NumericalError(f"the {self.name} objective became {value} after a change")
        return value

    def accepts(self, value: float) -> bool:
        if self.strict:
            return value < self.best
        if self.name == "perplexity":
            return value <= self.reference * (1 + self.tolerance)
        return value <= self.tolerance

    def record(self, value: float) -> None:
        """Note an accepted change."""
        self.best = min(self.best, value)


def make_objective(
    name: str, windows: torch.Tensor, tolerance: float, *, strict: bool = False
) -> Objective:
    if name not in OBJECTIVES:
        raise InvalidOptionError(
            f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}"
        )
    if tolerance < 0:
        raise InvalidOptionError(f"--tolerance must be ≥ 0, got {tolerance}")
    return Objective(name, windows, tolerance, strict)


@torch.inference_mode()
def _logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Next-token logits of one window, float32, [T, V]."""
    return model(window.unsqueeze(0)).logits[0].float()
