"""The streaming pipeline: a model compressed one transformer block at a time.

Only one block's weights are real at any moment (:class:`~laserrmt.models.streaming.
BlockStream`); the calibration and evaluation windows are carried from block to block as hidden
states (:class:`~laserrmt.models.blockrun.BlockRunner`). A global budget stays global:

1. **Fisher** (``importance="fisher"`` or ``whiten="fisher"``): the first windows go forward
   block by block, keeping each block's inputs; the model's own loss gives the gradient at the
   last hidden states, and the blocks are walked backwards, each recomputed from its kept input
   and differentiated once (a backward pass with one block of weights in memory).
2. **Statistics**: each block's targets get their input Gram on the dense model's hidden
   states; their weighted SVDs give the loss curves (singular values kept, factors spilled to
   disk unless step 3 refits them).
3. The **allocation** (:func:`laserrmt.methods.budget.decide_ranks`), as in memory.
4. **Cut**: block by block, the planned modules are factorized and the block is written to
   the output's shards, then freed. With ``compensate`` (issue 13's sequential fit) the
   factors are refitted on the inputs the already-compressed blocks produce, to reproduce
   the dense block's outputs (:func:`~laserrmt.surgery.whiten.compensated_svd`), group by group
   of modules sharing an input, in the order the block runs them; ``refine_steps`` then
   optimises the block's factors and norm scales to match the dense block's outputs.

Evaluation windows ride along: the dense model's perplexity comes out of step 2 and the
compressed model's out of step 4, without loading either model whole.

A plan whose factors are the weights' own SVDs (the laser method's, ``plan.factors.whiten ==
"none"``) needs no calibration: steps 1 to 3 are skipped and the cut recomputes each planned
matrix's SVD from the block in hand, factorizing or denoising it as
:func:`~laserrmt.surgery.apply.apply_plan` does in memory. With ``quantize="int8"`` each
block's linear layers are quantized right after its cut, before it is written.
Healing's teacher, the dense model's top-k on the healing windows (:func:`streamed_teacher`), is
a pass of its own before step 1; :func:`laserrmt.pipeline.heal_saved` then heals the written
model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from laserrmt.allocation import largest_paying_rank
from laserrmt.distill import TopKLogits
from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.evaluate import PerplexityResult, _nll_sum
from laserrmt.memory import return_freed_memory
from laserrmt.methods.budget import decide_ranks, factor_source
from laserrmt.methods.heal import HEAL_TOP_K, healing_batches
from laserrmt.methods.rmt_kd import (
    RMTKDResult,
    SiteRecord,
    _parameters,
    _resolve_sites,
    check_options,
    judged,
    width_decision,
)
from laserrmt.models.architectures import is_causal_lm
from laserrmt.models.blockrun import BlockRunner
from laserrmt.models.streaming import BlockStream
from laserrmt.models.targets import Target, find_targets, select_targets, weight_matrix
from laserrmt.models.widths import WidthSite
from laserrmt.plan import CompressionPlan, WidthPlan
from laserrmt.stats.activations import SiteWatch, site_rank
from laserrmt.stats.calibration import (
    _as_out_by_in,
    _StatisticsHooks,
    _weight_of,
    causal_lm_gradient,
)
from laserrmt.stats.forward import attached, batches_fingerprint, output_logits
from laserrmt.surgery.apply import apply_plan
from laserrmt.surgery.lowrank import factorize
from laserrmt.surgery.quantize import quantizable_modules, quantize_model_int8
from laserrmt.surgery.registry import CompressedModule
from laserrmt.surgery.replace import set_submodule
from laserrmt.surgery.shards import ShardWriter
from laserrmt.surgery.sparse import factorize_sparse, sparse_factorizer
from laserrmt.surgery.spill import FactorSpill
from laserrmt.surgery.whiten import (
    DEFAULT_FLOOR,
    SharedWhitening,
    compensated_svd,
    weighted_svd,
)
from laserrmt.surgery.width import cut_width

__all__ = [
    "StreamedCompression",
    "StreamedRMTKD",
    "compress_streaming",
    "streamable_targets",
    "streamed_perplexity",
    "streamed_rmt_kd",
    "streamed_teacher",
]

#: The compensated fit's ridge toward the dense weight, as a fraction of the mean input energy
#: (:func:`~laserrmt.surgery.whiten.compensated_svd`): GPTQ's damping of its Hessian.
COMPENSATION_DAMPING = 0.01


def _rss_mib() -> float:
    from laserrmt.evaluate import _current_rss

    return _current_rss() / 2**20


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="block", disable=not progress)


def _tick(bar: tqdm) -> None:
    bar.set_postfix_str(f"{_rss_mib():.0f} MiB resident", refresh=False)
    bar.update(1)


@dataclass
class StreamedCompression:
    """What :func:`compress_streaming` decided, wrote and measured."""

    plan: CompressionPlan
    weight_bytes: int
    params_before: int
    params_after: int
    perplexity_before: PerplexityResult | None = None
    perplexity_after: PerplexityResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    refinement: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# perplexity from carried hidden states


def _nll(runner: BlockRunner, window: int, final: torch.Tensor) -> tuple[float, int]:
    ids = runner.windows[window]
    logits = output_logits(runner.output(window, final))
    vocab = logits.shape[-1]
    nll = _nll_sum(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    if not math.isfinite(nll):
        raise NumericalError(
            f"the likelihood of evaluation window {window} is {nll}: the logits hold NaN or Inf"
        )
    return nll, ids.shape[0] * (ids.shape[1] - 1)


def _perplexity(runner: BlockRunner, finals: Sequence[torch.Tensor]) -> PerplexityResult:
    total, tokens = 0.0, 0
    with torch.no_grad(), runner.stream.outer():
        for window, final in enumerate(finals):
            nll, count = _nll(runner, window, final)
            total += nll
            tokens += count
    return PerplexityResult(math.exp(total / tokens), total / tokens, tokens)


def _through_blocks(runner: BlockRunner, desc: str, progress: bool) -> list[torch.Tensor]:
    """The runner's windows carried through every block, one block in memory at a time."""
    stream, hidden = runner.stream, list(runner.hidden)
    bar = _bar(len(stream.blocks), desc, progress)
    with torch.no_grad(), bar:
        for index in range(len(stream.blocks)):
            with stream.block(index) as block:
                hidden = _carry(runner, index, block, hidden)
            _tick(bar)
    return hidden


