"""Calibration statistics: streamed Gram matrices, activation covariances and Fisher diagonals.

Statistics never modify the model. Hooks are attached for the duration of a pass and removed
afterwards, the model runs under ``torch.no_grad`` in eval mode (every module's ``training``
flag is restored on the way out), and the activations themselves are never kept: every forward
call is folded at once into float64 sums.

For a module seen with feature rows ``x_t`` (one per token, or per spatial position of a
convolution) the statistics are the Gram matrix ``G = Σ_t x_tᵀ x_t`` (float64, n × n), the
number of rows and their mean. ``G`` is what activation-aware factorization needs
(SVD-LLM, Wang et al., ICLR 2025: ``‖W X − W′X‖_F`` is governed by ``XᵀX``); ``G / n`` is the
activation second moment ``C = X Xᵀ / n``; :meth:`ActivationStatistics.covariance` centres it.
(RMT-KD's width spectra have their own statistics, :mod:`laserrmt.stats.activations`.)

The passes over the whole model go through :func:`laserrmt.stats.forward.run_forward`.

Models with a list of repeated blocks (:func:`find_blocks`) are calibrated **block by block**,
as GPTQ and llm-compressor do: the inputs of every block are captured once, then each block in
turn runs on every calibration window with hooks on that block's modules only, so at most one
block's accumulators are alive at a time (plus the hidden states of all windows). Modules
outside the blocks, and models without blocks (a CNN), are hooked during whole-model passes.
Both routes give the same numbers; only memory differs.

Modules fed the *same tensor* in one forward call (q/k/v projections, gate/up projections)
share one accumulator: their Gram is computed once and their statistics hold the very same
tensor objects (treat them as read-only).

The diagonal Fisher information of a weight needs gradients, so it is computed by a separate
whole-model pass (:func:`collect_fisher_diagonal`) with one backward per calibration batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from laserrmt.errors import InvalidOptionError, NumericalError, TargetSelectionError
from laserrmt.stats.forward import Batch, call_model, eval_mode, output_logits, run_forward

Where = Literal["input", "output"]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]

__all__ = [
    "ActivationStatistics",
    "Batch",
    "BlocksNotFoundError",
    "InputStatistics",
    "LossFn",
    "Where",
    "causal_lm_loss",
    "collect_activation_statistics",
    "collect_fisher_diagonal",
    "collect_input_statistics",
    "find_blocks",
    "iter_activation_statistics",
]

# Feature rows are converted to float64 in chunks of this many rows, so that unfolded
# convolution patches never exist in float64 all at once.
_ROW_CHUNK = 8192


class BlocksNotFoundError(TargetSelectionError):
    """The model has no list of repeated blocks, so it cannot be calibrated block by block."""


@dataclass
class ActivationStatistics:
    """Streamed second-order statistics of one module's input (or output) activations.

    ``gram`` is ``Σ xᵀx`` over all ``n_samples`` feature rows (tokens, or spatial positions of
    a convolution), float64 ``n × n``; ``mean`` is the mean row, float64 ``n``. For an input of
    ``nn.Linear`` / HF ``Conv1D`` the features are the ``in_features``; for an input of
    ``nn.Conv1d`` / ``nn.Conv2d`` they are the unfolded patches (``in · kh · kw``, in the order
    of ``weight.reshape(out, -1)``); for outputs of convolutions and 4-D activations they are
    the channels; otherwise the last dimension. ``fisher`` is the diagonal Fisher information of
    the weight as an ``m × n`` (out × in) matrix, when it was asked for.
    """

    module: str
    gram: torch.Tensor = field(repr=False)
    n_samples: int
    mean: torch.Tensor = field(repr=False)
    fisher: torch.Tensor | None = field(default=None, repr=False)
    where: Where = "input"

    @property
    def n_features(self) -> int:
        return int(self.gram.shape[0])

    def second_moment(self) -> torch.Tensor:
        """``G / n``: the uncentred activation matrix ``C = X Xᵀ / n`` (float64)."""
        return self.gram / self.n_samples

    def covariance(self) -> torch.Tensor:
        """The centred (biased, divided by ``n_samples``) covariance of the features, float64."""
        return self.gram / self.n_samples - torch.outer(self.mean, self.mean)


InputStatistics = ActivationStatistics
"""The statistics of a module's input; the same record as :class:`ActivationStatistics`."""


