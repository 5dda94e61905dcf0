"""Where a model computes and in which dtype: ``--device`` and ``--dtype``, resolved once.

A model is moved and cast once, before anything measures or cuts it; every later tensor
follows the device and dtype of the weights it meets. float64 is used only where the maths
needs it (Gram sums, eigendecompositions, SVDs), on that same device.
"""

from __future__ import annotations

import torch
from torch import nn

from laserrmt.errors import DeviceError

__all__ = [
    "DEVICES",
    "DTYPES",
    "check_trainable_dtype",
    "float64_device",
    "model_device",
    "place_model",
    "resolve_device",
    "resolve_dtype",
]

#: What ``--device`` accepts (``cuda:N`` selects one GPU).
DEVICES = ("cpu", "cuda", "cuda:N", "auto")

#: What ``--dtype`` accepts: the dtype of the weights and of the block computations.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(spec: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available, else the CPU).

    Raises:
        DeviceError: an unknown name, or a CUDA device this machine does not have.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise DeviceError(f"--device {spec}: write cuda:N with a GPU number N (e.g. cuda:0)")
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {spec}: this machine has no CUDA GPU that torch can use; "
                "use --device cpu (or auto)"
            )
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise DeviceError(
                f"--device {spec}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}"
            )
        return torch.device(text)
    raise DeviceError(f"unknown --device {spec!r}; choose one of {', '.join(DEVICES)}")


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` (or that torch dtype).

    Raises:
        DeviceError: any other dtype.
    """
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    dtype = DTYPES.get(str(name).strip().lower())
    if dtype is None:
        raise DeviceError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def check_trainable_dtype(dtype: str | torch.dtype | None, what: str) -> None:
    """Refuse training (healing, distillation) in float16: without loss scaling AdamW's updates
    underflow and the weights turn NaN within a step or two (seen on a tiny Llama).

    Raises:
        DeviceError: ``dtype`` is float16.
    """
    if dtype is not None and resolve_dtype(dtype) == torch.float16:
        raise DeviceError(
            f"{what} trains the model, and float16 training needs loss scaling that laserrmt "
            "does not do; use --dtype bfloat16 or float32"
        )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without any."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def float64_device(device: torch.device) -> torch.device:
    """Where float64 maths on tensors of ``device`` runs: there, except on MPS, which has no
    float64 (the one documented host round trip: the matrix goes to the CPU and back)."""
    return torch.device("cpu") if device.type == "mps" else device


def place_model(
    model: nn.Module,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> nn.Module:
    """Move and cast ``model`` in place, once (``None`` leaves that part as it is); returns it.

    Only floating-point tensors are cast (``nn.Module.to``): int8 weights stay int8.

    Raises:
        DeviceError: as :func:`resolve_device` and :func:`resolve_dtype`.
    """
    target = None if device is None else resolve_device(device)
    cast = None if dtype is None else resolve_dtype(dtype)
    if target is not None or cast is not None:
        model.to(device=target, dtype=cast)
    return model
