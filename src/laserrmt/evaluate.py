"""Measurements of a model: perplexity, parameters, size, peak memory and latency.

* :func:`perplexity` — the pinned protocol's metric (see :mod:`laserrmt.data.text`).
* :func:`count_parameters`, :func:`~laserrmt.surgery.io.weight_bytes`, :func:`size_on_disk` — what the model stores.
* :func:`peak_memory_bytes`, :func:`track_peak_memory` — resident memory of this process.
* :func:`measure_latency` (causal LMs: prefill and cached greedy decode) and
  :func:`measure_forward_latency` (any model: one forward pass).
* :func:`evaluate_model` — all of the above in one :class:`EvaluationResult`.

Every measurement runs under ``torch.inference_mode`` with the model in eval mode (dropout off);
the model's own training flag is restored afterwards. Latency numbers are medians of repeated
runs after warm-up runs; they depend on the machine and its load, so compare models only with
numbers taken side by side in one process on one machine.
"""

from __future__ import annotations

import inspect
import math
import os
import resource
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from laserrmt.data.sources import TextSource
from laserrmt.errors import (
    DataError,
    InvalidOptionError,
    ModelLoadError,
    NumericalError,
    TargetSelectionError,
)
from laserrmt.models.placement import model_device, place_model
from laserrmt.stats.forward import eval_mode, output_logits
from laserrmt.surgery.io import weight_bytes

#: File suffixes that hold weights, for ``size_on_disk(..., weights_only=True)``.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

# Rows of logits turned into float32 log-probabilities at a time: bounds the float32 copy of
# half-precision logits (and cross-entropy's own buffer) to about 256 MB for any vocabulary.
_LOGIT_ELEMENTS_PER_CHUNK = 1 << 26


# ---------------------------------------------------------------------------------------------
# shared helpers


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: a timer read without a sync measures the launch only.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidOptionError(f"{name}={value!r}: must be an integer ≥ {minimum}")


def _vocab_size(model: nn.Module, vocab_size: int | None) -> int:
    if vocab_size is not None:
        _check_count("vocab_size", vocab_size, 1)
        return vocab_size
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not size:
        raise InvalidOptionError(
            "the model has no config.vocab_size to draw synthetic token ids from; pass vocab_size="
        )
    return int(size)