# --------------------------------------------------------------------------------------------
# Blocks


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the ``nn.ModuleList`` of same-class modules holding most weights.

    This is ``model.layers`` for Llama, Gemma and Qwen2, ``transformer.h`` for GPT-2 and
    ``encoder.layer`` for BERT (with the prefix of the wrapper, e.g. ``model.layers`` in a
    ``LlamaForCausalLM``). Ranking by parameter count rather than length keeps a per-layer list
    of experts or heads from winning over the list of layers that contains it.

    Raises:
        BlocksNotFoundError: no ``nn.ModuleList`` of at least two modules of one class.
    """
    best: tuple[int, int] | None = None
    found: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        classes = {type(child) for child in module}
        n_params = sum(p.numel() for p in module.parameters())
        if len(classes) != 1 or n_params == 0:
            continue
        key = (n_params, len(module))
        if best is None or key > best:
            best, found = key, (name, module)
    if found is None:
        raise BlocksNotFoundError(
            f"{type(model).__name__} has no list of repeated blocks; calibrate it with "
            "blockwise=False (a whole-model pass)"
        )
    return found


# --------------------------------------------------------------------------------------------
# Feature rows


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv1d | nn.Conv2d)


def _check_supported(name: str, module: nn.Module, where: Where) -> None:
    if isinstance(module, nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d):
        raise TargetSelectionError(
            f"{name}: {type(module).__name__} is not supported for calibration; "
            "select nn.Linear, Conv1D, nn.Conv1d or nn.Conv2d modules"
        )
    if where == "input" and _is_conv(module) and module.groups != 1:
        raise TargetSelectionError(
            f"{name}: grouped convolutions (groups={module.groups}) have no single input "
            "Gram matrix; leave this module out of the targets"
        )


def _feature_kind(module: nn.Module, x: torch.Tensor, where: Where) -> tuple[Any, ...]:
    """How feature rows are made from ``x`` for ``module``: equal kinds give equal rows."""
    if where == "input" and _is_conv(module):
        conv: nn.Conv1d | nn.Conv2d = module  # type: ignore[assignment]
        return (
            "patches",
            conv.kernel_size,
            conv.stride,
            conv.dilation,
            tuple(conv._reversed_padding_repeated_twice),
            conv.padding_mode,
        )
    if isinstance(module, nn.Linear | Conv1D):
        return ("last",)
    # Convolution outputs and image-shaped activations: channels are features, positions samples.
    if _is_conv(module) or x.dim() == 4:
        return ("channels",)
    return ("last",)


def _conv_patches(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded receptive fields, one row per output position, columns in weight order."""
    # Padding first, by the module's own rule, covers 'same', asymmetric and non-zero modes.
    pad_mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, list(conv._reversed_padding_repeated_twice), mode=pad_mode)
    if isinstance(conv, nn.Conv1d):
        (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
        # [B, C, L_out, span] -> every d-th tap of each span is one kernel position.
        windows = x.unfold(2, d * (k - 1) + 1, s)[..., ::d]
        b, c, length, _ = windows.shape
        return windows.permute(0, 2, 1, 3).reshape(b * length, c * k)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _feature_rows(
    module: nn.Module, x: torch.Tensor, kind: tuple[Any, ...], where: Where, name: str
) -> torch.Tensor:
    if not torch.is_floating_point(x):
        raise TargetSelectionError(
            f"{name}: its {where} is a {x.dtype} tensor, not activations; "
            "select modules that consume or produce hidden states"
        )
    if kind[0] == "patches":
        return _conv_patches(module, x)  # type: ignore[arg-type]
    if kind[0] == "channels":
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


# --------------------------------------------------------------------------------------------
# Accumulators


class _Census:
    """How many group accumulators are alive, and the most there ever were (for tests)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def reset(self) -> None:
        self.live = 0
        self.peak = 0

    def born(self) -> None:
        self.live += 1
        self.peak = max(self.peak, self.live)

    def died(self, count: int) -> None:
        self.live -= count


_census = _Census()


class _Moments:
    """Σ xᵀx, Σ x and the row count of a stream of feature rows, in float64."""

    __slots__ = ("count", "gram", "total")

    def __init__(self, rows: torch.Tensor) -> None:
        n = rows.shape[1]
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=rows.device)
        self.total = torch.zeros(n, dtype=torch.float64, device=rows.device)
        self.count = 0
        for chunk in rows.split(_ROW_CHUNK):
            c = chunk.to(torch.float64)
            self.gram.addmm_(c.T, c)
            self.total += c.sum(dim=0)
        self.count = int(rows.shape[0])

    def merge(self, other: _Moments) -> None:
        self.gram += other.gram
        self.total += other.total
        self.count += other.count


@dataclass
class _Pending:
    """One distinct tensor seen during the current forward call, and who consumed it."""

    tensor: torch.Tensor  # held so that id() cannot be reused within the forward call
    moments: _Moments
    kind: tuple[Any, ...]
    members: set[str]


class _StatisticsHooks:
    """Hooks that stream the inputs (or outputs) of some modules into shared accumulators.

    Within one forward call, modules that see the same tensor object with the same feature
    kind of features are one *group*: the tensor's moments are computed once. After the call,
    :meth:`end_forward` adds them to the accumulator of that exact group, so that a module
    which shares its input in some calls and not in others still sums the right rows.
    """

    def __init__(self, modules: Mapping[str, nn.Module], where: Where) -> None:
        self.where: Where = where
        self.names = list(modules)
        self._pending: dict[tuple[int, tuple[Any, ...]], _Pending] = {}
        self._groups: dict[tuple[frozenset[str], tuple[Any, ...]], _Moments] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, module in modules.items():
            if where == "input":
                handle = module.register_forward_pre_hook(
                    partial(self._on_input, name), with_kwargs=True
                )
            else:
                handle = module.register_forward_hook(partial(self._on_output, name))
            self._handles.append(handle)

    def _on_input(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        x = (
            _first_tensor(args)
            if args
            else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        )
        if x is None:
            raise TargetSelectionError(f"{name}: was called without a tensor input")
        self._observe(name, module, x)

    def _on_output(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        y = _first_tensor(output)
        if y is None:
            raise TargetSelectionError(
                f"{name}: returns {type(output).__name__}, not a tensor; select a module whose "
                "output is the hidden representation"
            )
        self._observe(name, module, y)

    def _observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        kind = _feature_kind(module, x, self.where)
        key = (id(x), kind)
        entry = self._pending.get(key)
        if entry is not None and entry.tensor is x:
            entry.members.add(name)
            return
        rows = _feature_rows(module, x.detach(), kind, self.where, name)
        self._pending[key] = _Pending(x, _Moments(rows), kind, {name})

    def end_forward(self) -> None:
        """Fold the tensors seen in the forward call that just finished into the accumulators."""
        for entry in self._pending.values():
            group = (frozenset(entry.members), entry.kind)
            accumulator = self._groups.get(group)
            if accumulator is None:
                self._groups[group] = entry.moments
                _census.born()
            else:
                accumulator.merge(entry.moments)
        self._pending.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def finalize(self) -> dict[str, ActivationStatistics]:
        """The statistics of every hooked module; the accumulators are handed over, not kept."""
        by_module: dict[str, list[_Moments]] = {name: [] for name in self.names}
        for (members, _), moments in self._groups.items():
            for name in members:
                by_module[name].append(moments)
        _census.died(len(self._groups))
        self._groups = {}
        # One (gram, mean) per distinct accumulator, so that modules sharing an input share
        # the tensors too.
        done: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        stats: dict[str, ActivationStatistics] = {}
        for name, parts in by_module.items():
            if not parts:
                raise TargetSelectionError(
                    f"{name}: was never called during calibration; select modules that "
                    "run in the model's forward pass"
                )
            if len(parts) == 1:
                moments = parts[0]
            else:  # several distinct tensors per call, or an input shared only in some calls
                moments = parts[0]
                for part in parts[1:]:
                    merged = _Moments.__new__(_Moments)
                    merged.gram = moments.gram + part.gram
                    merged.total = moments.total + part.total
                    merged.count = moments.count + part.count
                    moments = merged
            if id(moments) not in done:
                if not bool(torch.isfinite(moments.gram).all()):
                    raise NumericalError(
                        f"{name}: its calibration {self.where} statistics contain NaN or Inf; "
                        "the model produces non-finite activations on this data (float16 "
                        "overflow? load it in float32 or bfloat16)"
                    )
                # Symmetric by construction; this removes the last-ulp asymmetry of the BLAS.
                gram = (moments.gram + moments.gram.T) * 0.5
                done[id(moments)] = (gram, moments.total / moments.count, moments.count)
            gram, mean, count = done[id(moments)]
            stats[name] = ActivationStatistics(
                module=name, gram=gram, n_samples=count, mean=mean, where=self.where
            )
        return stats


# --------------------------------------------------------------------------------------------
# Running the model


def _resolve(model: nn.Module, module_names: Sequence[str]) -> dict[str, nn.Module]:
    if isinstance(module_names, str):
        raise InvalidOptionError("module_names is one string; pass a list of module names")
    modules = dict(model.named_modules())
    resolved: dict[str, nn.Module] = {}
    for name in module_names:
        if name not in modules:
            raise TargetSelectionError(
                f"no module named {name!r} in {type(model).__name__}; use the full dotted "
                "names of model.named_modules()"
            )
        resolved[name] = modules[name]
    if not resolved:
        raise InvalidOptionError("no modules to calibrate; pass at least one module name")
    return resolved


def _as_batches(batches: Iterable[Batch]) -> list[Batch]:
    # Several passes (block capture, Fisher) read the batches, so a generator is read once here.
    listed = list(batches)
    if not listed:
        raise InvalidOptionError("no calibration batches; pass at least one batch of input_ids")
    return listed


# --------------------------------------------------------------------------------------------
# Block-by-block capture


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are stored: the rest is not needed."""


def _hidden_of(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def _with_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _same_objects(a: Any, b: Any) -> bool:
    """Whether two block inputs are the very same tensors (so one capture serves every block)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same_objects(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_objects(a[k], b[k]) for k in a)
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # objects without a boolean equality (caches, configs…)
        return False


def _rest(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    if args and isinstance(args[0], torch.Tensor):
        return args[1:], dict(kwargs)
    return args, {k: v for k, v in kwargs.items() if k != "hidden_states"}


@dataclass
class _Layout:
    """How a model calls its blocks, found on the first calibration window."""

    chained: bool  # block i+1's hidden input is block i's output
    uniform: bool  # every block gets the same non-hidden arguments (same tensor objects)
    problem: str = ""


def _probe_blocks(model: nn.Module, blocks: nn.ModuleList, batch: Batch) -> _Layout:
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = [[] for _ in blocks]
    outputs: list[Any] = [None] * len(blocks)

    def pre(i: int, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls[i].append((args, kwargs))

    def post(i: int, _m: nn.Module, _a: Any, output: Any) -> None:
        outputs[i] = _first_tensor(output)

    handles = [
        b.register_forward_pre_hook(partial(pre, i), with_kwargs=True) for i, b in enumerate(blocks)
    ]
    handles += [b.register_forward_hook(partial(post, i)) for i, b in enumerate(blocks)]
    try:
        call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    counts = [len(c) for c in calls]
    if any(count != 1 for count in counts):
        return _Layout(False, False, f"blocks are called {counts} times per forward, not once")
    for i in range(len(blocks)):
        hidden = _hidden_of(*calls[i][0])
        if hidden is None:
            return _Layout(False, False, f"block {i} gets no hidden-state tensor")
        if i > 0:
            previous = outputs[i - 1]
            if previous is None or not (
                hidden is previous
                or (hidden.shape == previous.shape and torch.equal(hidden, previous))
            ):
                return _Layout(False, False, f"block {i}'s input is not block {i - 1}'s output")
    first = _rest(*calls[0][0])
    uniform = all(_same_objects(_rest(*c[0]), first) for c in calls[1:])
    return _Layout(True, uniform)


class _BlockInputs:
    """The inputs of the current block for every calibration window."""

    def __init__(self, n_blocks: int, n_windows: int, uniform: bool) -> None:
        self.uniform = uniform
        self.hidden: list[torch.Tensor | None] = [None] * n_windows
        # uniform: one (args, kwargs) per window, from block 0; else one per block and window.
        self.calls: list[list[tuple[tuple[Any, ...], dict[str, Any]] | None]] = [
            [None] * n_windows for _ in range(1 if uniform else n_blocks)
        ]

    def call(self, block: int, window: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        stored = self.calls[0 if self.uniform else block][window]
        hidden = self.hidden[window]
        assert stored is not None and hidden is not None
        return _with_hidden(*stored, hidden)


def _capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: Sequence[Batch],
    layout: _Layout,
    outer: _StatisticsHooks | None,
    bar: tqdm,
) -> _BlockInputs:
    """Run the model up to block 0 (or through, when needed) once per window, keeping inputs."""
    inputs = _BlockInputs(len(blocks), len(batches), layout.uniform)
    # Modules outside the blocks, or blocks with different arguments, need the whole forward.
    full = outer is not None or not layout.uniform
    for window, batch in enumerate(batches):

        def pre(
            i: int, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], w: int = window
        ) -> None:
            if i == 0:
                inputs.hidden[w] = _hidden_of(args, kwargs)
            inputs.calls[i][w] = (args, kwargs)
            if not full:
                raise _StopForward

        hooked = blocks if not layout.uniform else blocks[:1]
        handles = [
            b.register_forward_pre_hook(partial(pre, i), with_kwargs=True)
            for i, b in enumerate(hooked)
        ]
        try:
            call_model(model, batch)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if outer is not None:
            outer.end_forward()
        bar.update(1)
    return inputs


def _block_prefix(blocks_name: str, index: int) -> str:
    return f"{blocks_name}.{index}"


def _in_block(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _iter_blockwise(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Sequence[Batch],
    where: Where,
    blocks_name: str,
    blocks: nn.ModuleList,
    layout: _Layout,
    progress: bool,
) -> Iterator[ActivationStatistics]:
    per_block: list[dict[str, nn.Module]] = []
    for i in range(len(blocks)):
        prefix = _block_prefix(blocks_name, i)
        per_block.append({n: m for n, m in modules.items() if _in_block(n, prefix)})
    inside = {n for group in per_block for n in group}
    outer_modules = {n: m for n, m in modules.items() if n not in inside}
    last = max(i for i, group in enumerate(per_block) if group)
    n_windows = len(batches)
    bar = tqdm(
        total=n_windows * (last + 2),
        desc="calibration (block by block)",
        unit="window",
        disable=not progress,
    )
    outer = _StatisticsHooks(outer_modules, where) if outer_modules else None
    try:
        try:
            inputs = _capture_block_inputs(model, blocks, batches, layout, outer, bar)
            outer_stats = outer.finalize() if outer is not None else {}
        finally:
            if outer is not None:
                outer.remove()
        yield from outer_stats.values()
        del outer_stats
        for i in range(last + 1):
            block = blocks[i]
            hooks = _StatisticsHooks(per_block[i], where) if per_block[i] else None
            try:
                for window in range(n_windows):
                    args, kwargs = inputs.call(i, window)
                    output = block(*args, **kwargs)
                    if hooks is not None:
                        hooks.end_forward()
                    inputs.hidden[window] = _first_tensor(output)
                    bar.update(1)
                stats = hooks.finalize() if hooks is not None else {}
            finally:
                if hooks is not None:
                    hooks.remove()
            yield from stats.values()
            # Else this block's Grams stay alive while the next block accumulates its own.
            del stats
    finally:
        bar.close()


def _iter_whole_model(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Sequence[Batch],
    where: Where,
    progress: bool,
) -> Iterator[ActivationStatistics]:
    hooks = _StatisticsHooks(modules, where)
    try:
        run_forward(
            model,
            batches,
            after_each=lambda _batch, _output: hooks.end_forward(),
            desc="calibration",
            progress=progress,
        )
        stats = hooks.finalize()
    finally:
        hooks.remove()
    yield from stats.values()


# --------------------------------------------------------------------------------------------
# Public API


def iter_activation_statistics(
    model: nn.Module,
    batches: Iterable[Batch],
    module_names: Sequence[str],
    *,
    where: Where = "input",
    blockwise: bool = True,
    fisher: bool = False,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> Iterator[ActivationStatistics]:
    """Stream the statistics of each module as soon as they are complete.

    In a block-by-block pass, the statistics of a block's modules are yielded when that block
    is done; a consumer that reduces and drops them keeps memory at one block's worth. Modules
    outside the blocks come first. See :func:`collect_activation_statistics` for the arguments.
    """
    if where not in ("input", "output"):
        raise InvalidOptionError(f"where={where!r}; use 'input' or 'output'")
    modules = _resolve(model, module_names)
    for name, module in modules.items():
        _check_supported(name, module, where)
    listed = _as_batches(batches)
    fishers = (
        collect_fisher_diagonal(model, listed, list(modules), loss_fn=loss_fn, progress=progress)
        if fisher
        else None
    )

    stream: Iterator[ActivationStatistics] | None = None
    if blockwise:
        try:
            blocks_name, blocks = find_blocks(model)
        except BlocksNotFoundError:
            blocks_name, blocks = "", None
        if blocks is not None and any(
            _in_block(n, _block_prefix(blocks_name, i)) for n in modules for i in range(len(blocks))
        ):
            with eval_mode(model), torch.no_grad():
                layout = _probe_blocks(model, blocks, listed[0])
            if layout.chained:
                stream = _iter_blockwise(
                    model, modules, listed, where, blocks_name, blocks, layout, progress
                )
            else:
                warnings.warn(
                    f"calibrating {type(model).__name__} in whole-model passes: "
                    f"{layout.problem}, so its blocks cannot be run one at a time",
                    stacklevel=2,
                )
    if stream is None:
        stream = _iter_whole_model(model, modules, listed, where, progress)
    for stats in _stepwise_no_grad_eval(model, stream):
        if fishers is not None:
            stats.fisher = fishers[stats.module]
        yield stats
        # Generators hold their last item while computing the next (the next block's forward).
        del stats


def _stepwise_no_grad_eval(
    model: nn.Module, stream: Iterator[ActivationStatistics]
) -> Iterator[ActivationStatistics]:
    """Advance ``stream`` in eval mode without autograd, but hand each item over outside both.

    Entering the modes around the whole generator would leak them into the consumer's code
    between two items.
    """
    try:
        while True:
            with eval_mode(model), torch.no_grad():
                item = next(stream, None)
            if item is None:
                return
            yield item
            del item
    finally:
        stream.close()  # type: ignore[attr-defined]


def collect_activation_statistics(
    model: nn.Module,
    batches: Iterable[Batch],
    module_names: Sequence[str],
    *,
    where: Where = "input",
    blockwise: bool = True,
    fisher: bool = False,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> dict[str, ActivationStatistics]:
    """Gram matrix, row count and mean of each module's input (or output) over calibration data.

    Args:
        model: any ``nn.Module``; it is not modified (eval mode and no grad for the duration).
        batches: ``input_ids`` tensors ``[b, T]`` (passed positionally, so an image batch works
            too) or dicts of forward keyword arguments; read once, so a generator is fine.
        module_names: full dotted names from ``model.named_modules()``.
        where: ``"input"`` for the features a weight multiplies (Gram for activation-aware
            factorization), ``"output"`` for the hidden representation a module produces
            (the activation spectrum of RMT-KD).
        blockwise: calibrate block by block when the model has repeated blocks (same numbers,
            memory of one block); models without blocks always use whole-model passes.
        fisher: also compute the diagonal Fisher information of each module's weight, with a
            separate whole-model pass that needs gradients (see :func:`collect_fisher_diagonal`).
        loss_fn: the loss for the Fisher pass; next-token cross-entropy by default.
        progress: show a tqdm bar.

    Returns:
        ``{module name: statistics}`` in the order of ``module_names``.

    Raises:
        TargetSelectionError: a name that is not a module, a module that never runs, or an
            unsupported layer (grouped or 3-D convolution).
        NumericalError: NaN or Inf in a module's statistics (the message names the module).
    """
    stats = {
        s.module: s
        for s in iter_activation_statistics(
            model,
            batches,
            module_names,
            where=where,
            blockwise=blockwise,
            fisher=fisher,
            loss_fn=loss_fn,
            progress=progress,
        )
    }
    return {name: stats[name] for name in dict.fromkeys(module_names)}


def collect_input_statistics(
    model: nn.Module,
    batches: Iterable[Batch],
    module_names: Sequence[str],
    *,
    blockwise: bool = True,
    fisher: bool = False,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> dict[str, ActivationStatistics]:
    """Input Gram matrices (and optionally Fisher diagonals): the statistics surgery uses.

    :func:`collect_activation_statistics` with ``where="input"``.
    """
    return collect_activation_statistics(
        model,
        batches,
        module_names,
        where="input",
        blockwise=blockwise,
        fisher=fisher,
        loss_fn=loss_fn,
        progress=progress,
    )


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy of a Hugging Face causal LM (``labels = input_ids``)."""
    kwargs: dict[str, Any] = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
    if "labels" not in kwargs:
        if "input_ids" not in kwargs:
            raise InvalidOptionError(
                "the batch has neither labels nor input_ids; pass loss_fn=... for the Fisher pass"
            )
        kwargs["labels"] = kwargs["input_ids"]
    output = call_model(model, kwargs)
    loss = getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise InvalidOptionError(
            f"{type(model).__name__} returned no loss for labels=input_ids; pass loss_fn=... "
            "to compute the Fisher information"
        )
    return loss


def causal_lm_gradient(
    logits: torch.Tensor, ids: torch.Tensor, chunk: int = 64
) -> tuple[float, torch.Tensor]:
    """The mean next-token cross-entropy of ``[B, T, V]`` logits on ``[B, T]`` ids (what a
    causal LM returns as its loss for ``labels = input_ids``) and its gradient with respect to
    the logits, ``(softmax − one-hot) / (B (T − 1))``, zero at each window's last position
    (which predicts nothing); by chunks of positions, in at least float32.

    The gradient overwrites the logits, which their backward pass does not read unless the
    operation that made them saved its result (then it gets a buffer of its own): autograd
    through a cross-entropy would hold three logits-sized tensors at once, and the head's
    logits are the largest tensors of a forward pass (T × vocabulary).
    """
    windows, length, vocab = logits.shape
    flat = logits.detach().view(-1, vocab)
    grad = torch.empty_like(flat) if hasattr(logits.grad_fn, "_saved_result") else flat
    count = windows * (length - 1)
    precision = torch.promote_types(flat.dtype, torch.float32)
    total = 0.0
    for window in range(windows):
        for start in range(0, length - 1, chunk):
            wanted = ids[window, start + 1 : start + 1 + chunk]
            at = window * length + start
            part = flat[at : at + wanted.shape[0]].to(precision)
            norm = torch.logsumexp(part, dim=1, keepdim=True)
            rows = torch.arange(wanted.shape[0], device=part.device)
            total += float((norm[:, 0] - part[rows, wanted]).sum())
            probabilities = (part - norm).exp_()
            probabilities[rows, wanted] -= 1.0
            grad[at : at + wanted.shape[0]] = probabilities.div_(count)
        grad[(window + 1) * length - 1] = 0.0
    return total / count, grad.view_as(logits)


def _weight_of(name: str, module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
        raise TargetSelectionError(
            f"{name}: {type(module).__name__} has no weight matrix for a Fisher diagonal"
        )
    return weight


def _as_out_by_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(module, Conv1D):  # stores in × out
        return tensor.T
    return tensor.reshape(tensor.shape[0], -1)


def _loss_gradients(
    model: nn.Module,
    batch: Batch,
    index: int,
    loss_fn: LossFn | None,
    weights: list[torch.Tensor],
) -> tuple[torch.Tensor | None, ...]:
    """∂L/∂W of one batch; without ``loss_fn``, a batch of ids is a causal LM's
    (:func:`causal_lm_gradient`), anything else goes through :func:`causal_lm_loss`."""
    if loss_fn is None and isinstance(batch, torch.Tensor):
        logits = output_logits(call_model(model, batch))
        loss, logit_grad = causal_lm_gradient(logits, batch.to(logits.device))
        if not math.isfinite(loss):
            raise NumericalError(
                f"the loss of calibration batch {index} is {loss}; check the data and the "
                "model dtype"
            )
        return torch.autograd.grad(logits, weights, grad_outputs=logit_grad, allow_unused=True)
    value = (loss_fn or causal_lm_loss)(model, batch)
    if value.dim() != 0 or not bool(torch.isfinite(value)):
        raise NumericalError(
            f"the loss of calibration batch {index} is not a finite scalar "
            f"({value.shape}); check the data and the model dtype"
        )
    return torch.autograd.grad(value, weights, allow_unused=True)


def collect_fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Batch],
    module_names: Sequence[str],
    *,
    loss_fn: LossFn | None = None,
    rows: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of each module's weight: ``Σ_batches (∂L_b/∂W)²``.

    The empirical Fisher at the granularity of the calibration batches (FWSVD, Hsu et al.,
    ICLR 2022, use per-example squares; a batch of one window gives exactly that). One forward
    and backward per batch through the whole model; gradients come from ``torch.autograd.grad``
    so no ``.grad`` is left behind, and the weights' ``requires_grad`` flags are restored.

    With ``rows=True`` each batch's squares are summed over the input dimension as they come,
    so only an ``m``-vector per module is kept instead of an ``m × n`` float64 matrix: all
    that FWSVD's row weighting and the mean Fisher of the importance need.

    Returns:
        ``{module name: float64 m × n tensor}`` (out × in; HF ``Conv1D`` transposed, conv
        kernels flattened to ``out × in·kh·kw``), or its row sums (``m``) with ``rows=True``.

    Raises:
        TargetSelectionError: a module without a weight matrix, or one the loss does not reach.
        NumericalError: a non-finite loss or gradient (the message names the batch or module).
    """
    modules = _resolve(model, module_names)
    weights = {name: _weight_of(name, m) for name, m in modules.items()}
    listed = _as_batches(batches)
    fishers: dict[str, torch.Tensor] = {}
    flags = {id(w): (w, w.requires_grad) for w in weights.values()}
    with eval_mode(model), torch.enable_grad():
        try:
            for w, _ in flags.values():
                w.requires_grad_(True)
            bar = tqdm(listed, desc="Fisher information", unit="batch", disable=not progress)
            for index, batch in enumerate(bar):
                grads = _loss_gradients(model, batch, index, loss_fn, list(weights.values()))
                for (name, module), grad in zip(modules.items(), grads, strict=True):
                    if grad is None:
                        raise TargetSelectionError(
                            f"{name}: the loss does not depend on its weight; leave it out of "
                            "the Fisher targets"
                        )
                    squared = _as_out_by_in(module, grad.detach().to(torch.float64)).square()
                    if rows:
                        squared = squared.sum(dim=1)
                    if name in fishers:
                        fishers[name] += squared
                    else:
                        fishers[name] = squared
        finally:
            for w, requires_grad in flags.values():
                w.requires_grad_(requires_grad)
    for name, value in fishers.items():
        if not bool(torch.isfinite(value).all()):
            raise NumericalError(
                f"{name}: its Fisher information contains NaN or Inf; check the data and the "
                "model dtype"
            )
    return fishers
