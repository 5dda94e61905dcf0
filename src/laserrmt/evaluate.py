"""Measurements: perplexity, parameters, size, peak memory and CPU latency.

Latency numbers are medians of repeated runs after a warm-up; compare models only with numbers
taken side by side in one run on one machine.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from laserrmt.errors import DataError, NumericalError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int


@torch.inference_mode()
def perplexity(
    model: nn.Module, windows: torch.Tensor, *, progress: bool = True, desc: str = "perplexity"
) -> PerplexityResult:
    """exp of the token-weighted mean NLL of every predicted token (window − 1 per window)."""
    total, tokens = 0.0, 0
    for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
        ids = window.unsqueeze(0)
        logits = model(ids).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        tokens += ids.shape[1] - 1
    nll = total / tokens
    if not math.isfinite(nll):
        raise NumericalError(
            f"perplexity is not finite (mean NLL {nll}): the model's logits hold NaN or Inf"
        )
    return PerplexityResult(math.exp(nll), nll, tokens)


def _unique_tensors(tensors: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            yield t


def _weight_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Parameters plus integer weight buffers (int8 weights are buffers, not parameters)."""
    yield from module.parameters()
    yield from (b for b in module.buffers() if not b.is_floating_point() and b.dtype == torch.int8)


def count_parameters(model: nn.Module, target_names: Iterable[str] | None = None) -> dict[str, int]:
    """Weights stored (tied weights once; int8 weight buffers count as weights)."""
    total = sum(t.numel() for t in _unique_tensors(_weight_tensors(model)))
    targets = 0
    if target_names is not None:
        modules = [model.get_submodule(n) for n in target_names]
        targets = sum(
            t.numel() for t in _unique_tensors(x for m in modules for x in _weight_tensors(m))
        )
    return {"params_total": total, "params_targets": targets}


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the state dict's distinct tensors: what a safetensors file of it holds."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model.state_dict().values()))


def size_on_disk(path: str | os.PathLike[str]) -> int:
    """Bytes of a file, or of the weights files (*.safetensors, *.bin, *.gguf) in a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(
        f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf")
    )


def peak_memory_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss, process-wide)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def track_peak_memory() -> Iterator[dict[str, int]]:
    """Peak resident-set growth during the block, sampled every 10 ms from /proc/self/statm."""
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * page

    result = {"start_bytes": rss(), "peak_bytes": rss(), "growth_bytes": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak_bytes"] = max(result["peak_bytes"], rss())
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_bytes"] = max(result["peak_bytes"], rss())
        result["growth_bytes"] = result["peak_bytes"] - result["start_bytes"]


@dataclass
class LatencyResult:
    prefill_ms: float
    decode_tokens_per_s: float
    prefill_ms_runs: list[float] = field(default_factory=list)
    decode_runs: list[float] = field(default_factory=list)
    repeats: int = 0


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if not size:
        raise ValueError("the model has no config.vocab_size; pass vocab_size=")
    return int(size)


@torch.inference_mode()
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
    """Batch-1 CPU latency of a causal LM: prefill of a prompt, then greedy decode with the cache.

    Decode is a loop over the model's forward with ``past_key_values`` (no ``generate``
    machinery, no sampling), so tokens/s measures the layers, not the wrapper.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size or _vocab_size(model), (1, prompt_tokens), generator=gen)
    prefill, decode = [], []
    for run in range(warmup + repeats):
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        mid = time.perf_counter()
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        end = time.perf_counter()
        if run >= warmup:
            prefill.append((mid - start) * 1e3)
            decode.append(new_tokens / (end - mid))
    return LatencyResult(
        statistics.median(prefill), statistics.median(decode), prefill, decode, repeats
    )


@torch.inference_mode()
def measure_forward_latency(
    model: nn.Module, inputs: Any, *, repeats: int = 10, warmup: int = 2
) -> float:
    """Median ms of one forward pass on ``inputs`` (a tensor or a dict of model arguments)."""
    times = []
    for run in range(warmup + repeats):
        start = time.perf_counter()
        model(**inputs) if isinstance(inputs, dict) else model(inputs)
        if run >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass
class EvaluationResult:
    perplexity: float | None
    eval_tokens: int
    eval_windows: int
    params_total: int
    params_targets: int
    size_bytes: int
    size_source: str
    prefill_ms: float | None
    decode_tokens_per_s: float | None
    peak_memory_bytes: int
    protocol: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    windows: torch.Tensor | None = None,
    n_windows: int = 32,
    text_file: str | os.PathLike[str] | None = None,
    target_names: Iterable[str] | None = None,
    saved_path: str | os.PathLike[str] | None = None,
    latency: bool = True,
    latency_repeats: int = 5,
    progress: bool = True,
) -> EvaluationResult:
    """Everything ``laserrmt evaluate`` reports, under the pinned protocol unless told otherwise.

    ``size_bytes`` is the weights files' size on disk when ``saved_path`` is given, else the
    bytes of the state dict's distinct tensors (``size_source`` says which).
    """
    from laserrmt.data.text import PROTOCOL, evaluation_windows, text_file_windows

    if windows is None:
        if tokenizer is None:
            raise DataError(
                "perplexity needs the model's tokenizer and the model folder has none; save the tokenizer with the model"
            )
        windows = (
            text_file_windows(text_file, tokenizer, n_windows=None)[:n_windows]
            if text_file is not None
            else evaluation_windows(tokenizer, n_windows=n_windows)
        )
    protocol = dict(PROTOCOL, text_file=str(text_file)) if text_file else dict(PROTOCOL)
    protocol["evaluation_windows"] = int(windows.shape[0])
    ppl = perplexity(model, windows, progress=progress)
    counts = count_parameters(model, target_names)
    if saved_path is not None:
        size, source = size_on_disk(saved_path), "weights files on disk"
    else:
        size, source = weights_bytes(model), "state dict in memory"
    timing = measure_latency(model, repeats=latency_repeats) if latency else None
    return EvaluationResult(
        perplexity=ppl.perplexity,
        eval_tokens=ppl.tokens,
        eval_windows=int(windows.shape[0]),
        params_total=counts["params_total"],
        params_targets=counts["params_targets"],
        size_bytes=size,
        size_source=source,
        prefill_ms=timing.prefill_ms if timing else None,
        decode_tokens_per_s=timing.decode_tokens_per_s if timing else None,
        peak_memory_bytes=peak_memory_bytes(),
        protocol=protocol,
    )
