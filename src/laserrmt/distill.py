"""Self-distillation: the loss and a small trainer, shared by RMT-KD and the healing of low-rank models.

The loss is Hinton et al.'s (2015) knowledge-distillation objective as RMT-KD uses it
(arXiv 2509.15724, step 4)::

    L = α · CE(student, labels) + (1 − α) · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

averaged over the predicted positions (tokens of a language model, samples of a classifier).
The ``T²`` factor keeps the gradient of the soft term on the same scale as the hard term when
the temperature changes. The teacher is the model *before* the current cut, so the student is
pulled back towards the function it computed before losing width.

Batches
-------
``task="causal-lm"``
    an ``input_ids`` tensor ``[b, T]``, or a mapping of forward keyword arguments with
    ``input_ids`` (and optionally ``attention_mask`` and ``labels``). Position ``t`` predicts
    token ``t + 1``; padded positions (``attention_mask == 0``) are ignored.
``task="classification"``
    a pair ``(inputs, labels)`` (an image batch ``[b, C, H, W]`` and its class indices), or a
    mapping of forward keyword arguments with a ``labels`` entry (Hugging Face sequence
    classification). The model returns logits ``[b, classes]`` or an object with ``.logits``.

The teacher
-----------
Either a model run on every batch, or :class:`TopKLogits`, its next-token distribution
computed once per batch before training (:func:`teacher_top_k`): the ``k`` most probable
classes of every position and one *tail bucket* holding the rest of the mass. The soft term is
then the KL divergence between the two distributions coarsened to those ``k + 1`` cells,

    KLₖ = Σ_{i∈S} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail),   p_tail = Σ_{j∉S} p_j,

with ``q_tail`` the student's mass outside the teacher's top-k set ``S``. By the chain rule of
the KL divergence the error is exactly ``KL − KLₖ = p_tail · KL(p(·|tail) ‖ q(·|tail))`` ≥ 0:
the teacher's tail mass times the divergence between the two distributions *within* the tail,
zero for ``k`` = the number of classes and small wherever the teacher is confident. What the
student loses is only the pull on the shape of its tail (the tail's total mass is still
matched). The cache costs ``k · 8 + 4`` bytes per position instead of a second copy of the
model.

Data parallelism
----------------
When :mod:`torch.distributed` is initialised (``torchrun``/``accelerate launch`` set the
environment; :func:`init_distributed` starts the process group from it), :func:`distill`
trains data-parallel: every process holds the same batches, takes a disjoint slice of the rows
of each step's (global) batch and of the teacher's cache, and the loss of a slice is its *sum*
over positions divided by the position count of the whole global batch, so that the gradients
the processes average are those of the single-process mean over the global batch.

By default the student is replicated with torch's ``DistributedDataParallel``: every process
holds the whole model, its gradients and its optimizer state, and the gradients are
all-reduced once a step. With ``shard=True`` it is sharded with torch's FSDP2
(``fully_shard``), for a student whose training state does not fit on one device: one unit
per transformer block (:func:`~laserrmt.stats.calibration.find_blocks`; a model without
repeated blocks is one unit), then the root. Each process keeps ``1/N`` of every parameter,
of its gradient and of AdamW's two moments; a unit's parameters are all-gathered for its
forward and backward, and every batch's gradients are reduce-scattered into the shards. FSDP
works on a copy of the student's module tree over the same tensors (the student's modules are
never changed) and the storage of the student's parameters is released while it trains; when
training ends (or fails) every parameter's full value is all-gathered back into the student's
own parameter on every process. Every process still runs the whole compression before healing,
so the model must fit on each outside the steps; a teacher passed as a model is held whole by
every process (use its top-k cache).
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.stats.calibration import BlocksNotFoundError, find_blocks
from laserrmt.stats.forward import output_logits

Task = Literal["causal-lm", "classification"]
TASKS: tuple[str, ...] = ("causal-lm", "classification")

__all__ = [
    "TASKS",
    "Task",
    "TopKLogits",
    "TrainLog",
    "batch_logits_and_labels",
    "distill",
    "distillation_loss",
    "init_distributed",
    "is_main_process",
    "model_inputs",
    "require_process_group",
    "teacher_top_k",
    "warmup_cosine",
]


@dataclass(frozen=True)
class TopKLogits:
    """A teacher's distribution at every position, cut to its ``k`` most probable classes and
    one tail bucket (see the module docstring); made by :func:`teacher_top_k`.

    Attributes:
        log_probs: ``[..., k]`` float32 log-probabilities at ``temperature``, descending.
        indices: ``[..., k]`` int32 class of each.
        log_tail: ``[...]`` float32 log of the probability of all other classes (``-inf``
            when ``k`` is the number of classes).
        classes: the number of classes of the full distribution.
        temperature: the softmax temperature the probabilities were computed at.
    """

    log_probs: torch.Tensor
    indices: torch.Tensor
    log_tail: torch.Tensor
    classes: int
    temperature: float

    @property
    def k(self) -> int:
        return int(self.indices.shape[-1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        tensors = (self.log_probs, self.indices, self.log_tail)
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKLogits:
        """The top-``k`` entries of ``softmax(logits / temperature)`` over the last axis."""
        scaled = logits.detach().float() / temperature
        classes = scaled.shape[-1]
        log_z = scaled.logsumexp(-1)
        values, indices = scaled.topk(min(k, classes), dim=-1)
        if indices.shape[-1] < classes:
            log_tail = scaled.scatter(-1, indices, float("-inf")).logsumexp(-1) - log_z
        else:
            log_tail = torch.full_like(log_z, float("-inf"))
        return cls(
            values - log_z.unsqueeze(-1),
            indices.to(torch.int32),
            log_tail,
            classes,
            float(temperature),
        )

    def rows(self, start: int, stop: int) -> TopKLogits:
        """The entries of batch rows ``start:stop`` (a data-parallel process's slice)."""
        return TopKLogits(
            self.log_probs[start:stop],
            self.indices[start:stop],
            self.log_tail[start:stop],
            self.classes,
            self.temperature,
        )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKLogits,
    labels: torch.Tensor | None = None,
    *,
    alpha: float = 0.7,
    temperature: float = 1.0,
    ignore_index: int = -100,
    normalizer: float | None = None,
) -> torch.Tensor:
    """α · CE(student, labels) + (1 − α) · T² · KL(p_teacher ‖ p_student), mean over positions.

    Args:
        student_logits: ``[..., C]`` logits of the model being trained.
        teacher_logits: the same shape, or the teacher's :class:`TopKLogits` at the same
            positions (the KL on the top-k support plus a tail bucket); treated as constants
            (no gradient flows into them).
        labels: ``[...]`` class indices aligned with the logits (for a language model the
            caller shifts them: the logits at ``t`` against the token at ``t + 1``). ``None``
            means no hard labels: only the distillation term is used, as if ``alpha`` were 0.
        alpha: weight of the hard-label cross-entropy, in ``[0, 1]``.
        temperature: softmax temperature ``T > 0`` of the soft term.
        ignore_index: label value of positions that count in neither term (padding).
        normalizer: divide the sum over positions by this instead of their number: a
            data-parallel process passes the position count of the whole global batch, so
            that the slices' losses add up to the global mean.

    Returns:
        A scalar tensor.

    Raises:
        InvalidOptionError: ``alpha`` outside ``[0, 1]``, ``T ≤ 0``, mismatched shapes, a
            top-k cache made at another temperature, or no position left to average over.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InvalidOptionError(f"alpha={alpha}; the CE weight must lie in [0, 1]")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise InvalidOptionError(f"temperature={temperature}; use a finite T > 0 (0.5-1.5 works)")
    classes = student_logits.shape[-1]
    if isinstance(teacher_logits, TopKLogits):
        teacher_shape = (*teacher_logits.indices.shape[:-1], teacher_logits.classes)
        if teacher_logits.temperature != temperature:
            raise InvalidOptionError(
                f"the teacher's top-k cache was made at temperature {teacher_logits.temperature}, "
                f"not {temperature}; rebuild it with teacher_top_k(..., temperature={temperature})"
            )
    else:
        teacher_shape = tuple(teacher_logits.shape)
    if tuple(student_logits.shape) != teacher_shape:
        raise InvalidOptionError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{teacher_shape} differ; both models must predict the same classes"
        )
    student = student_logits.reshape(-1, classes).float()
    rows = torch.arange(student.shape[0], device=student.device)
    if labels is None:
        alpha = 0.0
    else:
        if labels.shape != student_logits.shape[:-1]:
            raise InvalidOptionError(
                f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape)}; "
                "pass one label per position (shifted by one for next-token prediction)"
            )
        flat_labels = labels.reshape(-1).to(student.device)
        keep = flat_labels != ignore_index
        if normalizer is None and not bool(keep.any()):
            raise InvalidOptionError("every label equals ignore_index; nothing to learn from")
        rows, flat_labels = rows[keep], flat_labels[keep]
        student = student[keep]
    count = float(student.shape[0]) if normalizer is None else float(normalizer)
    loss = student.new_zeros(())
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(student, flat_labels, reduction="sum") / count
    if alpha < 1:
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        if isinstance(teacher_logits, TopKLogits):
            kl = _top_k_kl(log_p_student, teacher_logits, rows)
        else:
            teacher = teacher_logits.detach().reshape(-1, classes).float().to(student.device)
            log_p_teacher = F.log_softmax(teacher[rows] / temperature, dim=-1)
            # KL(p_t ‖ p_s) summed over classes and positions.
            kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
        loss = loss + (1.0 - alpha) * temperature**2 * kl / count
    return loss


def _top_k_kl(log_q: torch.Tensor, teacher: TopKLogits, rows: torch.Tensor) -> torch.Tensor:
    """Σ over positions of the KL between teacher and student coarsened to the teacher's top-k
    classes and one tail bucket."""
    device = log_q.device
    k = teacher.k
    log_p = teacher.log_probs.reshape(-1, k).to(device)[rows].float()
    index = teacher.indices.reshape(-1, k).to(device)[rows].long()
    kl = (log_p.exp() * (log_p - log_q.gather(-1, index))).sum()
    if k < teacher.classes:
        log_p_tail = teacher.log_tail.reshape(-1).to(device)[rows].float()
        # The student's mass outside the teacher's top k: never empty here, so always finite.
        log_q_tail = log_q.scatter(-1, index, float("-inf")).logsumexp(-1)
        kl = kl + (log_p_tail.exp() * (log_p_tail - log_q_tail)).sum()
    return kl


def teacher_top_k(
    teacher: nn.Module,
    batches: Iterable[Any],
    *,
    k: int,
    temperature: float = 1.0,
    task: Task = "causal-lm",
) -> list[TopKLogits]:
    """Run ``teacher`` once on every batch and keep its top-``k`` distribution per position.

    The entries follow ``batches`` (pass the same list to :func:`distill`) and stay on the
    teacher's device. ``k`` above the number of classes keeps them all (the exact KL).

    Raises:
        InvalidOptionError: ``k < 1``, ``T ≤ 0``, or a bad batch.
    """
    _check_task(task)
    if k < 1:
        raise InvalidOptionError(f"top-k={k}; keep at least the most probable class (k ≥ 1)")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise InvalidOptionError(f"temperature={temperature}; use a finite T > 0 (0.5-1.5 works)")
    flags = [(m, m.training) for m in teacher.modules()]
    teacher.eval()
    cache = []
    try:
        with torch.no_grad():
            for batch in batches:
                logits, _ = batch_logits_and_labels(teacher, batch, task)
                cache.append(TopKLogits.from_logits(logits, k, temperature))
    finally:
        for module, training in flags:
            module.training = training
    return cache


@dataclass
class TrainLog:
    """What :func:`distill` did: the loss and learning rate of every step, the tokens seen.

    ``running`` is the loss's exponential moving average after every step (weight 0.9 on the
    past, bias-corrected: about the last ten steps), as the progress bar shows it. ``tokens`` counts the input tokens of every batch of every step (padding excluded; for a
    classifier, its samples), summed over the data-parallel processes.
    """

    losses: list[float] = field(default_factory=list)
    lr: float = 0.0
    steps: int = 0
    trainable_parameters: int = 0
    lrs: list[float] = field(default_factory=list)
    running: list[float] = field(default_factory=list)
    tokens: int = 0
    accumulate: int = 1
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "lr": self.lr,
            "steps": self.steps,
            "trainable_parameters": self.trainable_parameters,
            "lrs": list(self.lrs),
            "running": list(self.running),
            "tokens": self.tokens,
            "accumulate": self.accumulate,
            "seconds": self.seconds,
        }


def warmup_cosine(step: int, steps: int, warmup_steps: int, floor: float) -> float:
    """The learning-rate factor of 0-based ``step`` of ``steps``: a linear warm-up over the
    first ``warmup_steps`` steps, ``(step + 1) / warmup_steps``, then a half cosine from 1 at
    the first step after the warm-up down to ``floor`` at the last step::

        floor + (1 − floor) · (1 + cos(π · (step − warmup_steps) / (steps − warmup_steps − 1))) / 2
    """
    if not 0 <= warmup_steps <= steps:
        raise InvalidOptionError(f"warmup of {warmup_steps} steps out of {steps}; use 0..{steps}")
    if not 0.0 <= floor <= 1.0:
        raise InvalidOptionError(f"floor={floor}; the final learning-rate factor lies in [0, 1]")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = steps - warmup_steps - 1
    if span <= 0:
        return 1.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def model_inputs(batch: Any, task: Task) -> torch.Tensor | dict[str, Any]:
    """The part of a batch that the model's forward takes (labels removed).

    The form :func:`laserrmt.stats.calibration.collect_activation_statistics` accepts: a tensor
    passed positionally, or a mapping of keyword arguments.
    """
    _check_task(task)
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}
    if task == "classification":
        if isinstance(batch, tuple | list) and len(batch) == 2:
            return batch[0]
        raise InvalidOptionError(
            f"a classification batch is a {type(batch).__name__}; pass (inputs, labels) pairs "
            "or dicts with a 'labels' entry"
        )
    if isinstance(batch, torch.Tensor):
        return batch
    raise InvalidOptionError(
        f"a causal-lm batch is a {type(batch).__name__}; pass input_ids tensors or dicts"
    )


def batch_logits_and_labels(
    model: nn.Module, batch: Any, task: Task
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``batch``; return logits and the labels aligned with them.

    For ``causal-lm`` the logits at position ``t`` are returned with the token at ``t + 1``
    (the last position predicts nothing and is dropped); padding is ``-100``.
    """
    device = _device_of(model)
    labels = _batch_labels(batch, task).to(device)
    inputs = model_inputs(batch, task)
    if task == "classification":
        if isinstance(inputs, Mapping):
            output = model(**{k: _to(v, device) for k, v in inputs.items()})
        else:
            output = model(_to(inputs, device))
        return output_logits(output), labels

    kwargs: dict[str, Any] = (
        {k: _to(v, device) for k, v in inputs.items()}
        if isinstance(inputs, Mapping)
        else {"input_ids": inputs.to(device)}
    )
    if "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return output_logits(model(**kwargs))[:, :-1], labels


