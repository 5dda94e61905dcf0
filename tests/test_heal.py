"""Healing: the learning-rate schedule against its closed form, accumulation against one large
batch (plain SGD against a hand-made update), token budgets counted by hand, which parameters
train in each set, LoRA adapters merged without changing the model's outputs, windows drawn
from the calibration split only, and bad option combinations refused in one line."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from laserrmt.cli import main
from laserrmt.data import text
from laserrmt.distill import distill, distillation_loss, warmup_cosine
from laserrmt.errors import InvalidOptionError
from laserrmt.methods.heal import (
    LoRA,
    add_adapters,
    factor_parameters,
    heal,
    healing_steps,
    merge_adapters,
    norm_parameters,
)
from laserrmt.pipeline import CompressSettings, _healing_windows, compress
from laserrmt.surgery.lowrank import LowRankLinear
from small_text import SMALL_SPLIT, small_calibration_split
from tiny_models import TINY_VOCAB_SIZE, save_tiny, tiny_gpt2, tiny_llama, tiny_tokenizer


def _windows(n: int, length: int = 16, seed: int = 8) -> torch.Tensor:
    return torch.randint(
        0, TINY_VOCAB_SIZE, (n, length), generator=torch.Generator().manual_seed(seed)
    )


def _compressed(model: torch.nn.Module, rank: int = 8) -> torch.nn.Module:
    """The MLP projections at rank ``rank``; the attention projections stay dense."""
    student = copy.deepcopy(model)
    for name, module in list(student.named_modules()):
        if name.endswith(("gate_proj", "up_proj", "down_proj")):
            parent, _, child = name.rpartition(".")
            setattr(student.get_submodule(parent), child, LowRankLinear.from_linear(module, rank))
    return student


def test_the_schedule_is_a_linear_warm_up_then_a_cosine_down_to_the_floor():
    # 10 steps, 3 of warm-up, floor 0.1: thirds, then 7 steps from 1 to 0.1 along a half cosine.
    expected = [1 / 3, 2 / 3, 1.0] + [
        0.1 + 0.45 * (1 + math.cos(math.pi * j / 6)) for j in range(7)
    ]
    got = [warmup_cosine(s, 10, 3, 0.1) for s in range(10)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[6] == pytest.approx(0.55) and got[9] == pytest.approx(0.1)
    assert [warmup_cosine(s, 4, 0, 1.0) for s in range(4)] == [1.0] * 4  # constant
    with pytest.raises(InvalidOptionError, match="warmup"):
        warmup_cosine(0, 4, 5, 0.1)


class _RecordingSGD(torch.optim.SGD):
    """Plain SGD that records the learning rate each step ran with."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.used: list[float] = []

    def step(self, closure=None):
        self.used.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_each_step_runs_at_the_scheduled_rate_and_the_log_records_it():
    teacher = tiny_llama()
    student = _compressed(teacher)
    made = []

    def sgd(params, lr):
        made.append(_RecordingSGD(params, lr))
        return made[0]

    log = distill(
        student,
        teacher,
        list(_windows(3).split(1)),
        steps=5,
        lr=0.2,
        alpha=0.0,
        trainable=factor_parameters(student),
        lr_schedule=lambda s: warmup_cosine(s, 5, 2, 0.1),
        optimizer=sgd,
        progress=False,
    )
    hand = [0.1, 0.2, 0.2, 0.2 * (0.1 + 0.45 * (1 + math.cos(math.pi / 2))), 0.02]
    assert made[0].used == pytest.approx(hand) and log.lrs == pytest.approx(hand)
    assert log.tokens == 5 * 16  # five windows of 16 tokens
    # The bar's running KL: 0.9-weighted average of the past, bias-corrected.
    ema, running = 0.0, []
    for i, value in enumerate(log.losses, 1):
        ema = 0.9 * ema + 0.1 * value
        running.append(ema / (1 - 0.9**i))
    assert log.running == pytest.approx(running)