def streamed_perplexity(
    stream: BlockStream, windows: torch.Tensor, *, progress: bool = True
) -> PerplexityResult:
    """Perplexity of the streamed model on ``windows`` (the pinned protocol's definition, as
    :func:`laserrmt.evaluate.perplexity`), one block in memory at a time."""
    runner = BlockRunner(stream, windows)
    hidden = _through_blocks(runner, "perplexity (streamed)", progress)
    return _perplexity(runner, hidden)


def streamed_teacher(
    stream: BlockStream,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    top_k: int = HEAL_TOP_K,
    progress: bool = True,
) -> list[TopKLogits]:
    """Healing's teacher from the streamed dense model: its top-``top_k`` next-token
    distribution on the batches of :func:`~laserrmt.methods.heal.healing_batches`, as
    :func:`~laserrmt.methods.heal.healing_teacher` makes it from the model in memory.

    One dense block is real at a time, beside the windows' hidden states (``n × T × hidden``
    numbers in the stream's dtype) and, at the end, one batch's logits. What is kept costs
    ``n × (T − 1) × (8 k + 4)`` bytes for ``n`` windows of ``T`` tokens: a float32
    log-probability and an int32 index per kept class, and the tail's log-probability, per
    predicted position (``n`` = 64, ``T`` = 512, ``k`` = 64: 17 MB).
    """
    batches = healing_batches(windows, batch_size)  # refuses a batch size it cannot fill
    runner = BlockRunner(stream, windows)
    hidden = _through_blocks(runner, "healing teacher (streamed)", progress)
    teacher, start = [], 0
    with torch.no_grad(), stream.outer():
        for batch in batches:
            rows = range(start, start + batch.shape[0])
            logits = torch.cat([output_logits(runner.output(w, hidden[w]))[:, :-1] for w in rows])
            teacher.append(TopKLogits.from_logits(logits, top_k))
            start = rows.stop
    return teacher


# ---------------------------------------------------------------------------------------------
# Fisher information, block by block backwards


