"""The one way statistics run a model: forward passes in eval mode, without autograd, under hooks.

Every statistic that watches activations (calibration Gram matrices, width spectra, attention
entropies) goes through :func:`run_forward`: hooks are attached for the duration of the passes
and removed afterwards, dropout is off, and every module's own ``training`` flag is restored
on the way out, so a statistic never modifies the model it measures.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from laserrmt.errors import InvalidOptionError
from laserrmt.models.placement import model_device

Batch = torch.Tensor | Mapping[str, Any]
"""One calibration batch: ``input_ids`` ``[b, T]`` (any tensor, passed positionally), or a
mapping of keyword arguments for the model's forward (``input_ids``, ``attention_mask``…)."""

Hook = tuple[nn.Module, Literal["input", "output"], Callable[..., Any]]
"""``(module, "input", fn(module, args, kwargs))`` runs before the module's forward;
``(module, "output", fn(module, args, output))`` after it."""

__all__ = [
    "Batch",
    "Hook",
    "attached",
    "batches_fingerprint",
    "call_model",
    "eval_mode",
    "run_forward",
]


def _accepts_use_cache(model: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def call_model(model: nn.Module, batch: Batch, **extra: Any) -> Any:
    """One forward call on a batch (moved to the model's device), with the KV cache off when the
    model has one."""
    device = model_device(model)
    if _accepts_use_cache(model):
        extra.setdefault("use_cache", False)
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device), **extra)
    if isinstance(batch, Mapping):
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return model(**{**extra, **kwargs})
    raise InvalidOptionError(
        f"a calibration batch is a {type(batch).__name__}; pass input_ids tensors or dicts of "
        "model keyword arguments"
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then every module's own flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def run_forward(
    model: nn.Module,
    batches: Iterable[Batch],
    hooks: Sequence[Hook] = (),
    *,
    after_each: Callable[[Batch, Any], None] | None = None,
    extra: Mapping[str, Any] | None = None,
    desc: str = "forward",
    progress: bool = False,
) -> int:
    """Run ``model`` once per batch with ``hooks`` attached; returns the number of batches.

    Eval mode and ``torch.no_grad`` hold for the duration; ``after_each(batch, output)`` sees
    each forward's output; ``extra`` keyword arguments go to every call (e.g.
    ``output_attentions=True``). The hooks are removed and the training flags restored even when
    a hook or the model raises.
    """
    count = 0
    with attached(hooks), eval_mode(model), torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            output = call_model(model, batch, **dict(extra or {}))
            if after_each is not None:
                after_each(batch, output)
            count += 1
    return count


@contextlib.contextmanager
def attached(hooks: Sequence[Hook]) -> Iterator[None]:
    """``hooks`` attached for the duration (for calls :func:`run_forward` does not make, such
    as one streamed block's), removed on the way out, also on error."""
    handles = []
    try:
        for module, where, fn in hooks:
            if where == "input":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def batches_fingerprint(batches: Iterable[Batch]) -> str:
    """A SHA-256 of the batches' tensors (names, dtypes, shapes, bytes): equal batches give equal
    fingerprints, so a saved decision can check it is replayed on the data it was made from."""
    digest = hashlib.sha256()

    def add(name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    for i, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor):
            add(str(i), batch)
        elif isinstance(batch, Mapping):
            for key in sorted(batch):
                value = batch[key]
                if isinstance(value, torch.Tensor):
                    add(f"{i}.{key}", value)
                else:
                    digest.update(f"{i}.{key}={value!r}".encode())
        else:
            raise InvalidOptionError(
                f"a calibration batch is a {type(batch).__name__}; pass input_ids tensors or "
                "dicts of model keyword arguments"
            )
    return digest.hexdigest()


def output_logits(output: Any) -> torch.Tensor:
    """The logits a model returned: the tensor itself, its ``.logits``, or its first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InvalidOptionError(
        f"the model returned {type(output).__name__}, which holds no logits; return a tensor "
        "or an object with a .logits attribute"
    )
