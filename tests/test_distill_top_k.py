"""The top-k teacher cache: its loss against a float64 brute force of the coarsened KL, the
exact KL when k is the vocabulary, and the bytes it holds against a copy of the model."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from laserrmt.distill import TopKLogits, distillation_loss, teacher_top_k
from laserrmt.errors import InvalidOptionError
from laserrmt.methods.heal import factor_parameters, heal, healing_teacher
from laserrmt.surgery.lowrank import LowRankLinear
from tiny_models import TINY_VOCAB_SIZE, tiny_llama


def _logits(seed: int, shape: tuple[int, ...], scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _coarse_kl(teacher: np.ndarray, student: np.ndarray, k: int, temperature: float) -> float:
    """Mean over rows of KL between the two softmaxes merged into the teacher's top k + 1 tail
    cell, in float64, position by position."""
    total = 0.0
    for t_row, s_row in zip(teacher, student, strict=True):
        p = np.exp(t_row / temperature - np.logaddexp.reduce(t_row / temperature))
        q = np.exp(s_row / temperature - np.logaddexp.reduce(s_row / temperature))
        top = np.argsort(-p)[:k]
        cells_p = np.append(p[top], 1.0 - p[top].sum())
        cells_q = np.append(q[top], 1.0 - q[top].sum())
        live = cells_p > 0
        total += float(np.sum(cells_p[live] * np.log(cells_p[live] / cells_q[live])))
    return total / len(teacher)


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_is_the_kl_of_the_distributions_merged_to_top_k_and_a_tail(k, temperature):
    teacher, student = _logits(0, (6, 40)), _logits(1, (6, 40))
    cache = TopKLogits.from_logits(teacher, k, temperature)
    loss = distillation_loss(student, cache, None, temperature=temperature)
    expected = temperature**2 * _coarse_kl(
        teacher.double().numpy(), student.double().numpy(), k, temperature
    )
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # Merging cells never increases a KL divergence (the error p_tail · KL(tails) is ≥ 0).
    full = distillation_loss(student, teacher, None, temperature=temperature)
    assert float(loss) <= float(full) + 1e-6


def test_with_every_class_it_is_the_full_loss_and_gradient():
    """k = C leaves no tail: the same sum as the dense KL (up to float32 summation order)."""
    teacher, student_init = _logits(2, (2, 7, 50)), _logits(3, (2, 7, 50))
    labels = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(4))
    labels[1, 5:] = -100
    cache = TopKLogits.from_logits(teacher, 50, 1.3)
    assert bool(torch.isneginf(cache.log_tail).all())
    results = []
    for target in (teacher, cache):
        student = student_init.clone().requires_grad_(True)
        loss = distillation_loss(student, target, labels, alpha=0.4, temperature=1.3)
        loss.backward()
        results.append((float(loss.detach()), student.grad))
    (dense, dense_grad), (top, top_grad) = results
    assert top == pytest.approx(dense, rel=1e-6)
    assert torch.allclose(top_grad, dense_grad, rtol=1e-5, atol=1e-8)


def test_normalizer_divides_the_sum_over_positions():
    """A data-parallel slice passes the global count: the slices' losses add to the mean."""
    teacher, student = _logits(5, (8, 30)), _logits(6, (8, 30))
    labels = torch.randint(0, 30, (8,), generator=torch.Generator().manual_seed(7))
    labels[6:] = -100  # six positions count; the slices hold 3 + 1 + 2 + 0 of them
    whole = distillation_loss(student, teacher, labels, alpha=0.5)
    parts = [
        distillation_loss(student[a:b], teacher[a:b], labels[a:b], alpha=0.5, normalizer=6)
        for a, b in ((0, 3), (3, 4), (4, 7), (7, 8))
    ]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)


def _windows(n: int, length: int = 24) -> torch.Tensor:
    return torch.randint(
        0, TINY_VOCAB_SIZE, (n, length), generator=torch.Generator().manual_seed(8)
    )


