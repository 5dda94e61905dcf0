"""The budget method's two passes: factors spilled to disk block by block, cut from there.

The oracle is written here from the definition, independently of the package: every target's
inputs are captured by hooks in whole-model forwards, ``G = XᵀX / N`` is factored by Cholesky
(``G = L Lᵀ``; the package uses an eigendecomposition), the loss curve is the tail energy of
the singular values of ``W L`` and the rank-k weight is ``U_k Σ_k V_kᵀ L⁻¹``. Plans must agree
rank for rank and the cut models' outputs to 1e-6 (float64 models, so only the maths differs).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import tempfile
import weakref

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from laserrmt.allocation import LossCurve, allocate_ranks
from laserrmt.methods import budget
from laserrmt.methods.budget import budget_plan
from laserrmt.models.targets import find_targets
from laserrmt.pipeline import compress
from laserrmt.stats import calibration
from laserrmt.stats.calibration import collect_fisher_diagonal
from laserrmt.surgery.apply import apply_plan
from laserrmt.surgery.spill import FactorSpill
from tests.small_text import small_calibration_split
from tests.tiny_models import TINY_VOCAB_SIZE, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer


def _windows(n: int = 4, length: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, TINY_VOCAB_SIZE - 8, (n, length), generator=generator)


def _outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _weight(module) -> torch.Tensor:
    w = module.weight.detach().double()
    return w.T if isinstance(module, Conv1D) else w


def _oracle(model, names, windows):
    """``{name: (W, L)}`` with ``L Lᵀ`` the per-token input Gram (eigenvalues under 1e-8 of
    the largest raised to it, the documented floor: LayerNorm outputs leave one null direction),
    from the model's own forwards."""
    grams = {name: 0.0 for name in names}
    counts = dict.fromkeys(names, 0)

    def hook(name, _module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        grams[name] = grams[name] + x.T @ x
        counts[name] += x.shape[0]

    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(n, m, a))
        for n in names
    ]
    with torch.no_grad():
        for window in windows:
            model(window.unsqueeze(0))
    for handle in handles:
        handle.remove()
    factors = {}
    for n in names:
        g = grams[n] / counts[n]
        values, vectors = torch.linalg.eigh((g + g.T) / 2)
        floored = (vectors * values.clamp(min=1e-8 * float(values[-1]))) @ vectors.T
        lower = torch.linalg.cholesky((floored + floored.T) / 2)
        factors[n] = (_weight(model.get_submodule(n)), lower)
    return factors


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert])
def test_spilled_two_pass_budget_equals_an_in_memory_whitened_svd_oracle(build, tmp_path):
    original = build().double()
    targets = find_targets(original)
    names = [t.name for t in targets]
    windows = _windows()
    oracle = _oracle(original, names, windows)
    curves = {
        t.name: LossCurve(t.shape, torch.linalg.svdvals(w @ lower).numpy())
        for t in targets
        for w, lower in [oracle[t.name]]
    }
    expected = allocate_ranks(
        curves, target_fraction=0.3, importance=dict.fromkeys(names, 1.0)
    ).ranks

    model = copy.deepcopy(original)
    with budget_plan(
        model,
        targets,
        windows,
        target_params=0.3,
        importance="none",
        spill_dir=tmp_path,
        progress=False,
    ) as outcome:
        apply_plan(model, outcome.plan, svd_cache=outcome.svd_cache, progress=False)
    assert {d.module: d.rank for d in outcome.plan} == expected
    cut = [d for d in outcome.plan if d.mode == "factorize"]
    assert len(cut) >= 3

    reference = copy.deepcopy(original)
    for decision in cut:
        w, lower = oracle[decision.module]
        u, s, vh = torch.linalg.svd(w @ lower, full_matrices=False)
        k = decision.rank
        approx = (u[:, :k] * s[:k]) @ torch.linalg.solve_triangular(
            lower, vh[:k], upper=False, left=False
        )
        module = reference.get_submodule(decision.module)
        module.weight.data = approx.T if isinstance(module, Conv1D) else approx
    ids = torch.randint(0, TINY_VOCAB_SIZE - 8, (2, 16), generator=torch.Generator().manual_seed(5))
    assert (_outputs(model, ids) - _outputs(reference, ids)).abs().max() < 1e-6
    # the cut changed the model: the oracle comparison could fail
    assert (_outputs(original, ids) - _outputs(reference, ids)).abs().max() > 1e-3
    assert list(tmp_path.iterdir()) == []