def test_accumulating_four_batches_is_one_sgd_step_on_the_batch_of_all_four():
    teacher = tiny_llama(initializer_range=0.15)
    windows = _windows(4)
    lr = 0.5
    # The oracle: one hand-made SGD step on the mean KL over every position of the 4 windows.
    oracle = _compressed(teacher)
    params = factor_parameters(oracle)
    with torch.no_grad():
        target = teacher(windows).logits[:, :-1]
    loss = distillation_loss(oracle(windows).logits[:, :-1], target, None, alpha=0.0)
    grads = torch.autograd.grad(loss, params)
    expected = [(p - lr * g).detach() for p, g in zip(params, grads, strict=True)]
    assert max(float((lr * g).abs().max()) for g in grads) > 1e-3  # the step moves the factors
    for batches, accumulate in ((list(windows.split(1)), 4), ([windows], 1)):
        student = _compressed(teacher)
        distill(
            student,
            teacher,
            batches,
            steps=1,
            lr=lr,
            alpha=0.0,
            trainable=factor_parameters(student),
            accumulate=accumulate,
            optimizer=lambda p, rate: torch.optim.SGD(p, lr=rate),
            progress=False,
        )
        for got, want in zip(factor_parameters(student), expected, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)


def test_a_token_budget_buys_the_steps_counted_by_hand():
    # 10,000 tokens at 3 batches of 2 windows of 128 tokens a step: 768 a step, 13 steps read
    # 9,984 tokens, so a 14th is needed.
    assert healing_steps(10_000, window=128, batch_size=2, accumulate=3) == 14
    assert healing_steps(9_984, window=128, batch_size=2, accumulate=3) == 13
    settings = CompressSettings(
        heal_tokens=10_000, window=128, heal_batch_size=2, heal_accumulate=3
    )
    assert settings.n_heal_steps == 14
    with small_calibration_split():
        _, result = compress(
            tiny_llama(initializer_range=0.15),
            tiny_tokenizer(),
            method="budget",
            target_params=0.4,
            importance="none",
            calibration_windows=2,
            window=32,
            heal_tokens=200,
            heal_batch_size=2,
            progress=False,
        )
    # 200 tokens at 2 windows of 32 a step: ceil(200 / 64) = 4 steps, 256 tokens read.
    assert result.healing["steps"] == 4 and result.healing["tokens"] == 256
    assert len(result.healing["losses"]) == len(result.healing["lrs"]) == 4


@pytest.mark.parametrize(("params", "norms_train"), [("factors", False), ("factors+norms", True)])
def test_norm_scales_train_only_when_included(params, norms_train):
    teacher = tiny_llama(initializer_range=0.15)
    student = _compressed(teacher)
    norms_before = [p.detach().clone() for p in norm_parameters(student)]
    assert len(norms_before) == 2 * 2 + 1  # two per block and the final norm
    factors_before = [p.detach().clone() for p in factor_parameters(student)]
    log = heal(student, teacher, _windows(4), steps=3, lr=1e-2, params=params, progress=False)
    after = zip(norms_before, norm_parameters(student), strict=True)
    changed = [not torch.equal(a, b) for a, b in after]
    assert all(changed) if norms_train else not any(changed)
    moved = zip(factors_before, factor_parameters(student), strict=True)
    assert any(not torch.equal(a, b) for a, b in moved)
    factors = sum(p.numel() for p in factors_before)
    assert log["trainable_parameters"] == factors + (5 * 64 if norms_train else 0)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_merged_adapters_give_the_adapted_model_outputs(build):
    """GPT-2's Conv1D stores its weight transposed: the merge must add (B A)ᵀ there."""
    model = build(initializer_range=0.15)
    keys = set(model.state_dict())
    windows = _windows(2)
    with torch.no_grad():
        dense = model(windows).logits
    names = add_adapters(model, rank=4, seed=1)
    assert names and all(isinstance(model.get_submodule(n), LoRA) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, dense, rtol=0, atol=0)  # B = 0
        gen = torch.Generator().manual_seed(2)
        for name in names:
            lora = model.get_submodule(name)
            lora.lora_b.copy_(0.2 * torch.randn(lora.lora_b.shape, generator=gen))
        adapted = model(windows).logits
    assert merge_adapters(model) == len(names)
    with torch.no_grad():
        merged = model(windows).logits
    assert not torch.allclose(adapted, dense, atol=1e-3)  # the adapters changed the model
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == keys and not any(isinstance(m, LoRA) for m in model.modules())


