"""Singular-value spectra of weight matrices, computed once per matrix.

Statistics never modify the model: the weights are copied to float64 before decomposition, on
the model's device (the CPU for MPS, which has no float64). Only the singular values come back
to the host, as numpy arrays for the RMT rules; the vectors stay where they were computed. The
model may be a meta-device skeleton whose weights stream from a checkpoint
(:class:`~laserrmt.models.streaming.BlockStream`): each target is then read, decomposed and freed
in turn, so only one matrix is in memory at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from laserrmt.models.placement import float64_device
from laserrmt.models.targets import Target, weight_matrix

if TYPE_CHECKING:
    from laserrmt.models.streaming import BlockStream


@dataclass
class WeightSpectrum:
    """The spectrum of one target matrix (m × n = out × in).

    ``singular_values`` are float64 and sorted descending (numpy, on the host). ``u`` and ``vh``
    hold the singular vectors (float64 torch tensors, on the device of the decomposition) when
    they were asked for, so that surgery can reuse the one decomposition made during analysis.
    """

    target: Target
    singular_values: np.ndarray
    u: torch.Tensor | None = field(default=None, repr=False)
    vh: torch.Tensor | None = field(default=None, repr=False)

    @property
    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.u is None or self.vh is None:
            raise ValueError(f"{self.target.name}: spectrum was computed without vectors")
        s = torch.as_tensor(self.singular_values, dtype=torch.float64, device=self.u.device)
        return self.u, s, self.vh


@dataclass
class SpectrumFailure:
    """A target whose spectrum could not be computed, and why (reported, never hidden)."""

    module: str
    reason: str


def weight_spectra(
    model: nn.Module,
    targets: Sequence[Target],
    *,
    vectors: bool = False,
    progress: bool = True,
    stream: BlockStream | None = None,
) -> tuple[dict[str, WeightSpectrum], list[SpectrumFailure]]:
    """Decompose every target matrix once, in float64.

    With ``stream``, ``model`` is its skeleton and each matrix is read from the checkpoint just
    before its decomposition and freed right after.

    Matrices holding NaN or Inf are not decomposed: they are returned as failures naming the
    module so that the caller can report them and carry on with the others.
    """
    spectra: dict[str, WeightSpectrum] = {}
    failures: list[SpectrumFailure] = []
    bar = tqdm(targets, desc="singular values", unit="matrix", disable=not progress)
    for target in bar:
        with torch.no_grad(), stream.materialized([target.name]) if stream else nullcontext():
            w = weight_matrix(model.get_submodule(target.name)).detach()
            w = w.to(float64_device(w.device), torch.float64)
        finite = torch.isfinite(w)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            failures.append(
                SpectrumFailure(target.name, f"{bad} of {w.numel()} weights are NaN or Inf")
            )
            continue
        try:
            if vectors:
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
            else:
                s = torch.linalg.svdvals(w)
                u = vh = None
        except RuntimeError as exc:  # LAPACK did not converge
            failures.append(SpectrumFailure(target.name, f"SVD failed: {exc}"))
            continue
        spectra[target.name] = WeightSpectrum(target, s.cpu().numpy(), u, vh)
    return spectra, failures