def _batch_labels(batch: Any, task: Task) -> torch.Tensor:
    """The labels :func:`batch_logits_and_labels` aligns with the logits, without a forward."""
    inputs = model_inputs(batch, task)
    if task == "classification":
        labels = batch.get("labels") if isinstance(batch, Mapping) else batch[1]
        if labels is None:
            raise InvalidOptionError("a classification batch dict needs a 'labels' entry")
        return labels
    if isinstance(inputs, Mapping):
        given = batch.get("labels")
        labels = (inputs["input_ids"] if given is None else given).clone()
        mask = inputs.get("attention_mask")
        if mask is not None:
            labels[mask.to(labels.device) == 0] = -100
    else:
        labels = inputs.clone()
    return labels[:, 1:]


def _batch_tokens(batch: Any, task: Task) -> int:
    """Input tokens of a causal-lm batch (padding excluded), samples of a classification one."""
    inputs = model_inputs(batch, task)
    if task == "classification":
        return _batch_rows(batch, task)
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        return int(inputs["input_ids"].numel() if mask is None else mask.sum())
    return int(inputs.numel())


def _batch_rows(batch: Any, task: Task) -> int:
    inputs = model_inputs(batch, task)
    if isinstance(inputs, Mapping):
        first = inputs.get("input_ids")
        if first is None:
            first = next(v for v in inputs.values() if isinstance(v, torch.Tensor))
        return int(first.shape[0])
    return int(inputs.shape[0])