def test_healing_with_adapters_changes_the_dense_layers_and_leaves_no_adapter():
    teacher = tiny_llama(initializer_range=0.15)
    student = _compressed(teacher)
    q_before = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    keys = set(student.state_dict())
    embedding = student.model.embed_tokens.weight.detach().clone()  # tied to the head
    log = heal(
        student,
        teacher,
        _windows(4),
        steps=3,
        lr=1e-2,
        params="factors+norms+lora",
        lora_rank=2,
        progress=False,
    )
    assert set(student.state_dict()) == keys
    assert type(student.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not torch.equal(student.model.layers[0].self_attn.q_proj.weight, q_before)
    assert torch.equal(student.model.embed_tokens.weight, embedding)
    # 2 blocks × (q 64→64, k and v 64→32, o 64→64) at rank 2: r · (in + out) each
    adapters = 2 * 2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))
    factors = sum(p.numel() for p in factor_parameters(student))
    assert log["trainable_parameters"] == factors + 5 * 64 + adapters
    assert log["lora_rank"] == 2


def test_healing_windows_come_from_the_calibration_split_and_as_many_as_the_steps_read():
    tokenizer = tiny_tokenizer()
    settings = CompressSettings(window=32, heal_steps=5, heal_batch_size=2, heal_accumulate=3)
    with small_calibration_split():
        every = text.token_windows(tokenizer, SMALL_SPLIT, window=32)
        drawn = _healing_windows(tokenizer, settings)
        assert drawn.shape == (30, 32)
        # A length beyond the split reads every window of it (each step then repeats them).
        whole = _healing_windows(tokenizer, CompressSettings(window=32, heal_steps=10**6))
    rows = {tuple(w.tolist()) for w in every}
    assert all(tuple(w.tolist()) in rows for w in drawn)
    assert len({tuple(w.tolist()) for w in drawn}) == 30
    assert whole.shape == every.shape and {tuple(w.tolist()) for w in whole} == rows


def test_healing_windows_of_user_data_are_drawn_from_it(tmp_path):
    from laserrmt.data.sources import open_text_source

    path = tmp_path / "mine.txt"
    path.write_text("x" * (32 * 7 + 5))  # 7 windows of 32 byte tokens and a tail
    source = open_text_source(path).to_dict()
    tokenizer = tiny_tokenizer()
    three = _healing_windows(
        tokenizer, CompressSettings(calibration_data=source, window=32, heal_steps=3)
    )
    every = _healing_windows(
        tokenizer, CompressSettings(calibration_data=source, window=32, heal_steps=50)
    )
    assert three.shape == (3, 32) and every.shape == (7, 32)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny"), tiny_tokenizer())


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--heal-steps", "2", "--heal-tokens", "100"], "not allowed with argument --heal-steps"),
        (["--heal-steps", "2", "--heal-params", "everything"], "unknown --heal-params"),
        (["--heal-steps", "2", "--heal-lora-rank", "4"], "--heal-lora-rank sizes the adapters"),
        (["--heal-steps", "2", "--heal-accumulate", "0"], "--heal-accumulate"),
        (["--heal-steps", "2", "--heal-warmup", "1.5"], "--heal-warmup 1.5"),
        (["--heal-tokens", "-5"], "--heal-tokens must be ≥ 0"),
    ],
)
def test_bad_healing_options_are_one_line_and_exit_2(
    capsys, tiny_folder, tmp_path, options, fragment
):
    argv = ["--quiet", "compress", str(tiny_folder), "--method", "budget", "--no-eval"]
    code = main([*argv, "--target-params", "0.3", *options, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("laserrmt: error:")]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_the_report_and_json_carry_the_loss_curve(capsys, tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(text, "calibration_texts", lambda: list(SMALL_SPLIT))
    out = tmp_path / "healed"
    code = main(
        [
            *("--quiet", "compress", str(tiny_folder), "--method", "budget", "--no-eval"),
            *("--target-params", "0.3", "--calibration-windows", "2"),
            *("--heal-tokens", "1536", "--heal-accumulate", "3", "--heal-params", "factors+norms"),
            *("--out", str(out)),
        ]
    )
    assert code == 0, capsys.readouterr().err
    healing = json.loads((out / "laserrmt.json").read_text())["settings"]["compress"]["healing"]
    # 1536 tokens = 3 windows of 512: one step of 3 accumulated batches.
    assert healing["steps"] == 1 and healing["tokens"] == 1536 and healing["accumulate"] == 3
    assert healing["params"] == "factors+norms" and len(healing["losses"]) == 1
    html = (out / "report.html").read_text()
    assert "healing KL" in html and (out / "healing.png").exists()
