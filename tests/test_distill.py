"""The distillation loss on hand-computed cases, and the trainer on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from laserrmt.distill import batch_logits_and_labels, distill, distillation_loss
from laserrmt.errors import InvalidOptionError
from tiny_models import tiny_llama

# Student logits [0, 0] → p_s = (1/2, 1/2); teacher logits [0, ln 3] → p_t = (1/4, 3/4); label 1.
# CE = −ln(1/2) = ln 2 = 0.693147...
# KL(p_t ‖ p_s) = 1/4·ln(1/2) + 3/4·ln(3/2) = 0.130812...
# α = 0.7, T = 1: 0.7·0.693147 + 0.3·0.130812 = 0.524447
# T = 2: p_t = (1, √3)/(1 + √3) = (0.366025, 0.633975); KL = 0.036341, T²·KL = 0.145363
STUDENT = torch.tensor([[0.0, 0.0]])
TEACHER = torch.tensor([[0.0, math.log(3.0)]])
LABEL = torch.tensor([1])


def test_hand_computed_case() -> None:
    loss = distillation_loss(STUDENT, TEACHER, LABEL, alpha=0.7, temperature=1.0)
    assert float(loss) == pytest.approx(0.5244466, abs=1e-6)


def test_alpha_one_is_cross_entropy_and_zero_is_scaled_kl() -> None:
    ce = distillation_loss(STUDENT, TEACHER, LABEL, alpha=1.0)
    assert float(ce) == pytest.approx(0.6931472, abs=1e-6)
    kl_t2 = distillation_loss(STUDENT, TEACHER, LABEL, alpha=0.0, temperature=2.0)
    assert float(kl_t2) == pytest.approx(0.1453631, abs=1e-6)
    mixed = distillation_loss(STUDENT, TEACHER, LABEL, alpha=0.5, temperature=2.0)
    assert float(mixed) == pytest.approx(0.5 * 0.6931472 + 0.5 * 0.1453631, abs=1e-6)


def test_no_labels_means_only_the_kl_term() -> None:
    loss = distillation_loss(STUDENT, TEACHER, None, alpha=0.7)
    assert float(loss) == pytest.approx(0.1308120, abs=1e-6)


def test_kl_is_zero_when_student_equals_teacher() -> None:
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    assert float(distillation_loss(logits, logits.clone(), None, temperature=1.3)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_ignored_positions_count_in_neither_term() -> None:
    student = torch.tensor([[0.0, 0.0], [5.0, -5.0]])
    teacher = torch.tensor([[0.0, math.log(3.0)], [-5.0, 5.0]])
    labels = torch.tensor([1, -100])
    loss = distillation_loss(student, teacher, labels, alpha=0.7)
    assert float(loss) == pytest.approx(0.5244466, abs=1e-6)


def test_bad_options_raise() -> None:
    with pytest.raises(InvalidOptionError):
        distillation_loss(STUDENT, TEACHER, LABEL, alpha=1.5)
    with pytest.raises(InvalidOptionError):
        distillation_loss(STUDENT, TEACHER, LABEL, temperature=0.0)
    with pytest.raises(InvalidOptionError):
        distillation_loss(STUDENT, TEACHER[:, :1], LABEL)


def test_causal_lm_labels_are_shifted_and_padding_ignored() -> None:
    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logits, labels = batch_logits_and_labels(
        model, {"input_ids": ids, "attention_mask": mask}, "causal-lm"
    )
    assert logits.shape[:2] == (1, 3)
    assert labels.tolist() == [[6, 7, -100]]


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_distill_reduces_the_loss_and_leaves_the_student_in_eval() -> None:
    teacher, student = _mlp(0), _mlp(1)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(16, 6, generator=gen) for _ in range(4)]
    with torch.no_grad():  # labels the teacher agrees with, so the task is learnable
        batches = [(x, teacher(x).argmax(-1)) for x in inputs]

    def total() -> float:
        with torch.no_grad():
            return sum(float(distillation_loss(student(x), teacher(x), y)) for x, y in batches)

    before = total()
    log = distill(
        student, teacher, batches, steps=60, lr=1e-2, task="classification", progress=False
    )
    assert len(log.losses) == 60 and log.steps == 60
    assert total() < 0.5 * before
    assert not student.training


def test_trainable_selection_freezes_the_rest_and_restores_flags() -> None:
    teacher, student = _mlp(0), _mlp(1)
    frozen = student[0].weight.detach().clone()
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
    log = distill(
        student,
        teacher,
        batches,
        steps=3,
        lr=1e-2,
        task="classification",
        trainable=lambda name, _p: name.startswith("2."),
        progress=False,
    )
    assert torch.equal(student[0].weight, frozen)
    assert log.trainable_parameters == 16 * 3 + 3
    assert all(p.requires_grad for p in student.parameters())


def test_distill_is_deterministic_given_the_seed() -> None:
    teacher = _mlp(0)
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    runs = []
    for _ in range(2):
        student = _mlp(1)
        distill(
            student,
            teacher,
            batches,
            steps=5,
            lr=1e-2,
            task="classification",
            seed=3,
            progress=False,
        )
        runs.append(student[2].weight.detach().clone())
    assert torch.equal(runs[0], runs[1])