def _batch_slice(batch: Any, rows: int, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every batch-shaped tensor of ``batch`` (other values as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == rows else batch
    if isinstance(batch, Mapping):
        return {k: _batch_slice(v, rows, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_batch_slice(v, rows, start, stop) for v in batch)
    return batch


def init_distributed() -> bool:
    """Start :mod:`torch.distributed` from the environment of ``torchrun`` / ``accelerate
    launch`` (``WORLD_SIZE`` > 1); returns whether this process is one of several.

    The backend is gloo for CPU tensors and NCCL for CUDA tensors (each process on the GPU of
    its ``LOCAL_RANK``). A process group already started by the caller is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise InvalidOptionError(
            "WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process"
        )
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # More processes than GPUs is a CPU run on a GPU machine: those need no device.
        if local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_world_size() > 1


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def require_process_group(option: str) -> None:
    """Refuse ``option`` (sharded training) outside a :mod:`torch.distributed` process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidOptionError(
            f"{option} shards training over the processes of a distributed launch, and none "
            "was started; launch with torchrun (or accelerate launch), one process per device"
        )


def is_main_process() -> bool:
    """Whether this process writes outputs and progress: rank 0, or the only process."""
    return _rank_and_world()[0] == 0


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise InvalidOptionError(f"task={task!r}; use one of {', '.join(TASKS)}")


Trainable = Callable[[str, nn.Parameter], bool] | Sequence[nn.Parameter] | None


def _trainable_parameters(student: nn.Module, trainable: Trainable) -> list[nn.Parameter]:
    named = list(student.named_parameters())
    if trainable is None:
        chosen = [p for _, p in named]
    elif callable(trainable):
        chosen = [p for n, p in named if trainable(n, p)]
    else:
        ids = {id(p) for p in trainable}
        chosen = [p for _, p in named if id(p) in ids]
        if len(chosen) != len(ids):
            raise InvalidOptionError(
                "some trainable parameters are not parameters of the student; pass the "
                "student's own parameters (or a predicate on their names)"
            )
    if not chosen:
        raise InvalidOptionError("no parameter is trainable; the trainable selection is empty")
    return chosen


def distill(
    student: nn.Module,
    teacher: nn.Module | Sequence[TopKLogits],
    batches: Iterable[Any],
    *,
    steps: int,
    lr: float,
    alpha: float = 0.7,
    temperature: float = 1.0,
    task: Task = "causal-lm",
    trainable: Trainable = None,
    weight_decay: float = 0.0,
    accumulate: int = 1,
    lr_schedule: Callable[[int], float] | None = None,
    optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer] | None = None,
    progress: bool = True,
    seed: int = 0,
    shard: bool = False,
) -> TrainLog:
    """Fine-tune ``student`` towards ``teacher`` with :func:`distillation_loss` for ``steps`` steps.

    AdamW (or ``optimizer(parameters, lr)``), ``accumulate`` batches per step, batches visited
    in an order shuffled with ``seed`` (a new permutation per pass). A step's loss is the mean
    over the positions of all its batches, so that accumulating ``n`` batches gives the update
    of one batch holding them all. ``lr_schedule(step)`` multiplies ``lr`` at each 0-based step
    (e.g. :func:`warmup_cosine`; constant when ``None``). The teacher is a model, run in eval
    mode without gradients, or its :func:`teacher_top_k` cache of the same ``batches``. The
    student trains in train mode and is left in eval mode. Only the ``trainable`` parameters
    change (all of the student's by default; a list of parameters, or a predicate
    ``(name, parameter) → bool``): the others are frozen for the duration and their
    ``requires_grad`` flags restored afterwards. The progress bar shows the loss's exponential
    moving average (``kl`` when ``alpha`` is 0) and tokens per second.

    The run is deterministic given ``seed``: the batch order and any dropout draw from a
    forked RNG, so the caller's random state is neither used nor disturbed.

    Under :mod:`torch.distributed` (see the module docstring) every process must call this with
    the same arguments; each trains on its slice of the rows of every batch, and the student
    ends identical in all processes and equal, up to float32 rounding, to a single-process run
    on the same batches. Dropout masks and train-mode batch normalisation are per slice, as in
    any DDP run; progress shows in process 0 only. ``shard=True`` shards the student with FSDP
    instead of replicating it (the same result; see the module docstring); ``optimizer`` then
    receives the sharded parameters.

    Raises:
        InvalidOptionError: a bad task, option or batch form; a cache that does not match the
            batches; a batch with fewer rows than processes; ``shard`` without a process group.
        NumericalError: the loss became NaN or Inf (lower ``lr``).
    """
    _check_task(task)
    if steps < 1:
        raise InvalidOptionError(f"steps={steps}; distill for at least one step")
    if accumulate < 1:
        raise InvalidOptionError(f"accumulate={accumulate}; use at least 1 batch a step")
    if not (lr > 0 and math.isfinite(lr)):
        raise InvalidOptionError(f"lr={lr}; use a positive learning rate")
    if shard:
        require_process_group("shard=True")
    listed = list(batches)
    if not listed:
        raise InvalidOptionError("no training batches; pass at least one batch")
    cache = None if isinstance(teacher, nn.Module) else list(teacher)
    if cache is not None and len(cache) != len(listed):
        raise InvalidOptionError(
            f"the teacher's top-k cache holds {len(cache)} batches for {len(listed)} training "
            "batches; build it with teacher_top_k on the same batches"
        )
    rank, world = _rank_and_world()
    rows = [_batch_rows(b, task) for b in listed]
    if min(rows) < world:
        raise InvalidOptionError(
            f"a training batch has {min(rows)} rows, fewer than the {world} processes; use "
            f"batches of at least {world} rows so that every process gets a slice"
        )
    # Counted once, without a forward: the global normaliser of every batch and its tokens.
    positions = [int((_batch_labels(b, task) != -100).sum()) for b in listed]
    tokens = [_batch_tokens(b, task) for b in listed]
    params = _trainable_parameters(student, trainable)
    log = TrainLog(
        lr=float(lr),
        steps=int(steps),
        trainable_parameters=sum(p.numel() for p in params),
        accumulate=int(accumulate),
    )

    flags = {id(p): p.requires_grad for p in student.parameters()}
    teacher_flags = [] if cache is not None else [(m, m.training) for m in teacher.modules()]  # type: ignore[union-attr]
    chosen = {id(p) for p in params}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen)
    order_rng = random.Random(seed)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    model: nn.Module = student
    name = "kl" if alpha == 0 else "loss"
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if shard:
                # Built after the requires_grad flags are set: FSDP copies them to the shards.
                model = _sharded_copy(student)
                shards = dict(model.named_parameters())
                names = {id(p): n for n, p in student.named_parameters()}
                params = [shards[names[id(p)]] for p in params]
            elif world > 1:
                device = _device_of(student)
                # Built after the requires_grad flags are set: DDP reduces the trainable only.
                model = DistributedDataParallel(
                    student, device_ids=[device] if device.type == "cuda" else None
                )
            if optimizer is None:
                opt: torch.optim.Optimizer = torch.optim.AdamW(
                    params, lr=lr, weight_decay=weight_decay
                )
            else:
                opt = optimizer(params, lr)
            if cache is None:
                teacher.eval()  # type: ignore[union-attr]
            model.train()
            order: list[int] = []
            running = 0.0
            bar = tqdm(range(steps), desc="distill", disable=not progress or rank != 0, leave=False)
            for step in bar:
                chunk = []
                for _ in range(accumulate):
                    if not order:
                        order = list(range(len(listed)))
                        order_rng.shuffle(order)
                    chunk.append(order.pop())
                # The step's mean: every slice's sum over positions divided by the count of
                # all the step's batches, which each process reads from its copy of them.
                count = sum(positions[i] for i in chunk)
                if count == 0:
                    raise InvalidOptionError(
                        "every label equals ignore_index; nothing to learn from"
                    )
                rate = lr * (1.0 if lr_schedule is None else lr_schedule(step))
                for group in opt.param_groups:
                    group["lr"] = rate
                opt.zero_grad(set_to_none=True)
                value = 0.0
                for position, index in enumerate(chunk):
                    # DDP all-reduces on the last batch of the step only. FSDP reduce-scatters
                    # every batch's gradients into the shards (adding up to the same sum):
                    # deferring would hold whole gradients, which sharding exists to avoid.
                    last = position == len(chunk) - 1
                    deferred = world > 1 and not shard and not last
                    sync = model.no_sync() if deferred else nullcontext()  # type: ignore[operator]
                    with sync:
                        value += _accumulate_batch(
                            model,
                            cache[index] if cache is not None else teacher,  # type: ignore[arg-type]
                            listed[index],
                            rows[index],
                            count,
                            alpha=alpha,
                            temperature=temperature,
                            task=task,
                        )
                if not math.isfinite(value):
                    raise NumericalError(
                        f"the distillation loss is {value} at step {step}; lower lr (now {rate})"
                    )
                opt.step()
                log.losses.append(value)
                log.lrs.append(rate)
                log.tokens += sum(tokens[i] for i in chunk)
                running = 0.9 * running + 0.1 * value
                log.running.append(running / (1 - 0.9 ** (step + 1)))
                bar.set_postfix(
                    {
                        name: f"{log.running[-1]:.4f}",
                        "tok/s": f"{log.tokens / (time.perf_counter() - started):.0f}",
                    }
                )
    finally:
        if shard and model is not student:
            _gather_into(student, model)
        del model
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        student.eval()
        for module, training in teacher_flags:
            module.training = training
    log.seconds = time.perf_counter() - started
    return log


def _sharded_copy(student: nn.Module) -> nn.Module:
    """A copy of ``student``'s module tree over the same tensors, sharded with FSDP2 over all
    processes: each transformer block a unit, then the root. The student's parameters are
    emptied until :func:`_gather_into` gives them back their (trained) full values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # With every tensor memoised, deepcopy copies modules only: FSDP swaps classes, adds hooks
    # and replaces parameters on the copy, and the caller's modules stay as they were.
    tensors = [*student.parameters(), *student.buffers()]
    shell = copy.deepcopy(student, {id(t): t for t in tensors})
    mesh = init_device_mesh(_device_of(student).type, (dist.get_world_size(),))
    try:
        _, blocks = find_blocks(shell)
    except BlocksNotFoundError:
        blocks = nn.ModuleList()  # a model without repeated blocks is one unit
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(shell, mesh=mesh)
    # FSDP copied each process's shard; the whole tensors would only hold memory meanwhile.
    for p in student.parameters():
        p.data = p.data.new_empty(0)
    return shell


def _gather_into(student: nn.Module, shell: nn.Module) -> None:
    """All-gather every parameter of the sharded ``shell`` into the student's own parameter of
    the same name, on every process."""
    from torch.distributed.fsdp import FSDPModule

    # A step that failed inside a forward or backward leaves some units unsharded.
    for module in shell.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    shards = dict(shell.named_parameters())
    with torch.no_grad():
        for name, p in student.named_parameters():
            p.data = shards[name].full_tensor()  # type: ignore[attr-defined]


def _accumulate_batch(
    model: nn.Module,
    teacher: nn.Module | TopKLogits,
    batch: Any,
    rows: int,
    count: int,
    *,
    alpha: float,
    temperature: float,
    task: Task,
) -> float:
    """Add this process's slice of ``batch`` to the gradients (its loss summed over positions
    and divided by the step's global ``count``); returns the batch's global loss term."""
    rank, world = _rank_and_world()
    start, stop = rank * rows // world, (rank + 1) * rows // world
    local = _batch_slice(batch, rows, start, stop) if world > 1 else batch
    soft: torch.Tensor | TopKLogits
    if isinstance(teacher, TopKLogits):
        soft = teacher.rows(start, stop)
    else:
        with torch.no_grad():
            soft, _ = batch_logits_and_labels(teacher, local, task)
    student_logits, labels = batch_logits_and_labels(model, local, task)
    loss = distillation_loss(
        student_logits, soft, labels, alpha=alpha, temperature=temperature, normalizer=count
    )
    total = loss.detach().clone()
    if world > 1:
        dist.all_reduce(total)
    # DDP and FSDP average the processes' gradients; the sum is the global batch's.
    (loss * world).backward()
    return float(total)
