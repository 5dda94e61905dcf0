"""Token windows carried through a streamed model one block at a time.

:class:`BlockRunner` runs windows through the blocks of a :class:`~laserrmt.models.streaming.
BlockStream` without knowing the architecture: it records what the model passes each block
(hidden states, mask, position embeddings…) by running the model's own forward with stand-ins
in place of the blocks (only the parts outside the blocks are real then), and afterwards calls
any block, real or compressed, with those arguments and the hidden states it is given. The
same stand-ins compute the model's output from the last block's hidden states (final norm,
head, the model's own loss), so perplexity and the Fisher information need no head code of
ours either. This is the carrying scheme of GPTQ and of llm-compressor's sequential pipeline.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from laserrmt.errors import ModelLoadError
from laserrmt.models.streaming import BlockStream
from laserrmt.stats.calibration import (
    _first_tensor,
    _hidden_of,
    _rest,
    _same_objects,
    _with_hidden,
    find_blocks,
)

Call = tuple[tuple[Any, ...], dict[str, Any]]


class _Stop(Exception):
    """Raised by block 0's stand-in once the arguments of a uniform model are recorded."""


class _StandIn(nn.Module):
    """Takes a block's place in the forward: records its arguments and returns either its
    hidden input unchanged or the hidden states it was given, in the block's output format."""

    def __init__(self, real: nn.Module, index: int, runner: BlockRunner) -> None:
        super().__init__()
        # Not a submodule: attribute reads (e.g. ``attention_type``) fall through to it.
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_runner", runner)
        self.index = index

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._runner._stand_in_call(self.index, args, kwargs)


def first_tensor(output: Any) -> torch.Tensor:
    tensor = _first_tensor(output)
    if tensor is None:
        raise ModelLoadError(f"a block returned {type(output).__name__}, not its hidden states")
    return tensor


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class BlockRunner:
    """The calls of every block of ``stream``'s model for each of ``windows`` ([n, T] ids).

    ``hidden[w]`` is block 0's input for window ``w`` after construction; :meth:`call` runs a
    block on given hidden states with the arguments the model gave that block for that window.
    """

    def __init__(self, stream: BlockStream, windows: torch.Tensor) -> None:
        self.stream = stream
        self.model = stream.model
        self.blocks_name, self.blocks = find_blocks(self.model)
        if len(self.blocks) != len(stream.blocks):
            raise ModelLoadError(
                f"{type(self.model).__name__}: its repeated blocks are not one list; "
                "it cannot be streamed block by block"
            )
        self.windows = [w.to(stream.device) for w in windows.split(1)]
        self._extra = {"use_cache": False} if _accepts(self.model, "use_cache") else {}
        self._tuple_output = False
        self._recording: list[Call | None] = []
        self._stop_at: int | None = None
        self._final: torch.Tensor | None = None
        self.hidden: list[torch.Tensor] = []
        # calls[b][w]; one row (block 0's) when every block gets the same arguments.
        self.calls: list[list[Call]] = []
        self.uniform = True
        self._capture()

    # -- capture -------------------------------------------------------------------------

    def _stand_in_call(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._recording[index] = (args, kwargs)
        if self._stop_at == index:
            raise _Stop
        hidden = _hidden_of(args, kwargs)
        if index == len(self.blocks) - 1 and self._final is not None:
            hidden = self._final
        return (hidden,) if self._tuple_output else hidden

    @contextmanager
    def stand_ins(self) -> Iterator[None]:
        """Every block replaced by its stand-in (the outer parts must be materialised)."""
        real = list(self.blocks)
        for i, block in enumerate(real):
            self.blocks[i] = _StandIn(block, i, self)
        try:
            yield
        finally:
            for i, block in enumerate(real):
                self.blocks[i] = block

    def _forward(self, window: int, stop_at: int | None = None, **extra: Any) -> Any:
        self._recording = [None] * len(self.blocks)
        self._stop_at = stop_at
        try:
            return self.model(self.windows[window], **self._extra, **extra)
        except _Stop:
            return None
        finally:
            self._stop_at = None

    def _capture(self) -> None:
        with torch.no_grad(), self.stream.outer(), self.stand_ins():
            self._forward(0, stop_at=0)
            first = self._recording[0]
            if first is None or _hidden_of(*first) is None:
                raise ModelLoadError(
                    f"{type(self.model).__name__}'s first block gets no hidden-state tensor; "
                    "it cannot be streamed block by block"
                )
            # The output format (tensor or tuple) of the blocks, from one real call.
            with self.stream.block(0) as block:
                self._tuple_output = isinstance(block(*first[0], **first[1]), tuple | list)
            # Stopped at the last block: the head's logits are not needed here.
            self._forward(0, stop_at=len(self.blocks) - 1)
            calls = [c for c in self._recording if c is not None]
            if len(calls) != len(self.blocks):
                raise ModelLoadError(
                    f"{type(self.model).__name__} does not call each block once per forward; "
                    "it cannot be streamed block by block"
                )
            first_rest = _rest(*calls[0])
            self.uniform = all(_same_objects(_rest(*c), first_rest) for c in calls[1:])
            per_block: list[list[Call]] = [[c] for c in calls]
            for window in range(1, len(self.windows)):
                self._forward(window, stop_at=0 if self.uniform else None)
                for b, call in enumerate(self._recording[: 1 if self.uniform else None]):
                    per_block[b].append(call)  # type: ignore[arg-type]
        self.calls = per_block[:1] if self.uniform else per_block
        self.hidden = [_hidden_of(*call) for call in self.calls[0]]  # type: ignore[misc]

    # -- running -------------------------------------------------------------------------

    def call(self, index: int, block: nn.Module, window: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``index`` (``block``: the real or compressed module) on ``hidden`` of ``window``."""
        args, kwargs = _with_hidden(*self.calls[0 if self.uniform else index][window], hidden)
        return first_tensor(block(*args, **kwargs))

    def output(self, window: int, final: torch.Tensor, **extra: Any) -> Any:
        """The model's output (logits, loss with ``labels=``…) for ``window`` when the last
        block returns ``final``; the outer parts must be materialised (``stream.outer()``)."""
        self._final = final
        try:
            with self.stand_ins():
                return self.model(self.windows[window], **self._extra, **extra)
        finally:
            self._final = None

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_name}.{index}"
