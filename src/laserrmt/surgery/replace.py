"""Swapping one submodule of a model for another: the one helper every surgery uses."""

from __future__ import annotations

from torch import nn

__all__ = ["set_submodule"]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``, behaving as the layer it replaces.

    The replacement takes the old layer's mode (a BatchNorm in eval mode must stay there) and,
    when every parameter of the old layer was frozen, is frozen too.
    """
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, nn.Module):
        module.train(old.training)
        params = list(old.parameters())
        if params and not any(p.requires_grad for p in params):
            module.requires_grad_(False)
    setattr(parent, attr, module)