def streamed_fisher_rows(
    stream: BlockStream, windows: torch.Tensor, names: Sequence[str], *, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Row sums of the diagonal Fisher of each named weight, ``Σ_windows Σ_j (∂L/∂W_ij)²``
    with ``L`` the mean next-token loss on one window (the model's loss for labels = inputs), as
    :func:`~laserrmt.stats.calibration.collect_fisher_diagonal` with ``rows=True`` computes it
    in memory; here each block is recomputed from its input and differentiated alone.

    The blocks' inputs (windows × tokens × hidden each) wait on disk for the backward pass, in
    their own dtype, so that only the head's working memory comes on top of one block.
    """
    with tempfile.TemporaryDirectory(prefix="laserrmt-fisher-") as spill:
        return _fisher_rows(stream, windows, names, Path(spill), progress)


def _fisher_rows(
    stream: BlockStream,
    windows: torch.Tensor,
    names: Sequence[str],
    spill: Path,
    progress: bool,
) -> dict[str, torch.Tensor]:
    runner = BlockRunner(stream, windows)
    n_blocks = len(stream.blocks)
    hidden = list(runner.hidden)
    bar = _bar(2 * n_blocks, "Fisher information (streamed)", progress)
    with torch.no_grad():
        for index in range(n_blocks):
            # safetensors writes from host memory: the spill's one device round trip.
            save_file(
                {str(w): h.detach().cpu().contiguous() for w, h in enumerate(hidden)},
                str(spill / f"{index}.safetensors"),
            )
            with stream.block(index) as block:
                hidden = _carry(runner, index, block, hidden)
            _tick(bar)
    grads: list[torch.Tensor] = []
    with torch.enable_grad(), stream.outer():
        for window, final in enumerate(hidden):
            final = final.detach().requires_grad_(True)
            logits = output_logits(runner.output(window, final))
            loss, logit_grad = causal_lm_gradient(logits, runner.windows[window])
            if not math.isfinite(loss):
                raise NumericalError(
                    f"the loss of calibration window {window} is {loss}; check the data and "
                    "the dtype"
                )
            (grad,) = torch.autograd.grad(logits, final, grad_outputs=logit_grad)
            del logits, logit_grad
            grads.append(grad)
    del hidden
    return_freed_memory()  # the head's logits and their gradients
    fishers: dict[str, torch.Tensor] = {}
    for index in reversed(range(n_blocks)):
        prefix = runner.block_prefix(index)
        with stream.block(index) as block, torch.enable_grad():
            modules = {
                n: block.get_submodule(n[len(prefix) + 1 :]) for n in names if _in(n, prefix)
            }
            weights: list[torch.Tensor] = [_weight_of(n, m) for n, m in modules.items()]
            for w in weights:
                w.requires_grad_(True)
            kept = load_file(str(spill / f"{index}.safetensors"))
            for window in range(len(grads)):
                x = kept.pop(str(window)).to(stream.device).requires_grad_(index > 0)
                out = runner.call(index, block, window, x)
                wanted = ([x] if index > 0 else []) + weights
                parts = torch.autograd.grad(out, wanted, grad_outputs=grads[window])
                if index > 0:
                    grads[window] = parts[0]
                for (name, module), g in zip(
                    modules.items(), parts[len(parts) - len(weights) :], strict=True
                ):
                    rows = _as_out_by_in(module, g.detach().to(torch.float64)).square().sum(dim=1)
                    fishers[name] = fishers[name] + rows if name in fishers else rows
        _tick(bar)
    bar.close()
    for name, value in fishers.items():
        if not bool(torch.isfinite(value).all()):
            raise NumericalError(f"{name}: its Fisher information contains NaN or Inf")
    return fishers


def _in(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


# ---------------------------------------------------------------------------------------------
# the compression


def _block_targets(names: Sequence[str], prefix: str) -> list[str]:
    return [n for n in names if _in(n, prefix)]


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :]


def _carry(
    runner: BlockRunner, index: int, block: nn.Module, hidden: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    return [runner.call(index, block, w, h) for w, h in enumerate(hidden)]


def _input_groups(
    runner: BlockRunner, index: int, block: nn.Module, hidden: torch.Tensor, names: Sequence[str]
) -> list[list[str]]:
    """The block's modules ``names`` (relative) grouped by the input tensor they share, in the
    order the block runs them."""
    # The input tensors themselves are kept until the grouping is done: an id alone could be
    # reused by a later tensor once the first is freed.
    order: list[tuple[torch.Tensor, str]] = []
    handles = [
        block.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: order.append((args[0], n))
        )
        for n in names
    ]
    try:
        runner.call(index, block, 0, hidden)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for tensor, name in order:
        if name not in {m for g in groups.values() for m in g}:
            groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


class _Captured(Exception):
    """Raised once every watched module's input is kept: the rest of the block is not needed."""


class _InputCapture:
    """Pre-hooks that keep the input rows (float64, ``[tokens, in]``) of some modules for one
    forward call, which they end (:meth:`run`) once all are kept; modules given the same tensor
    share one copy."""

    def __init__(self, block: nn.Module, names: Sequence[str]) -> None:
        self.rows: dict[str, torch.Tensor] = {}
        # id → (the input, its rows): the input is kept so that its id is not reused.
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(_m: nn.Module, args: tuple[Any, ...], name: str) -> None:
            x = args[0]
            if id(x) not in seen:
                seen[id(x)] = (x, x.detach().reshape(-1, x.shape[-1]).to(torch.float64))
            self.rows[name] = seen[id(x)][1]
            if len(self.rows) == len(names):
                raise _Captured

        self._seen = seen
        self._handles = [
            block.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: keep(m, args, n))
            for n in names
        ]

    def run(self, call: Callable[[], Any]) -> None:
        self.rows.clear()
        self._seen.clear()
        with contextlib.suppress(_Captured):
            call()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _compensated_group(
    runner: BlockRunner,
    index: int,
    dense: nn.Module,
    block: nn.Module,
    dense_in: Sequence[torch.Tensor],
    compressed_in: Sequence[torch.Tensor],
    group: Sequence[str],
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """``(G̃, C, n)`` per module of ``group``: the Gram of its inputs in the partly compressed
    ``block`` and their cross moment with its inputs in the ``dense`` block, token by token."""
    ours, theirs = _InputCapture(block, group), _InputCapture(dense, group)
    sums: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    try:
        for window in range(len(compressed_in)):
            theirs.run(functools.partial(runner.call, index, dense, window, dense_in[window]))
            ours.run(functools.partial(runner.call, index, block, window, compressed_in[window]))
            done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for name in group:
                x, xt = theirs.rows[name], ours.rows[name]
                key = id(xt)
                if key not in done:
                    done[key] = (xt.T @ xt, x.T @ xt)
                gram, cross = done[key]
                if name in sums:
                    g0, c0, n0 = sums[name]
                    sums[name] = (g0 + gram, c0 + cross, n0 + xt.shape[0])
                else:
                    sums[name] = (gram, cross, xt.shape[0])
    finally:
        ours.remove()
        theirs.remove()
    return sums


def _trainable(block: nn.Module) -> list[nn.Parameter]:
    """The factors of the block's low-rank layers and its normalisation scales."""
    params: list[nn.Parameter] = []
    for module in block.modules():
        if isinstance(module, CompressedModule):  # factors (and sparse values)
            params += [p for p in module.parameters(recurse=False) if p.is_floating_point()]
            continue
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, nn.Parameter):
            params.append(weight)
    return params


def refine_block(
    runner: BlockRunner,
    index: int,
    block: nn.Module,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-4,
) -> dict[str, float]:
    """``steps`` Adam steps (one window each, in turn) on the block's factors and norm scales,
    minimising ``‖block(x̃) − y‖² / ‖y‖²`` with ``y`` the dense block's outputs; returns the
    relative error over all windows before and after (the better parameters are kept)."""
    params = _trainable(block)
    if not params or steps <= 0:
        return {}

    def error() -> float:
        with torch.no_grad():
            num = sum(
                float((runner.call(index, block, w, x).float() - targets[w].float()).square().sum())
                for w, x in enumerate(inputs)
            )
            den = sum(float(t.float().square().sum()) for t in targets)
        return num / den

    before = error()
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    optimiser = torch.optim.Adam(params, lr=lr)
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for step in range(steps):
                w = step % len(inputs)
                out = runner.call(index, block, w, inputs[w])
                loss = (out.float() - targets[w].float()).square().mean() / (
                    targets[w].float().square().mean()
                )
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    after = error()
    if not after < before:  # never leave a block worse than its closed-form fit
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
        after = before
    return {"block": index, "error_before": before, "error_after": after}


def streamable_targets(
    stream: BlockStream, targets: Sequence[str] | None, quantize: str | None = None
) -> list[Target]:
    """The targets ``targets`` selects (``--targets``; all linear layers of the blocks by
    default), checked to lie inside the blocks, as the streaming pipeline compresses them; with
    ``quantize="int8"``, every layer the in-memory quantization would replace must too."""
    model = stream.model
    found = select_targets(find_targets(model), targets)
    outside = [t.name for t in found if not _in_blocks(stream, t.name)]
    if outside:
        raise InvalidOptionError(
            f"{outside[0]} is outside the transformer blocks; the streaming pipeline compresses "
            "block layers only: leave it out with --targets"
        )
    if quantize == "int8":
        outside = [n for n in quantizable_modules(model) if not _in_blocks(stream, n)]
        if outside:
            raise InvalidOptionError(
                f"--quantize int8 would quantize {outside[0]}, outside the transformer blocks, "
                "which the streaming pipeline does not; drop --stream to quantize in memory"
            )
    return found


def _in_blocks(stream: BlockStream, name: str) -> bool:
    return any(_in(name, prefix) for prefix in stream.blocks)


def compress_streaming(
    stream: BlockStream,
    calibration: torch.Tensor | None,
    out_dir: str | Path,
    *,
    target_params: float | None,
    whiten: str = "svdllm",
    allocation: str = "global",
    importance: str = "auto",
    fisher_windows: int = 4,
    floor: float = DEFAULT_FLOOR,
    targets: Sequence[str] | None = None,
    compensate: bool = False,
    refine_steps: int = 0,
    refine_lr: float = 1e-4,
    sparse_share: float = 0.0,
    evaluation: torch.Tensor | None = None,
    max_shard_size: int = 1_000_000_000,
    calibration_source: Mapping[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    on_block: Callable[[int], None] | None = None,
    plan: CompressionPlan | None = None,
    quantize: str | None = None,
) -> StreamedCompression:
    """The budget method on a streamed model; the weights are written to ``out_dir`` (an
    existing folder) shard by shard, block by block.

    A ``plan`` (of an earlier run on the same model) replaces the decision: with
    ``compensate`` only the cut pass runs (its factors are refitted anyway), and there is no
    perplexity before. A plan whose factors are plain SVDs (``plan.factors.whiten == "none"``,
    as the laser method's) is cut from the weights alone, ``denoise`` decisions included, and
    needs no ``calibration`` (``None``) unless ``compensate`` refits it.

    ``sparse_share`` of each factorized matrix's parameters go to the largest entries of its
    activation-weighted residual (:func:`~laserrmt.surgery.sparse.factorize_sparse`).
    ``targets`` selects modules as ``--targets`` does (all linear layers of the blocks by
    default); modules outside the blocks are not supported here. ``quantize="int8"`` quantizes
    each block's linear layers right after its cut, before it is written, as
    :func:`~laserrmt.surgery.quantize.quantize_model_int8` does in memory. ``evaluation`` windows
    give the perplexity before and after. ``max_shard_size`` bounds what the writer holds.
    Returns the plan and the measurements; :func:`laserrmt.surgery.io.write_compressed` with
    ``weights_written=True`` adds the configuration and metadata.
    """
    if whiten not in ("svdllm", "asvd", "none", "fisher"):
        raise InvalidOptionError(f"unknown --whiten {whiten!r}")
    if compensate and whiten not in ("svdllm", "none"):
        raise InvalidOptionError(
            "--sequential refits the factors on the compressed model's inputs (SVD-LLM's "
            "whitening); use it with --whiten svdllm"
        )
    if importance == "auto":
        importance = "fisher" if is_causal_lm(stream.model) else "none"
    if importance not in ("fisher", "none", "entropy"):
        raise InvalidOptionError(
            f"--importance {importance} needs the whole model; the streaming pipeline takes "
            "fisher, entropy or none"
        )
    if quantize not in (None, "int8"):
        raise InvalidOptionError(f"--quantize {quantize} is not streamed; use int8 or none")
    timings: dict[str, float] = {}
    found = streamable_targets(stream, targets, quantize)
    names = [t.name for t in found]
    by_name = {t.name: t for t in found}
    plain = plan is not None and not plan.factors.needs_calibration and not compensate
    if plan is not None:
        modes = {d.mode for d in plan} - {"keep", "factorize"} - ({"denoise"} if plain else set())
        unknown = [d.module for d in plan if d.module not in by_name]
        if unknown:
            raise InvalidOptionError(
                f"the plan names {unknown[0]}; the streaming cut changes block targets only"
            )
        if modes:
            raise InvalidOptionError(
                f"the plan has {'/'.join(sorted(modes))} decisions; the streaming cut denoises "
                "only with plain factors (the laser method's) and without --sequential"
            )
    if plain and refine_steps:
        raise InvalidOptionError(
            "--refine-steps refines factors fitted on calibration data; a plan of plain "
            "factors (the laser method's) is cut without it: drop --refine-steps"
        )
    if plain:
        assert plan is not None
        return _replay_plain(
            stream,
            plan,
            out_dir,
            evaluation=evaluation,
            sparse_share=sparse_share,
            quantize=quantize,
            max_shard_size=max_shard_size,
            progress=progress,
            on_block=on_block,
        )
    if calibration is None:
        raise InvalidOptionError(
            "the streaming budget method measures calibration windows; pass calibration"
        )

    started = time.perf_counter()
    fisher_rows: dict[str, torch.Tensor] = {}
    replay_only = plan is not None and compensate
    if plan is None and (importance == "fisher" or whiten == "fisher"):
        fisher_rows = streamed_fisher_rows(
            stream, calibration[:fisher_windows], names, progress=progress
        )
    timings["fisher"] = time.perf_counter() - started

    # Pass 1: the dense model's statistics, weighted spectra, spilled factors.
    started = time.perf_counter()
    runner = BlockRunner(stream, calibration)
    hidden = list(runner.hidden)
    evaluator = BlockRunner(stream, evaluation) if evaluation is not None else None
    eval_hidden = list(evaluator.hidden) if evaluator is not None else []
    values: dict[str, np.ndarray] = {}
    diagonals: dict[str, torch.Tensor] = {}  # input Gram diagonals, for the sparse entries
    spill = FactorSpill()
    try:
        bar = _bar(len(stream.blocks), "statistics and spectra (streamed)", progress)
        with torch.no_grad(), bar:
            for index in range(0 if replay_only else len(stream.blocks)):
                prefix = runner.block_prefix(index)
                local = _block_targets(names, prefix)
                with stream.block(index) as block:
                    hooks = _StatisticsHooks(
                        {n: block.get_submodule(_relative(n, prefix)) for n in local}, "input"
                    )
                    try:
                        for w, h in enumerate(hidden):
                            hidden[w] = runner.call(index, block, w, h)
                            hooks.end_forward()
                        stats = hooks.finalize()
                    finally:
                        hooks.remove()
                    shared = SharedWhitening()
                    for name in local:
                        grams = whiten in ("svdllm", "asvd")
                        svd = weighted_svd(
                            weight_matrix(block.get_submodule(_relative(name, prefix))),
                            whiten=whiten,
                            gram=stats[name].gram if grams else None,
                            n_samples=stats[name].n_samples if grams else None,
                            fisher=fisher_rows.get(name),
                            floor=floor,
                            module=name,
                            shared=shared,
                        )
                        values[name] = svd.s.cpu().numpy()
                        if sparse_share and not compensate:
                            diagonals[name] = stats[name].gram.diagonal().clone()
                        k = largest_paying_rank(by_name[name].shape)
                        if k > 0 and not compensate:  # to disk at once: one matrix held
                            spill.write({name: (svd.U[:, :k], svd.s[:k], svd.Vh[:k])})
                        del svd
                    del stats, shared
                    if evaluator is not None:
                        eval_hidden = _carry(evaluator, index, block, eval_hidden)
                _tick(bar)
        before = None
        if evaluator is not None and not replay_only:
            before = _perplexity(evaluator, eval_hidden)
        timings["statistics"] = time.perf_counter() - started

        if plan is None:
            plan, _chosen, _free = decide_ranks(
                found,
                values,
                whiten=whiten,
                allocation=allocation,
                importance=importance,
                fisher_rows=fisher_rows,
                target_params=target_params,
                settings=settings,
            )
            plan.factors = factor_source(
                whiten, floor, calibration, calibration_source, fisher_windows
            )
        spill.ranks = {d.module: d.rank for d in plan if d.mode != "keep"}
        started = time.perf_counter()
        outcome = _cut(
            stream,
            runner,
            evaluator,
            plan,
            spill,
            out_dir,
            compensate=compensate,
            floor=floor,
            refine_steps=refine_steps,
            refine_lr=refine_lr,
            sparse_share=sparse_share,
            diagonals=diagonals,
            quantize=quantize,
            max_shard_size=max_shard_size,
            progress=progress,
            on_block=on_block,
        )
        timings["cut_and_write"] = time.perf_counter() - started
    finally:
        spill.close()
    outcome.perplexity_before = before
    outcome.timings = timings
    return outcome


def _replay_plain(
    stream: BlockStream,
    plan: CompressionPlan,
    out_dir: str | Path,
    *,
    evaluation: torch.Tensor | None,
    sparse_share: float,
    quantize: str | None,
    max_shard_size: int,
    progress: bool,
    on_block: Callable[[int], None] | None,
) -> StreamedCompression:
    """The cut of a plan of plain factors: no calibration pass, each SVD taken in the cut."""
    timings: dict[str, float] = {}
    before = None
    if evaluation is not None:
        started = time.perf_counter()
        before = streamed_perplexity(stream, evaluation, progress=progress)
        timings["perplexity_before"] = time.perf_counter() - started
    started = time.perf_counter()
    outcome = _cut(
        stream,
        None,
        BlockRunner(stream, evaluation) if evaluation is not None else None,
        plan,
        None,
        out_dir,
        compensate=False,
        floor=DEFAULT_FLOOR,
        refine_steps=0,
        refine_lr=0.0,
        sparse_share=sparse_share,
        diagonals={},
        quantize=quantize,
        max_shard_size=max_shard_size,
        progress=progress,
        on_block=on_block,
    )
    timings["cut_and_write"] = time.perf_counter() - started
    outcome.perplexity_before = before
    outcome.timings = timings
    return outcome


def _cut(
    stream: BlockStream,
    runner: BlockRunner | None,
    evaluator: BlockRunner | None,
    plan: CompressionPlan,
    spill: FactorSpill | None,
    out_dir: str | Path,
    *,
    compensate: bool,
    floor: float,
    refine_steps: int,
    refine_lr: float,
    sparse_share: float,
    diagonals: Mapping[str, torch.Tensor],
    quantize: str | None,
    max_shard_size: int,
    progress: bool,
    on_block: Callable[[int], None] | None,
) -> StreamedCompression:
    """Cut, quantize and write block by block. ``spill`` holds the fitted factors; without it
    (a plan of plain factors, no ``runner`` of calibration windows) each planned matrix is
    decomposed in the cut, by the in-memory surgery."""
    writer = ShardWriter(out_dir, max_shard_size)
    # The parts outside the blocks are written as they are: counted once, on both sides.
    params_before = params_after = _outer_numbers(stream)
    _write_outer(stream, writer)
    dense_in = list(runner.hidden) if runner is not None else []
    ours = list(dense_in)
    eval_hidden = list(evaluator.hidden) if evaluator is not None else []
    refinement: list[dict[str, float]] = []
    bar = _bar(len(stream.blocks), "cut and write (streamed)", progress)
    with torch.no_grad(), bar:
        for index in range(len(stream.blocks)):
            prefix = stream.blocks[index]
            stream.load(stream.tensors_under([prefix]))
            block = stream.model.get_submodule(prefix)
            params_before += _stored_numbers(block)
            decisions = {
                _relative(d.module, prefix): d
                for d in plan
                if d.mode != "keep" and _in(d.module, prefix)
            }
            if compensate or refine_steps:
                dense = copy.deepcopy(block)
            if spill is None:
                apply_plan(
                    stream.model,
                    CompressionPlan.from_decisions(decisions.values()),
                    progress=False,
                    factorizer=sparse_factorizer(sparse_share) if sparse_share else factorize,
                )
            elif compensate and decisions:
                assert runner is not None
                for group in _input_groups(runner, index, block, ours[0], list(decisions)):
                    sums = _compensated_group(runner, index, dense, block, dense_in, ours, group)
                    for name in group:
                        gram, cross, n = sums.pop(name)
                        module = block.get_submodule(name)
                        full = f"{prefix}.{name}"
                        svd = compensated_svd(
                            weight_matrix(module),
                            gram,
                            cross,
                            n_samples=n,
                            damping=COMPENSATION_DAMPING,
                            floor=floor,
                            module=full,
                        )
                        if sparse_share:  # the residual is taken against the compensated target
                            module = _with_weight(module, svd)
                        replacement = _factorized(
                            module, decisions[name].rank, svd.as_tuple(), sparse_share, gram, full
                        )
                        set_submodule(block, name, replacement)
            else:
                for name, decision in decisions.items():
                    replacement = _factorized(
                        block.get_submodule(name),
                        decision.rank,
                        spill[decision.module],
                        sparse_share,
                        diagonals.get(decision.module),
                        decision.module,
                    )
                    set_submodule(block, name, replacement)
            if compensate or refine_steps:
                assert runner is not None
                dense_out = _carry(runner, index, dense, dense_in)
                if refine_steps:
                    refinement.append(
                        refine_block(
                            runner, index, block, ours, dense_out, steps=refine_steps, lr=refine_lr
                        )
                    )
                ours = _carry(runner, index, block, ours)
                dense_in = dense_out
                del dense
            if quantize == "int8":
                quantize_model_int8(
                    stream.model, [n for n in quantizable_modules(stream.model) if _in(n, prefix)]
                )
            if evaluator is not None:
                eval_hidden = _carry(evaluator, index, block, eval_hidden)
            for key, tensor in block.state_dict().items():
                writer.add(f"{prefix}.{key}", tensor)
            params_after += _stored_numbers(block)
            block.to("meta")
            if on_block is not None:
                on_block(index)
            _tick(bar)
    after = _perplexity(evaluator, eval_hidden) if evaluator is not None else None
    writer.close()
    return StreamedCompression(
        plan=plan,
        weight_bytes=writer.total_size,
        params_before=params_before,
        params_after=params_after,
        perplexity_after=after,
        refinement=refinement,
    )


def _outer_numbers(stream: BlockStream) -> int:
    """Numbers stored outside the blocks, a tensor shared by several names (a tied head) once."""
    sources = {stream.names[name] for name in stream.outer_tensors()}
    return sum(math.prod(stream.checkpoint.shape(source)) for source in sources)


def _stored_numbers(block: nn.Module) -> int:
    """Numbers the block stores: parameters and saved buffers (a sparse layer's indices)."""
    return sum(t.numel() for t in block.state_dict().values())


def _factorized(
    module: nn.Module,
    rank: int,
    svd: Any,
    sparse_share: float,
    gram: torch.Tensor | None,
    name: str,
) -> nn.Module:
    if sparse_share:
        return factorize_sparse(module, rank, sparse_share, gram=gram, svd=svd, name=name)
    return factorize(module, rank, svd=svd, name=name)


def _with_weight(module: nn.Module, svd: Any) -> nn.Module:
    """A copy of a linear ``module`` whose weight is ``svd``'s full-rank product."""
    proxy = copy.deepcopy(module)
    target = svd.U @ torch.diag(svd.s) @ svd.Vh
    weight = proxy.get_parameter("weight")
    with torch.no_grad():
        weight.copy_(target.T if isinstance(proxy, Conv1D) else target)
    return proxy


def _write_outer(stream: BlockStream, writer: ShardWriter) -> None:
    """The tensors outside the blocks, each checkpoint tensor once (a tied head is an alias)."""
    written: dict[str, str] = {}
    with stream.outer() as model:
        state = model.state_dict()
        for name in stream.outer_tensors():
            source = stream.names[name]
            if source in written:
                writer.alias(name, written[source])
                continue
            writer.add(name, state[name])
            written[source] = name


# ---------------------------------------------------------------------------------------------
# RMT-KD, block by block


@dataclass
class StreamedRMTKD:
    """What :func:`streamed_rmt_kd` decided, wrote and measured; ``result.model`` is the
    stream's skeleton with the cut layers' shapes (on the meta device)."""

    result: RMTKDResult
    weight_bytes: int
    perplexity_before: PerplexityResult | None = None
    perplexity_after: PerplexityResult | None = None


def streamed_rmt_kd(
    stream: BlockStream,
    calibration: torch.Tensor,
    out_dir: str | Path,
    *,
    sites: Sequence[WidthSite | str] | None = None,
    tau: float = 0.5,
    estimator: str = "mp_fit",
    floor: float = 0.05,
    validation: torch.Tensor | None = None,
    evaluation: torch.Tensor | None = None,
    max_shard_size: int = 1_000_000_000,
    seed: int = 0,
    progress: bool = True,
) -> StreamedRMTKD:
    """RMT-KD's width cuts on a streamed model, block by block; the weights are written to
    ``out_dir`` (an existing folder) shard by shard.

    For each block, on the inputs the already-cut blocks produce from the ``calibration``
    windows (``[n, T]`` ids, one window per batch): each of its sites' statistics, ``k`` by
    the rank rule and the stop rules of :func:`~laserrmt.methods.rmt_kd.rmt_kd` (``tau``,
    ``estimator``, ``floor``), the cut, then the windows carried through the cut block to the
    next. Sites must lie inside one block (MLP widths, and a BERT-style encoder's attention
    widths, measured in the order the block runs them); the residual stream spans the whole
    model and is refused.

    There is no distillation after each cut and no revert (both need the whole model): the
    cuts are those of ``rmt_kd(..., steps_per_cut=0)`` with a tolerance no cut exceeds, and
    every judged cut is ``"kept"``. Heal the written model at the end instead, as the streamed
    budget method does (:func:`streamed_teacher` before the cut,
    :func:`laserrmt.pipeline.heal_saved` after). The records' per-cut metrics are NaN;
    ``validation`` windows give the result's ``baseline_metric`` and ``final_metric``
    (``−mean NLL``, as :func:`~laserrmt.methods.rmt_kd.run_rmt_kd` measures), ``evaluation``
    windows the perplexity before and after. :func:`laserrmt.surgery.io.write_compressed` with
    ``weights_written=True`` adds the configuration and metadata.

    Raises:
        InvalidOptionError: bad options, an unknown site, or a site outside the blocks.
    """
    check_options(tau=tau, estimator=estimator, floor=floor, tolerance=None, steps=0, lr=1.0)
    started = time.perf_counter()
    model = stream.model
    site_list = _resolve_sites(model, sites)
    in_block = [_site_block(stream, site) for site in site_list]
    settings = {
        "sites": [s.name for s in site_list],
        "tau": tau,
        "estimator": estimator,
        "floor": floor,
        "steps_per_cut": 0,
        "seed": seed,
        "stream": True,
    }
    # Counted once, then by the cuts' differences: writing the outer parts unties a tied head
    # in the skeleton, which would count it twice.
    parameters_before = params = _parameters(model)
    runner = BlockRunner(stream, calibration)
    hidden = list(runner.hidden)
    # Held-out windows go through each block twice: as it was (the dense model) and as cut.
    held = {
        key: BlockRunner(stream, windows)
        for key, windows in (("validation", validation), ("evaluation", evaluation))
        if windows is not None
    }
    dense = {key: list(r.hidden) for key, r in held.items()}
    ours = {key: list(r.hidden) for key, r in held.items()}
    records: list[SiteRecord] = []
    decisions = []
    writer = ShardWriter(out_dir, max_shard_size)
    _write_outer(stream, writer)
    bar = _bar(len(stream.blocks), "rmt-kd cut and write (streamed)", progress)
    with torch.no_grad(), bar:
        for index, prefix in enumerate(stream.blocks):
            stream.load(stream.tensors_under([prefix]))
            block = model.get_submodule(prefix)
            for key, r in held.items():
                dense[key] = _carry(r, index, block, dense[key])
            for position, site in enumerate(site_list):
                if in_block[position] != index:
                    continue
                t0 = time.perf_counter()
                watch = SiteWatch(model, [site])
                with attached(watch.hooks):
                    for w, h in enumerate(hidden):
                        runner.call(index, block, w, h)
                stats = watch.statistics()[site.name]
                choice = site_rank(model, site, stats, tau=tau, estimator=estimator)
                record = judged(position, site, choice, params, math.nan, floor, seed + position)
                if record.status == "cut":
                    cut = cut_width(model, site, stats, int(choice.rank))
                    params += cut.parameters_after - cut.parameters_before
                    record.k, record.parameters_after = cut.width_after, params
                    record.status = "kept"
                    decisions.append(width_decision(site, cut.width_after, cut.kept, record))
                record.wall_s = time.perf_counter() - t0
                records.append(record)
            hidden = _carry(runner, index, block, hidden)
            for key, r in held.items():
                ours[key] = _carry(r, index, block, ours[key])
            for key, tensor in block.state_dict().items():
                writer.add(f"{prefix}.{key}", tensor)
            block.to("meta")
            return_freed_memory()
            _tick(bar)
    writer.close()
    before = {key: _perplexity(r, dense[key]) for key, r in held.items()}
    after = {key: _perplexity(r, ours[key]) for key, r in held.items()}
    batches = list(calibration.split(1))
    result = RMTKDResult(
        model=model,
        records=records,
        baseline_metric=-before["validation"].nll if "validation" in before else math.nan,
        final_metric=-after["validation"].nll if "validation" in after else math.nan,
        parameters_before=parameters_before,
        parameters_after=params,
        settings=settings,
        wall_s=time.perf_counter() - started,
        sites=site_list,
        plan=WidthPlan(
            decisions,
            "rmt-kd",
            settings,
            {"fingerprint": batches_fingerprint(batches), "batches": len(batches)},
        ),
    )
    return StreamedRMTKD(
        result, writer.total_size, before.get("evaluation"), after.get("evaluation")
    )


def _site_block(stream: BlockStream, site: WidthSite) -> int:
    """The block that holds every module of ``site``."""
    modules = (*site.producers, *site.followers, site.consumer)
    for index, prefix in enumerate(stream.blocks):
        if all(_in(name, prefix) for name in modules):
            return index
    raise InvalidOptionError(
        f"width site {site.name} ({site.kind}) is not inside one transformer block, and the "
        "streamed RMT-KD cuts one block at a time; leave it out of --sites, or drop --stream"
    )