# ---------------------------------------------------------------------------------------------
# perplexity


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(nll)``; ``nll`` is the mean negative log-likelihood per predicted
    token in nats, over ``tokens`` predicted tokens."""

    perplexity: float
    nll: float
    tokens: int


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL of ``targets`` [N] under ``logits`` [N, V], log-softmax in float32 by chunks."""
    rows = max(1, _LOGIT_ELEMENTS_PER_CHUNK // logits.shape[-1])
    total = 0.0
    for start in range(0, logits.shape[0], rows):
        chunk = logits[start : start + rows].float()
        total += float(F.cross_entropy(chunk, targets[start : start + rows], reduction="sum"))
    return total


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of a causal LM on token windows, as the pinned protocol defines it.

    Each window is one independent sequence: the logits at position ``t`` predict token
    ``t + 1``, so a window of ``T`` tokens contributes ``T − 1`` predicted tokens and its first
    token is context only. The result is ``exp`` of the token-weighted mean negative
    log-likelihood over all predicted tokens of all windows (log-softmax in float32, sums in
    float64).

    Args:
        model: a causal LM returning logits ``[batch, T, vocab]`` (``.logits``, a tensor, or the
            first element of a tuple).
        windows: ``[n, T]`` integer token ids, ``T ≥ 2`` (e.g. from
            :func:`laserrmt.data.text.evaluation_windows`).
        batch_size: windows per forward pass; the result does not depend on it.
        progress: show a tqdm bar on stderr.
        desc: the bar's label.

    Raises:
        DataError: ``windows`` is not a non-empty ``[n, T ≥ 2]`` integer tensor.
        NumericalError: the model's logits give a NaN or infinite likelihood.
    """
    if (
        not isinstance(windows, torch.Tensor)
        or windows.dim() != 2
        or windows.dtype.is_floating_point
        or windows.dtype.is_complex
        or windows.dtype == torch.bool
        or windows.shape[0] < 1
        or windows.shape[1] < 2
    ):
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows)
        raise DataError(
            f"perplexity needs token windows as an integer tensor [n ≥ 1, T ≥ 2], got {shape}; "
            "cut text with laserrmt.data.text.token_windows"
        )
    _check_count("batch_size", batch_size, 1)
    from transformers import PreTrainedModel

    device = model_device(model)
    # No KV cache: each window is scored in one pass, and a cache would only cost memory.
    kwargs = {"use_cache": False} if isinstance(model, PreTrainedModel) else {}
    total, tokens = 0.0, 0
    with (
        eval_mode(model),
        torch.inference_mode(),
        tqdm(total=windows.shape[0], desc=desc, unit="window", disable=not progress) as bar,
    ):
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device=device, dtype=torch.long)
            logits = output_logits(model(ids, **kwargs))
            vocab = logits.shape[-1]
            nll = _nll_sum(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
            if not math.isfinite(nll):
                raise NumericalError(
                    f"the likelihood of windows {start}–{start + ids.shape[0] - 1} is {nll}: the "
                    "model's logits hold NaN or Inf; check the weights (or a compression step) "
                    "for non-finite values"
                )
            total += nll
            tokens += ids.shape[0] * (ids.shape[1] - 1)
            bar.update(ids.shape[0])
    mean = total / tokens
    return PerplexityResult(math.exp(mean), mean, tokens)


# ---------------------------------------------------------------------------------------------
# parameters and size


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Equal for tensors that are the same memory (tied weights), different otherwise."""
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        pointer = 0
    if pointer == 0:  # meta or empty tensors have no memory to compare: tell them apart by id
        return ("object", id(tensor))
    return (
        str(tensor.device),
        pointer,
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
    )


def _unique_tensors(tensors: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    seen: set[tuple[Any, ...]] = set()
    for tensor in tensors:
        key = _storage_key(tensor)
        if key not in seen:
            seen.add(key)
            yield tensor


def _weight_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Parameters plus int8 weight buffers (int8-quantized weights are buffers, not parameters)
    and int32 ones (the sparse indices of low rank plus sparse layers are stored numbers too)."""
    yield from module.parameters()
    yield from (b for b in module.buffers() if b.dtype in (torch.int8, torch.int32))


def count_parameters(model: nn.Module, target_names: Iterable[str] | None = None) -> dict[str, int]:
    """Count the weights a model stores, each distinct tensor once.

    Tied weights (an LM head sharing the embedding) are counted once: tensors are identified by
    their memory, not their names. int8 weight buffers and int32 sparse indices count as weights.

    Args:
        model: any module.
        target_names: full dotted module names (as in ``model.named_modules()``); the
            parameters of these modules (for a compressed module, its factors) are counted as
            ``params_targets``, each distinct tensor once.

    Returns:
        ``{"params_total": ..., "params_targets": ...}`` (``params_targets`` is 0 without names).

    Raises:
        TargetSelectionError: a name is not a module of ``model``.
    """
    total = sum(t.numel() for t in _unique_tensors(_weight_tensors(model)))
    targets = 0
    if target_names is not None:
        modules = []
        for name in target_names:
            try:
                modules.append(model.get_submodule(name))
            except AttributeError:
                raise TargetSelectionError(
                    f"{name!r} is not a module of this model; use names from model.named_modules()"
                ) from None
        targets = sum(
            t.numel() for t in _unique_tensors(x for m in modules for x in _weight_tensors(m))
        )
    return {"params_total": total, "params_targets": targets}


def size_on_disk(path: str | os.PathLike[str], *, weights_only: bool = False) -> int:
    """Bytes on disk of a saved model: a file, or every file in a folder and its subfolders.

    Symbolic links are followed (a Hugging Face cache snapshot links to its blobs). With
    ``weights_only`` a folder counts only its weight files (suffixes in
    :data:`WEIGHT_FILE_SUFFIXES`), which leaves out tokenizer, config and report files; use it
    to compare with :func:`~laserrmt.surgery.io.weight_bytes` or between folders that differ in such files.

    Raises:
        ModelLoadError: the path does not exist.
    """
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        raise ModelLoadError(f"{p} does not exist; pass a saved model's file or folder")
    return sum(
        f.stat().st_size
        for f in p.rglob("*")
        if f.is_file() and (not weights_only or f.suffix in WEIGHT_FILE_SUFFIXES)
    )


# ---------------------------------------------------------------------------------------------
# memory


def peak_memory_bytes() -> int:
    """Peak resident memory of this whole process so far (``getrusage`` ``ru_maxrss``).

    Process-wide and monotonic: it includes everything the process did before (loading models,
    other evaluations), so it is an upper bound for any one step. Use
    :func:`track_peak_memory` to measure a block.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB else


_STATM = Path("/proc/self/statm")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _current_rss() -> int:
    with _STATM.open() as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``); False where the kernel refuses."""
    try:
        _CLEAR_REFS.write_text("5")  # Linux >= 4.0: "5" resets the peak resident set size
    except OSError:
        return False
    return True


def _high_water_mark() -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line")


@contextmanager
def track_peak_memory(interval_s: float = 0.01) -> Iterator[dict[str, Any]]:
    """Measure the peak resident memory of this process during a ``with`` block.

    On Linux the kernel's own peak counter (``VmHWM``) is reset on entry and read on exit, so
    no peak is missed; ``source`` is then ``"VmHWM"``. Resetting it is process-wide: a
    measurement nested inside another one shortens the outer one's view. Where the kernel
    refuses the reset, a background thread reads the resident set size from
    ``/proc/self/statm`` every ``interval_s`` seconds (torch releases the GIL in its kernels,
    so it keeps sampling during long operations) and a peak shorter than the interval can be
    missed; ``source`` is then ``"/proc/self/statm"``. The yielded dict is filled in when
    the block ends::

        with track_peak_memory() as memory:
            ...
        memory["growth_bytes"]  # peak_bytes - start_bytes

    Keys: ``start_bytes`` (RSS on entry), ``peak_bytes`` (highest RSS, process-wide),
    ``growth_bytes`` and ``source``. Without ``/proc`` (macOS) the numbers come from
    ``ru_maxrss``, which sees growth only above the process's earlier peak; ``source`` then
    says ``"ru_maxrss"`` and a warning is issued.
    """
    if interval_s <= 0:
        raise InvalidOptionError(f"interval_s={interval_s}: must be > 0")
    result: dict[str, Any] = {"start_bytes": 0, "peak_bytes": 0, "growth_bytes": 0}
    if not _STATM.exists():
        warnings.warn(
            "/proc/self/statm is unavailable: memory growth is measured from ru_maxrss and is "
            "only seen above this process's earlier peak",
            RuntimeWarning,
            stacklevel=3,
        )
        result.update(source="ru_maxrss", start_bytes=peak_memory_bytes())
        try:
            yield result
        finally:
            result["peak_bytes"] = peak_memory_bytes()
            result["growth_bytes"] = result["peak_bytes"] - result["start_bytes"]
        return

    start = _current_rss()
    result.update(start_bytes=start, peak_bytes=start)
    if _reset_high_water_mark():
        result["source"] = "VmHWM"
        try:
            yield result
        finally:
            result["peak_bytes"] = max(start, _high_water_mark())
            result["growth_bytes"] = result["peak_bytes"] - start
        return

    result["source"] = "/proc/self/statm"
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak_bytes"] = max(result["peak_bytes"], _current_rss())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, name="laserrmt-memory", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_bytes"] = max(result["peak_bytes"], _current_rss())
        result["growth_bytes"] = result["peak_bytes"] - result["start_bytes"]


# ---------------------------------------------------------------------------------------------
# latency


@dataclass
class LatencyResult:
    """Batch-1 generation speed: medians over ``repeats`` runs, and every run.

    ``prefill_ms`` is the time of one forward pass over the ``prompt_tokens`` prompt, building
    the KV cache. ``decode_tokens_per_s`` is ``new_tokens`` divided by the time of the
    ``new_tokens`` cached single-token forward passes that follow (prefill excluded).
    """

    prefill_ms: float
    decode_tokens_per_s: float
    prefill_ms_runs: list[float] = field(default_factory=list)
    decode_runs: list[float] = field(default_factory=list)
    repeats: int = 0
    warmup: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed_runs(run: Callable[[], Any], repeats: int, warmup: int) -> list[Any]:
    """The results of ``repeats`` calls of ``run`` after ``warmup`` discarded ones."""
    for _ in range(warmup):
        run()
    return [run() for _ in range(repeats)]


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def measure_latency(
    model: nn.Module,
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    vocab_size: int | None = None,
    seed: int = 0,
) -> LatencyResult:
    """Batch-1 latency of a causal LM: prefill of a prompt, then greedy decoding with the cache.

    The prompt is ``prompt_tokens`` token ids drawn uniformly from the vocabulary with a
    ``torch.Generator`` seeded with ``seed`` (the same prompt for every run and every model of
    the same vocabulary). Each run is:

    1. *prefill*: one forward pass over the prompt with ``use_cache=True``;
    2. *decode*: ``new_tokens`` steps, each one forward pass of the previous step's argmax
       token with the KV cache from the step before.

    The loop calls the model's forward directly rather than ``generate``, so the numbers time
    the network, not sampling logic, stopping criteria or logits processors. The first
    ``warmup`` runs are discarded (allocator and kernel warm-up); the medians of the remaining
    ``repeats`` runs are reported, with every run kept in the result.

    Raises:
        InvalidOptionError: a count is out of range, the vocabulary size is unknown, or the
            model returns no KV cache (use :func:`measure_forward_latency` for such models).
    """
    _check_count("prompt_tokens", prompt_tokens, 1)
    _check_count("new_tokens", new_tokens, 1)
    _check_count("repeats", repeats, 1)
    _check_count("warmup", warmup, 0)
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(
        0, _vocab_size(model, vocab_size), (1, prompt_tokens), generator=generator
    ).to(device)

    # transformers ≥ 5.23 names the KV cache `cache`; earlier releases `past_key_values`.
    forward_arguments = inspect.signature(model.forward).parameters
    cache_argument = "cache" if "cache" in forward_arguments else "past_key_values"

    def run() -> tuple[float, float]:
        _synchronize(device)
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        token = output_logits(out)[:, -1:].argmax(-1)
        _synchronize(device)
        prefilled = time.perf_counter()
        cache = _returned_cache(out)
        if cache is None:
            raise InvalidOptionError(
                "the model returned no KV cache, so cached decoding cannot be timed; use "
                "measure_forward_latency for models that are not causal LMs"
            )
        for _ in range(new_tokens):
            out = model(token, use_cache=True, **{cache_argument: cache})
            cache, token = _returned_cache(out), output_logits(out)[:, -1:].argmax(-1)
        _synchronize(device)
        end = time.perf_counter()
        return (prefilled - start) * 1e3, new_tokens / (end - prefilled)

    with eval_mode(model), torch.inference_mode():
        runs = _timed_runs(run, repeats, warmup)
    prefill = [p for p, _ in runs]
    decode = [d for _, d in runs]
    return LatencyResult(
        prefill_ms=statistics.median(prefill),
        decode_tokens_per_s=statistics.median(decode),
        prefill_ms_runs=prefill,
        decode_runs=decode,
        repeats=repeats,
        warmup=warmup,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
    )


def measure_forward_latency(
    model: nn.Module,
    *,
    seq_len: int = 128,
    batch_size: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    inputs: torch.Tensor | Mapping[str, Any] | None = None,
) -> float:
    """Median milliseconds of one forward pass: the latency measure for encoders and classifiers.

    By default the input is ``[batch_size, seq_len]`` token ids drawn uniformly from the
    vocabulary with a ``torch.Generator`` seeded with ``seed``. Pass ``inputs`` (a tensor, or a
    dict of keyword arguments such as ``input_ids`` and ``attention_mask``) for other models,
    e.g. an image batch for a CNN; ``seq_len``, ``batch_size`` and ``vocab_size`` are then
    unused. The first ``warmup`` passes are discarded; the median of ``repeats`` is returned.
    """
    _check_count("repeats", repeats, 1)
    _check_count("warmup", warmup, 0)
    device = model_device(model)
    if inputs is None:
        _check_count("seq_len", seq_len, 1)
        _check_count("batch_size", batch_size, 1)
        generator = torch.Generator().manual_seed(seed)
        vocab = _vocab_size(model, vocab_size)
        inputs = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    if isinstance(inputs, Mapping):
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        args: tuple[Any, ...] = ()
    else:
        kwargs, args = {}, (inputs.to(device),)

    def run() -> float:
        _synchronize(device)
        start = time.perf_counter()
        model(*args, **kwargs)
        _synchronize(device)
        return (time.perf_counter() - start) * 1e3

    with eval_mode(model), torch.inference_mode():
        return statistics.median(_timed_runs(run, repeats, warmup))


# ---------------------------------------------------------------------------------------------
# everything at once


@dataclass
class EvaluationResult:
    """What ``laserrmt evaluate`` reports for one model.

    Attributes:
        perplexity: under ``protocol`` (``None`` never occurs today; kept for JSON readers).
        nll: mean negative log-likelihood per predicted token, nats.
        eval_tokens: predicted tokens scored (``eval_windows × (window − 1)``).
        eval_windows: windows scored.
        params_total / params_targets: see :func:`count_parameters`.
        size_bytes: bytes of the weights; ``size_source`` says how they were measured.
        prefill_ms / decode_tokens_per_s: medians from :func:`measure_latency` (``None`` when
            latency was not measured); ``latency`` holds every run and the settings.
        peak_memory_bytes: the highest resident memory of the whole process seen while the
            evaluation ran (model weights included); ``memory_growth_bytes`` is its growth
            over the resident memory at the start of the evaluation.
        protocol: how the windows were made (the pinned :data:`~laserrmt.data.text.PROTOCOL`
            with the number of windows actually used, or a description of other text);
            ``protocol["pinned"]`` is true only for the unmodified pinned protocol.
        wall_s: seconds the whole evaluation took.
    """

    perplexity: float | None
    nll: float | None
    eval_tokens: int
    eval_windows: int
    params_total: int
    params_targets: int
    size_bytes: int
    size_source: str
    prefill_ms: float | None
    decode_tokens_per_s: float | None
    peak_memory_bytes: int
    memory_growth_bytes: int
    protocol: dict[str, Any]
    latency: dict[str, Any] | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable values."""
        return asdict(self)


def _windows_and_protocol(
    tokenizer: Any,
    windows: torch.Tensor | None,
    n_windows: int,
    text_file: str | os.PathLike[str] | None,
    data: TextSource | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    from laserrmt.data.text import PROTOCOL, WINDOW, evaluation_windows, text_file_windows

    if sum(x is not None for x in (windows, text_file, data)) > 1:
        raise InvalidOptionError("pass only one of windows=, text_file= and data= (not both)")
    if windows is not None:
        return windows, {
            "name": "custom-windows",
            "window": int(windows.shape[-1]),
            "n_windows": int(windows.shape[0]),
            "pinned": False,
        }
    if tokenizer is None:
        raise DataError(
            "perplexity needs the model's tokenizer and none was found; save the tokenizer "
            "with the model or pass token windows"
        )
    _check_count("n_windows", n_windows, 1)
    if text_file is not None:
        # A user's file may be short: use the windows it has, up to n_windows.
        windows = text_file_windows(text_file, tokenizer, n_windows=None)[:n_windows]
        return windows, {
            "name": "text-file",
            "text_file": str(text_file),
            "window": WINDOW,
            "n_windows": int(windows.shape[0]),
            "tokenization": "the whole file once, without special tokens",
            "selection": "first n_windows non-overlapping windows",
            "pinned": False,
        }
    if data is not None:
        windows = data.windows(tokenizer, n_windows=None)[:n_windows]
        return windows, {
            "name": "user-data",
            "data": data.to_dict(),
            "window": WINDOW,
            "n_windows": int(windows.shape[0]),
            "tokenization": "documents joined with a blank line, once, without special tokens",
            "selection": "first n_windows non-overlapping windows",
            "pinned": False,
        }
    windows = evaluation_windows(tokenizer, n_windows=n_windows)
    protocol = dict(PROTOCOL, n_windows=n_windows)
    protocol["pinned"] = n_windows == PROTOCOL["n_windows"]
    return windows, protocol


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    windows: torch.Tensor | None = None,
    n_windows: int = 32,
    text_file: str | os.PathLike[str] | None = None,
    data: TextSource | None = None,
    target_names: Iterable[str] | None = None,
    saved_path: str | os.PathLike[str] | None = None,
    latency: bool = True,
    latency_repeats: int = 5,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Everything ``laserrmt evaluate`` reports, under the pinned protocol unless told otherwise.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (unused when ``windows`` is given).
        windows: token windows to score instead of the protocol's.
        n_windows: windows of the pinned evaluation split (32 is the pinned number), or at
            most this many windows of ``text_file``.
        text_file: a UTF-8 text file to evaluate on instead of the pinned split.
        data: a user's text (:func:`laserrmt.data.sources.open_text_source`) to evaluate on
            instead of the pinned split; at most ``n_windows`` of its windows, in order.
        target_names: module names counted as ``params_targets``.
        saved_path: the saved model; ``size_bytes`` is then the size of its weight files on
            disk (:func:`size_on_disk` with ``weights_only=True``), else the bytes of the
            state dict's distinct tensors in memory (:func:`~laserrmt.surgery.io.weight_bytes`).
        latency: measure :func:`measure_latency` (prompt 128, 32 new tokens).
        latency_repeats: measured runs after one warm-up run.
        device, dtype: move and cast ``model`` in place first
            (:func:`~laserrmt.models.placement.place_model`; ``None``: as it is).
        progress: show a progress bar on stderr.

    Raises:
        DataError: no tokenizer and no windows, or unusable text.
        NumericalError: the model's logits are not finite.
    """
    started = time.perf_counter()
    place_model(model, device, dtype)
    windows, protocol = _windows_and_protocol(tokenizer, windows, n_windows, text_file, data)
    with track_peak_memory() as memory:
        ppl = perplexity(model, windows, progress=progress)
        timing = measure_latency(model, repeats=latency_repeats) if latency else None
    counts = count_parameters(model, target_names)
    if saved_path is not None:
        size = size_on_disk(saved_path, weights_only=True)
        source = "weight files on disk"
    else:
        size, source = weight_bytes(model), "state dict in memory"
    return EvaluationResult(
        perplexity=ppl.perplexity,
        nll=ppl.nll,
        eval_tokens=ppl.tokens,
        eval_windows=int(windows.shape[0]),
        params_total=counts["params_total"],
        params_targets=counts["params_targets"],
        size_bytes=size,
        size_source=source,
        prefill_ms=timing.prefill_ms if timing else None,
        decode_tokens_per_s=timing.decode_tokens_per_s if timing else None,
        peak_memory_bytes=int(memory["peak_bytes"]),
        memory_growth_bytes=int(memory["growth_bytes"]),
        protocol=protocol,
        latency=timing.to_dict() if timing else None,
        wall_s=time.perf_counter() - started,
    )
