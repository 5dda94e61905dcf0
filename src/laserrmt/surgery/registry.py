"""The registry of compressed module types, so that saving and loading stay generic.

A compressed layer (a low-rank factorization today; an int8 linear or a width-reduced layer
later) is an ``nn.Module`` that subclasses :class:`CompressedModule` and is decorated with
:func:`register_module`. Saving records, for each such module, its class name and
:meth:`CompressedModule.laserrmt_config`; loading rebuilds the architecture, asks the registered
class for an empty shell with :meth:`CompressedModule.from_laserrmt_config`, swaps it in, and
then loads the weights from the safetensors file like any other parameters.

To add a module type::

    @register_module
    class Int8Linear(CompressedModule):
        def laserrmt_config(self) -> dict[str, Any]:
            return {"in_features": ..., "out_features": ..., "dtype": "float32"}

        @classmethod
        def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> "Int8Linear":
            return cls(**cfg)  # parameters of the right shape and dtype; values come later

The config must be JSON-serializable and hold everything that fixes the shapes and dtypes of
the module's parameters and buffers, since those are what the saved state dict is loaded into.

A module of laserrmt that defines registered classes must be listed in :data:`BUILTIN_MODULES`:
the registry imports those before every lookup, so that a folder loads in a fresh process
whatever the caller imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from typing import Any, TypeVar

import torch
from torch import nn

from laserrmt.errors import ModelLoadError

_REGISTRY: dict[str, type[CompressedModule]] = {}

#: The modules of laserrmt that register compressed module types.
BUILTIN_MODULES = (
    "laserrmt.surgery.lowbit",
    "laserrmt.surgery.lowrank",
    "laserrmt.surgery.quantize",
    "laserrmt.surgery.sparse",
    "laserrmt.surgery.width",
)

C = TypeVar("C", bound="type[CompressedModule]")


class CompressedModule(nn.Module):
    """Base class of every module that surgery puts into a model and that must be reloadable."""

    def laserrmt_config(self) -> dict[str, Any]:
        """JSON-serializable constructor settings that fix every parameter's shape and dtype."""
        raise NotImplementedError

    @classmethod
    def from_laserrmt_config(cls, cfg: Mapping[str, Any]) -> CompressedModule:
        """An empty shell (uninitialised values) with the parameters that ``cfg`` describes."""
        raise NotImplementedError


def register_module(cls: C) -> C:
    """Class decorator: make a :class:`CompressedModule` subclass loadable by its class name."""
    if not (isinstance(cls, type) and issubclass(cls, CompressedModule)):
        raise TypeError(f"{cls!r} is not a CompressedModule subclass")
    name = cls.__name__
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise TypeError(f"a compressed module type named {name} is registered already")
    _REGISTRY[name] = cls
    return cls


def _import_builtin_modules() -> None:
    # Imported at lookup time, not at the top: these modules import this one.
    for name in BUILTIN_MODULES:
        import_module(name)


def registered_modules() -> dict[str, type[CompressedModule]]:
    """A copy of the registry, laserrmt's own types included: class name → class."""
    _import_builtin_modules()
    return dict(_REGISTRY)


def module_class(type_name: str) -> type[CompressedModule]:
    """The registered class called ``type_name``.

    Raises:
        ModelLoadError: no such type (the file was written by a newer or extended laserrmt).
    """
    registry = registered_modules()
    try:
        return registry[type_name]
    except KeyError:
        known = ", ".join(sorted(registry)) or "none"
        raise ModelLoadError(
            f"unknown compressed module type {type_name!r} (known: {known}); "
            "upgrade laserrmt or import the extension that defines it"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``, for configs."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` → ``torch.float32``; anything that is not a torch dtype is refused."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelLoadError(f"unknown dtype {name!r} in laserrmt.json; the file is damaged")
    return dtype
