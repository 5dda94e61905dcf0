"""One process of the two-process run of tests/test_distributed.py (launched by torchrun).

Each process heals the same compressed tiny Llama (through ``compress``, as the CLI does) and
distils a small classifier, data-parallel, once replicated (DDP) and once sharded (FSDP), and
saves what it ended with for the test to compare with a single-process run of the same global
batches, with the parameter elements the optimizer of each sharded run held in this process.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from laserrmt.distill import distill, init_distributed
from laserrmt.errors import InvalidOptionError
from laserrmt.pipeline import compress
from small_text import small_calibration_split
from tiny_models import tiny_llama, tiny_tokenizer

# Global batches of 3 windows, two accumulated a step: split 1 + 2 over two processes, so a
# per-process or per-batch mean (instead of the step's global one) would weight the windows
# differently and show in the result; the norms and adapters train too, as they would.
HEALING: dict[str, Any] = {
    "method": "budget",
    "target_params": 0.4,
    "importance": "none",
    "calibration_windows": 3,
    "window": 32,
    "heal_steps": 3,
    "heal_lr": 1e-3,
    "heal_batch_size": 3,
    "heal_accumulate": 2,
    "heal_params": "factors+norms+lora",
    "heal_top_k": 16,
    "progress": False,
}


def healed_llama(**overrides: Any) -> dict[str, torch.Tensor]:
    with small_calibration_split():
        model, _ = compress(
            tiny_llama(initializer_range=0.15), tiny_tokenizer(), **HEALING, **overrides
        )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def distilled_classifier(shard: bool = False) -> dict[str, torch.Tensor]:
    """RMT-KD's form of batches: (inputs, labels) pairs of 5 rows (3 + 2), one label ignored."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen))]
    batches.append((torch.randn(5, 6, generator=gen), torch.tensor([0, 2, -100, 1, 1])))
    student = _mlp(1)
    distill(
        student,
        _mlp(0),
        batches,
        steps=4,
        lr=1e-2,
        task="classification",
        progress=False,
        shard=shard,
    )
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


@contextmanager
def optimizer_holdings() -> Iterator[list[tuple[int, int]]]:
    """While open, every AdamW built appends (elements it holds here, elements in all): what a
    process keeps of the parameters, their gradients and both moments."""
    built: list[tuple[int, int]] = []
    adamw = torch.optim.AdamW

    class Recording(adamw):  # type: ignore[misc,valid-type]
        def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
            params = list(params)
            local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
            built.append((sum(t.numel() for t in local), sum(p.numel() for p in params)))
            super().__init__(params, *args, **kwargs)

    torch.optim.AdamW = Recording  # type: ignore[misc]
    try:
        yield built
    finally:
        torch.optim.AdamW = adamw  # type: ignore[misc]


def refusal_of_a_batch_smaller_than_the_processes() -> str:
    one_row = [(torch.randn(1, 6), torch.tensor([1]))]
    try:
        distill(_mlp(1), _mlp(0), one_row, steps=1, lr=1e-2, task="classification")
    except InvalidOptionError as error:
        return str(error)
    return ""


if __name__ == "__main__":
    if not init_distributed():
        sys.exit("run this under torchrun with --nproc_per_node 2")
    rank = torch.distributed.get_rank()
    results: dict[str, Any] = {
        "llama": healed_llama(),
        "classifier": distilled_classifier(),
        "refusal": refusal_of_a_batch_smaller_than_the_processes(),
    }
    with optimizer_holdings() as held:
        results["llama_fsdp"] = healed_llama(heal_fsdp=True)
        results["classifier_fsdp"] = distilled_classifier(shard=True)
    results["held"] = held
    torch.save(results, Path(sys.argv[1]) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