def _compressed(model: torch.nn.Module, rank: int = 8) -> torch.nn.Module:
    """Every MLP projection of ``model`` replaced by its rank-``rank`` truncated SVD."""
    student = copy.deepcopy(model)
    for name, module in list(student.named_modules()):
        if name.endswith(("gate_proj", "up_proj", "down_proj")):
            low = LowRankLinear.from_linear(module, rank)
            parent, _, child = name.rpartition(".")
            setattr(student.get_submodule(parent), child, low)
    return student


def test_small_k_is_close_to_the_full_kl_on_a_tiny_model():
    """The shortfall p_tail · KL(tails) shrinks with k; at k = 16 of 264 classes, with the
    peaked predictions of a trained model (5 % of the mass outside the top 16), it is < 5 %."""
    teacher = tiny_llama(initializer_range=0.5)
    student = _compressed(teacher)
    windows = _windows(2)
    with torch.no_grad():
        student_logits = student(windows).logits[:, :-1]
        teacher_logits = teacher(windows).logits[:, :-1]
    full = float(distillation_loss(student_logits, teacher_logits, None))
    shortfalls = []
    for k in (8, 16, 32, 64):
        cache = teacher_top_k(teacher, list(windows.split(1)), k=k)
        approx = sum(
            float(distillation_loss(student_logits[i : i + 1], c, None))
            for i, c in enumerate(cache)
        ) / len(cache)
        tail = float(torch.cat([c.log_tail.exp().flatten() for c in cache]).mean())
        print(f"k={k}: KL {approx:.4f} of {full:.4f}; mean teacher tail mass {tail:.4f}")
        shortfalls.append((full - approx) / full)
    assert full > 1.0  # the cut changed the predictions measurably
    assert shortfalls[-1] >= 0
    assert all(a > b for a, b in itertools.pairwise(shortfalls))
    assert shortfalls[1] < 0.05


def test_healing_from_the_cache_with_every_class_equals_healing_from_the_model():
    """The cache is aligned with the batches the steps visit (a shuffled order, batches of 2)."""
    teacher = tiny_llama(initializer_range=0.15)
    windows = _windows(5)
    healed = []
    for source in (teacher, healing_teacher(teacher, windows, batch_size=2, top_k=10**6)):
        student = _compressed(teacher)
        heal(student, source, windows, steps=4, lr=1e-3, batch_size=2, progress=False, seed=1)
        healed.append(torch.cat([p.detach().flatten() for p in factor_parameters(student)]))
    before = torch.cat([p.detach().flatten() for p in factor_parameters(_compressed(teacher))])
    assert not torch.allclose(healed[0], before, atol=1e-5)  # the steps moved the factors
    torch.testing.assert_close(healed[1], healed[0], rtol=0, atol=1e-6)


def test_the_cache_holds_k_entries_per_position_not_a_copy_of_the_model():
    teacher = tiny_llama()
    windows, k = _windows(4, length=32), 16
    cache = healing_teacher(teacher, windows, batch_size=2, top_k=k)
    # per predicted position: k float32 log-probabilities, k int32 indices, one float32 tail
    assert sum(c.nbytes for c in cache) == 4 * 31 * (k * 8 + 4)
    model_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    print(f"teacher copy {model_bytes:,} B; top-{k} cache {sum(c.nbytes for c in cache):,} B")
    assert sum(c.nbytes for c in cache) < model_bytes / 10


def test_a_cache_that_does_not_match_the_batches_or_temperature_is_refused():
    teacher = tiny_llama()
    windows = _windows(4)
    student = _compressed(teacher)
    cache = healing_teacher(teacher, windows, batch_size=2, top_k=8)
    with pytest.raises(InvalidOptionError, match="holds 2 batches for 4"):
        heal(student, cache, windows, steps=1, lr=1e-3, batch_size=1, progress=False)
    with pytest.raises(InvalidOptionError, match="temperature"):
        heal(
            student, cache, windows, steps=1, lr=1e-3, batch_size=2, temperature=2.0, progress=False
        )
    with pytest.raises(InvalidOptionError, match="exceeds the 4 calibration windows"):
        healing_teacher(teacher, windows, batch_size=5)
    with pytest.raises(InvalidOptionError, match="k ≥ 1"):
        teacher_top_k(teacher, [windows], k=0)