def test_the_fisher_row_sums_are_those_of_the_per_window_squared_gradients():
    model = tiny_llama()
    names = [t.name for t in find_targets(model)][:3]
    windows = _windows(3, 16)
    rows = collect_fisher_diagonal(model, list(windows.split(1)), names, rows=True, progress=False)
    for name in names:
        weight = model.get_submodule(name).weight
        expected = torch.zeros(weight.shape[0], dtype=torch.float64)
        for window in windows:
            model.zero_grad()
            ids = window.unsqueeze(0)
            model(input_ids=ids, labels=ids).loss.backward()
            expected += weight.grad.double().square().sum(dim=1)
        torch.testing.assert_close(rows[name], expected, rtol=1e-6, atol=0)
    model.zero_grad()


def test_at_most_one_blocks_statistics_and_factors_are_alive(monkeypatch):
    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    targets = find_targets(model)
    grams: list[weakref.ref] = []
    written: list[list[str]] = []
    factor_refs: list[weakref.ref] = []
    read_refs: list[weakref.ref] = []

    finalize = calibration._StatisticsHooks.finalize

    def spied_finalize(self):
        # a block's forward is done: the earlier blocks' Grams and factors must be gone by now
        gc.collect()
        assert all(ref() is None for ref in grams)
        assert all(ref() is None for ref in factor_refs)
        stats = finalize(self)
        grams.extend(weakref.ref(s.gram) for s in stats.values())
        return stats

    write = FactorSpill.write

    def spied_write(self, factors):
        gc.collect()
        assert all(ref() is None for ref in factor_refs)
        written.append(list(factors))
        factor_refs.extend(weakref.ref(part) for parts in factors.values() for part in parts)
        write(self, factors)

    read = FactorSpill.__getitem__

    def spied_read(self, name):
        gc.collect()
        assert sum(ref() is not None for ref in read_refs) <= 3  # the module being cut, at most
        parts = read(self, name)
        assert parts[0].shape[1] == parts[1].shape[0] == parts[2].shape[0] == self.ranks[name]
        read_refs.extend(weakref.ref(part) for part in parts)
        return parts

    monkeypatch.setattr(calibration._StatisticsHooks, "finalize", spied_finalize)
    monkeypatch.setattr(FactorSpill, "write", spied_write)
    monkeypatch.setattr(FactorSpill, "__getitem__", spied_read)
    with budget_plan(model, targets, _windows(), target_params=0.3, progress=False) as outcome:
        apply_plan(model, outcome.plan, svd_cache=outcome.svd_cache, progress=False)
    assert [{n.split(".")[2] for n in names} for names in written] == [{"0"}, {"1"}, {"2"}, {"3"}]
    assert sum(len(names) for names in written) == len(targets)
    assert len(grams) == len(targets)
    assert len(read_refs) == 3 * sum(d.mode == "factorize" for d in outcome.plan) > 0


def test_the_spill_folder_is_removed_when_the_first_pass_fails(monkeypatch, tmp_path):
    model = tiny_llama()
    calls = []
    decompose = budget.weighted_svd

    def failing(*args, **kwargs):
        calls.append(kwargs["module"])
        if len(calls) == 10:  # in the second block, after the first one was spilled
            assert len(list(tmp_path.glob("*/*.safetensors"))) == 1
            raise RuntimeError("injected")
        return decompose(*args, **kwargs)

    monkeypatch.setattr(budget, "weighted_svd", failing)
    with pytest.raises(RuntimeError, match="injected"):
        budget_plan(
            model,
            find_targets(model),
            _windows(),
            target_params=0.3,
            spill_dir=tmp_path,
            progress=False,
        )
    assert len(calls) == 10
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fail", [False, True])
def test_compress_leaves_no_spill_folder_after_success_or_an_error_in_the_cut(
    fail, monkeypatch, tmp_path
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    cut = FactorSpill.__getitem__

    def reading(self, name):
        seen.append(self.folder)
        if fail:
            raise RuntimeError("injected")
        return cut(self, name)

    monkeypatch.setattr(FactorSpill, "__getitem__", reading)
    expected = pytest.raises(RuntimeError, match="injected") if fail else contextlib.nullcontext()
    with small_calibration_split(), expected:
        compress(
            tiny_llama(),
            tiny_tokenizer(),
            method="budget",
            target_params=0.3,
            calibration_windows=2,
            window=64,
            progress=False,
        )
    assert seen and seen[0].parent == tmp_path
    assert list(tmp_path.iterdir()) == []
