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
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from laserrmt.errors import InvalidOptionError, NumericalError

Task = Literal["causal-lm", "classification"]
TASKS: tuple[str, ...] = ("causal-lm", "classification")

__all__ = [
    "TASKS",
    "Task",
    "TrainLog",
    "batch_logits_and_labels",
    "distill",
    "distillation_loss",
    "model_inputs",
]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    alpha: float = 0.7,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """α · CE(student, labels) + (1 − α) · T² · KL(p_teacher ‖ p_student), mean over positions.

    Args:
        student_logits: ``[..., C]`` logits of the model being trained.
        teacher_logits: the same shape; treated as constants (no gradient flows into them).
        labels: ``[...]`` class indices aligned with the logits (for a language model the
            caller shifts them: the logits at ``t`` against the token at ``t + 1``). ``None``
            means no hard labels: only the distillation term is used, as if ``alpha`` were 0.
        alpha: weight of the hard-label cross-entropy, in ``[0, 1]``.
        temperature: softmax temperature ``T > 0`` of the soft term.
        ignore_index: label value of positions that count in neither term (padding).

    Returns:
        A scalar tensor.

    Raises:
        InvalidOptionError: ``alpha`` outside ``[0, 1]``, ``T ≤ 0``, mismatched shapes, or no
            position left to average over.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InvalidOptionError(f"alpha={alpha}; the CE weight must lie in [0, 1]")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise InvalidOptionError(f"temperature={temperature}; use a finite T > 0 (0.5-1.5 works)")
    if student_logits.shape != teacher_logits.shape:
        raise InvalidOptionError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; both models must predict the same classes"
        )
    classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, classes).float()
    teacher = teacher_logits.detach().reshape(-1, classes).float()
    if labels is None:
        keep = None
        alpha = 0.0
    else:
        if labels.shape != student_logits.shape[:-1]:
            raise InvalidOptionError(
                f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape)}; "
                "pass one label per position (shifted by one for next-token prediction)"
            )
        flat_labels = labels.reshape(-1).to(student.device)
        keep = flat_labels != ignore_index
        if not bool(keep.any()):
            raise InvalidOptionError("every label equals ignore_index; nothing to learn from")
        student, teacher, flat_labels = student[keep], teacher[keep], flat_labels[keep]
    loss = student.new_zeros(())
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(student, flat_labels)
    if alpha < 1:
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        # KL(p_t ‖ p_s) summed over classes, averaged over positions ("batchmean" per row).
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
        kl = kl / student.shape[0]
        loss = loss + (1.0 - alpha) * temperature**2 * kl
    return loss


@dataclass
class TrainLog:
    """What :func:`distill` did: the loss of every step, the learning rate and the step count."""

    losses: list[float] = field(default_factory=list)
    lr: float = 0.0
    steps: int = 0
    trainable_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "lr": self.lr,
            "steps": self.steps,
            "trainable_parameters": self.trainable_parameters,
        }


def _output_logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InvalidOptionError(
        f"the model returned {type(output).__name__}, which holds no logits; return a tensor "
        "or an object with a .logits attribute"
    )


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
    inputs = model_inputs(batch, task)
    if task == "classification":
        if isinstance(batch, Mapping):
            labels = batch.get("labels")
            output = model(**{k: _to(v, device) for k, v in inputs.items()})  # type: ignore[union-attr]
        else:
            labels = batch[1]
            output = model(_to(inputs, device))
        if labels is None:
            raise InvalidOptionError("a classification batch dict needs a 'labels' entry")
        return _output_logits(output), labels.to(device)

    kwargs: dict[str, Any] = (
        {k: _to(v, device) for k, v in inputs.items()}
        if isinstance(inputs, Mapping)
        else {"input_ids": inputs.to(device)}
    )
    if "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    output = model(**kwargs)
    logits = _output_logits(output)
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    labels = (kwargs["input_ids"] if labels is None else labels.to(device)).clone()
    mask = kwargs.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = -100
    return logits[:, :-1], labels[:, 1:]


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
    teacher: nn.Module,
    batches: Iterable[Any],
    *,
    steps: int,
    lr: float,
    alpha: float = 0.7,
    temperature: float = 1.0,
    task: Task = "causal-lm",
    trainable: Trainable = None,
    weight_decay: float = 0.0,
    progress: bool = True,
    seed: int = 0,
) -> TrainLog:
    """Fine-tune ``student`` towards ``teacher`` with :func:`distillation_loss` for ``steps`` steps.

    AdamW, one batch per step, batches visited in an order shuffled with ``seed`` (a new
    permutation per pass). The teacher runs in eval mode without gradients; the student trains in
    train mode and is left in eval mode. Only the ``trainable`` parameters change (all of the
    student's by default; a list of parameters, or a predicate ``(name, parameter) → bool``): the
    others are frozen for the duration and their ``requires_grad`` flags restored afterwards.

    The run is deterministic given ``seed``: the batch order and any dropout draw from a
    forked RNG, so the caller's random state is neither used nor disturbed.

    Raises:
        InvalidOptionError: a bad task, option or batch form.
        NumericalError: the loss became NaN or Inf (lower ``lr``).
    """
    _check_task(task)
    if steps < 1:
        raise InvalidOptionError(f"steps={steps}; distill for at least one step")
    if not (lr > 0 and math.isfinite(lr)):
        raise InvalidOptionError(f"lr={lr}; use a positive learning rate")
    listed = list(batches)
    if not listed:
        raise InvalidOptionError("no training batches; pass at least one batch")
    params = _trainable_parameters(student, trainable)
    log = TrainLog(
        lr=float(lr), steps=int(steps), trainable_parameters=sum(p.numel() for p in params)
    )

    flags = {id(p): p.requires_grad for p in student.parameters()}
    teacher_flags = [(m, m.training) for m in teacher.modules()]
    chosen = {id(p) for p in params}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen)
    order_rng = random.Random(seed)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            teacher.eval()
            student.train()
            order: list[int] = []
            bar = tqdm(range(steps), desc="distill", disable=not progress, leave=False)
            for step in bar:
                if not order:
                    order = list(range(len(listed)))
                    order_rng.shuffle(order)
                batch = listed[order.pop()]
                with torch.no_grad():
                    teacher_logits, _ = batch_logits_and_labels(teacher, batch, task)
                student_logits, labels = batch_logits_and_labels(student, batch, task)
                loss = distillation_loss(
                    student_logits,
                    teacher_logits.to(student_logits.device),
                    labels,
                    alpha=alpha,
                    temperature=temperature,
                )
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NumericalError(
                        f"the distillation loss is {value} at step {step}; lower lr (now {lr})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                log.losses.append(value)
                bar.set_postfix(loss=f"{value:.4f}")
    finally:
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        student.eval()
        for module, training in teacher_flags:
            module.training = training
    return log
