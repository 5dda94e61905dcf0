"""Spectral monitoring while a model trains: a plain-PyTorch hook and a ``Trainer`` callback.

Every ``every`` steps :meth:`SpectralMonitor.step` computes the singular values of the target
matrices on the model's own device (``torch.linalg.svdvals``: no vectors, no copy of a weight to
the host), reads the RMT summary of each spectrum on the host
(:func:`laserrmt.monitor.summary.weight_summary`) and appends one JSON line per matrix to
``RUN_DIR/monitor.jsonl``, flushed and fsynced after every call, so that a run killed at any
moment leaves every completed call on disk (at most the last line is cut short, and
:func:`laserrmt.monitor.run.read_run` drops it). With ``budget`` set, each call takes the next
``budget`` matrices in turn, so a large model is covered across several calls at a bounded
cost per call.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from transformers import TrainerCallback

from laserrmt.errors import InvalidOptionError, OutputExistsError
from laserrmt.models.targets import Target, find_targets, select_targets, weight_matrix
from laserrmt.monitor.summary import activation_summary, weight_summary
from laserrmt.stats.forward import Batch, Hook, batches_fingerprint, run_forward

RECORDS_FILE = "monitor.jsonl"
PLAN_FILE = "advice_plan.json"
#: Version of the JSON-lines layout.
FORMAT_VERSION = 1
#: Default interval in optimizer steps.
DEFAULT_EVERY = 100


class SpectralMonitor:
    """Record the weight (and optionally activation) spectra of a model every ``every`` steps.

    Usage::

        monitor = SpectralMonitor("runs/x", every=50)
        for step, batch in enumerate(loader):
            ...  # forward, backward, optimizer step
            monitor.step(model, step)
        monitor.close()  # writes the end record and runs/x/advice_plan.json

    Args:
        run_dir: folder for ``monitor.jsonl`` (created); an existing record file is refused
            unless ``overwrite``.
        every: record at steps divisible by ``every`` (step 0 included).
        budget: most matrices per call; ``None`` records all targets every time.
        targets: patterns as for ``laserrmt analyze --targets`` (``None``: all targets).
        include_heads: also watch output heads and embeddings-tied layers.
        alpha: level of the Tracy–Widom test that counts significant spikes.
        probe: fixed batches whose activation spectra (each target's output) are recorded too.
        keep_spectra: store the singular values, needed for spectrum plots in the report.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        every: int = DEFAULT_EVERY,
        budget: int | None = None,
        targets: Sequence[str] | None = None,
        include_heads: bool = False,
        alpha: float = 0.05,
        probe: Sequence[Batch] | None = None,
        keep_spectra: bool = True,
        overwrite: bool = False,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidOptionError(f"every must be a whole number of steps >= 1; got {every!r}")
        if budget is not None and (isinstance(budget, bool) or budget < 1):
            raise InvalidOptionError(f"budget must be a count >= 1 or None; got {budget!r}")
        if not 0.0 < float(alpha) < 1.0:
            raise InvalidOptionError(f"alpha is a significance level in (0, 1); got {alpha!r}")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RECORDS_FILE
        if self.path.exists() and not overwrite:
            raise OutputExistsError(
                f"{self.path} exists already; choose another run folder or pass overwrite=True"
            )
        self.every = every
        self.budget = budget
        self.patterns = list(targets) if targets else None
        self.include_heads = include_heads
        self.alpha = float(alpha)
        self.probe = list(probe) if probe is not None else None
        self.keep_spectra = keep_spectra
        self.overwrite = overwrite
        self._targets: list[Target] | None = None
        self._cursor = 0
        self._last_step: int | None = None
        self._handle: IO[str] | None = None

    # -- writing ---------------------------------------------------------------------------

    def _open(self, model: nn.Module) -> list[Target]:
        targets = select_targets(
            find_targets(model, include_heads=self.include_heads), self.patterns
        )
        if not targets:
            raise InvalidOptionError(
                f"{type(model).__name__} has no Linear/Conv weight matrices to monitor"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("w", encoding="utf-8")
        param = next(model.parameters())
        header = {
            "type": "header",
            "format_version": FORMAT_VERSION,
            "started": _now(),
            "model": type(model).__name__,
            "device": str(param.device),
            "dtype": str(param.dtype).removeprefix("torch."),
            "targets": [t.to_dict() for t in targets],
            "settings": {
                "every": self.every,
                "budget": self.budget,
                "targets": self.patterns,
                "include_heads": self.include_heads,
                "alpha": self.alpha,
                "keep_spectra": self.keep_spectra,
                "probe_batches": None if self.probe is None else len(self.probe),
                "probe_sha256": None if self.probe is None else batches_fingerprint(self.probe),
            },
        }
        self._write([header])
        return targets

    def _write(self, records: list[dict[str, Any]]) -> None:
        assert self._handle is not None
        self._handle.write("".join(json.dumps(_jsonable(r)) + "\n" for r in records))
        # On disk before training goes on: a kill after this call loses none of its records.
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def step(self, model: nn.Module, step: int) -> int:
        """Record the due matrices if ``step`` is a multiple of ``every``; returns how many."""
        if step % self.every != 0 or step == self._last_step:
            return 0
        if self._handle is None and self._targets is not None:
            raise InvalidOptionError("this monitor was closed; create a new one for a new run")
        if self._targets is None:
            self._targets = self._open(model)
        self._last_step = step
        chosen = self._next_targets()
        records = [self._weight_record(model, t, step) for t in chosen]
        if self.probe is not None:
            records += self._activation_records(model, chosen, step)
        self._write(records)
        return len(chosen)

    def _next_targets(self) -> list[Target]:
        assert self._targets is not None
        if self.budget is None or self.budget >= len(self._targets):
            return list(self._targets)
        start = self._cursor
        self._cursor = (start + self.budget) % len(self._targets)
        return [self._targets[(start + i) % len(self._targets)] for i in range(self.budget)]

    def _weight_record(self, model: nn.Module, target: Target, step: int) -> dict[str, Any]:
        base = {"type": "weight", "step": step, "module": target.name}
        weight = weight_matrix(model.get_submodule(target.name))
        # float32 at least: LAPACK/cuSOLVER have no half-precision SVD.
        compute = weight if weight.dtype == torch.float64 else weight.float()
        with torch.no_grad():
            if not bool(torch.isfinite(compute).all()):
                return base | {"shape": list(target.shape), "status": "non_finite"}
            s = torch.linalg.svdvals(compute)
        values = s.to("cpu", torch.float64).numpy()
        eps = float(torch.finfo(weight.dtype).eps)
        return base | weight_summary(
            values, target.shape, alpha=self.alpha, eps=eps, keep_spectrum=self.keep_spectra
        )

    def _activation_records(
        self, model: nn.Module, chosen: list[Target], step: int
    ) -> list[dict[str, Any]]:
        """Each chosen target's output covariance over the probe batches, streamed on device."""
        sums: dict[str, list[Any]] = {}

        def hook_for(name: str) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                out = output[0] if isinstance(output, tuple) else output
                if isinstance(module, nn.Conv1d | nn.Conv2d):
                    # A convolution's units are its channels; every other axis holds samples.
                    out = out.movedim(1, -1)
                x = out.reshape(-1, out.shape[-1]).double()
                acc = sums.setdefault(name, [0, 0.0, 0.0])
                acc[0] += x.shape[0]
                acc[1] = acc[1] + x.sum(0)
                acc[2] = acc[2] + x.T @ x

            return hook

        hooks: list[Hook] = [
            (model.get_submodule(t.name), "output", hook_for(t.name)) for t in chosen
        ]
        assert self.probe is not None
        run_forward(model, self.probe, hooks)
        records = []
        for target in chosen:
            rows, total, gram = sums[target.name]
            mean = total / rows
            covariance = (gram / rows - torch.outer(mean, mean)).cpu().numpy()
            records.append(
                {"type": "activation", "step": step, "module": target.name}
                | activation_summary(covariance, rows)
            )
        return records

    def close(self) -> Path | None:
        """Write the end record and the compression advice; returns the plan's path (``None``
        when nothing was recorded). Idempotent."""
        if self._handle is None:
            return None
        from laserrmt.monitor.run import advice_plan, read_run

        self._write([{"type": "end", "step": self._last_step, "finished": _now()}])
        self._handle.close()
        self._handle = None
        return advice_plan(read_run(self.run_dir)).save(self.run_dir / PLAN_FILE)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no inf or nan: write them as strings that ``float()`` reads back."""
    return {
        k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }


class SpectralMonitorCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that runs a :class:`SpectralMonitor`.

    It records the initial spectra at ``on_train_begin``, then every ``every``
    optimizer steps, on the main process only, and closes the monitor (end record, advice plan)
    at ``on_train_end``. Takes the same arguments as :class:`SpectralMonitor`.
    """

    def __init__(self, run_dir: str | os.PathLike[str], **options: Any) -> None:
        self.monitor = SpectralMonitor(run_dir, **options)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # global_step is 0 for a new run and the checkpoint's step for a resumed one.
        self._step(state, kwargs.get("model"), state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step(state, kwargs.get("model"), state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.monitor.close()

    def _step(self, state: Any, model: nn.Module | None, step: int) -> None:
        if model is not None and state.is_world_process_zero:
            self.monitor.step(model, step)


__all__ = [
    "DEFAULT_EVERY",
    "FORMAT_VERSION",
    "PLAN_FILE",
    "RECORDS_FILE",
    "SpectralMonitor",
    "SpectralMonitorCallback",
]
