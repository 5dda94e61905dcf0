"""LaserRMT decisions: one-shot plans, the selection loop, reverts, the reproduction preset."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from laserrmt.analyze import analyze_model
from laserrmt.data.text import calibration_windows
from laserrmt.errors import InvalidOptionError
from laserrmt.evaluate import count_parameters
from laserrmt.methods.laser import laser_loop, oneshot_plan, rank_candidates
from laserrmt.methods.objectives import make_objective
from laserrmt.models.targets import find_targets
from laserrmt.pipeline import CompressSettings, compress
from laserrmt.surgery.lowrank import LowRankLinear
from tests.small_text import small_calibration_split
from tests.test_analyze import PLANTED_RANK, plant_low_rank
from tests.tiny_models import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _small_split():
    """Calibration windows from a small split (see tests/small_text.py)."""
    with small_calibration_split():
        yield


@pytest.fixture(scope="module")
def windows():
    return calibration_windows(tiny_tokenizer(), n_windows=2, window=64, seed=0)


def planted():
    return plant_low_rank(tiny_llama(tie_word_embeddings=False))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_oneshot_factorizes_every_planted_matrix_at_its_rank():
    model = planted()
    analysis = analyze_model(model, keep_vectors=True, progress=False)
    plan = oneshot_plan(analysis)
    assert {d.rank for d in plan} == {PLANTED_RANK}
    assert {d.mode for d in plan} == {"factorize"}
    total = sum(t.params for t in find_targets(model))
    assert plan.params_removed() == total - sum(
        PLANTED_RANK * sum(t.shape) for t in find_targets(model)
    )


def test_oneshot_stops_at_the_parameter_target():
    analysis = analyze_model(planted(), progress=False)
    plan = oneshot_plan(analysis, target_params=0.3)
    total = plan.params_before()
    modes = [d.mode for d in plan]
    assert plan.params_removed() >= 0.3 * total
    assert "keep" in modes  # the target was met before every matrix was cut
    # Removing the last kept-out factorization would fall under the target: it stopped at once.
    last = [d for d in plan if d.mode == "factorize"][-1]
    assert plan.params_removed() - (last.params_before - last.params_after) < 0.3 * total


def test_compress_output_equals_the_planted_low_rank_model():
    model = planted()
    ids = torch.randint(0, 200, (1, 16))
    # The planted weights minus their noise would differ; the factorized model must equal the
    # dense rank-k truncation of each weight.
    reference = planted()
    for t in find_targets(reference):
        w = reference.get_submodule(t.name).weight.data.double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        k = PLANTED_RANK
        reference.get_submodule(t.name).weight.data = (u[:, :k] * s[:k] @ vh[:k]).float()
    model, result = compress(model, progress=False)
    assert all(isinstance(model.get_submodule(d.module), LowRankLinear) for d in result.plan)
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-4)


def test_loop_reverts_every_rejected_change_exactly(windows):
    model = planted()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    analysis = analyze_model(model, keep_vectors=True, progress=False)
    # No KL at all is tolerated: every change must be reverted.
    objective = make_objective("kl", windows, tolerance=0.0)
    outcome = laser_loop(model, analysis, objective, progress=False)
    assert outcome.steps and not any(s.accepted for s in outcome.steps)
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert {d.mode for d in outcome.plan} == {"keep"}


def test_loop_keeps_tolerated_changes_and_stops_at_max_changes(windows):
    model = planted()
    analysis = analyze_model(model, keep_vectors=True, progress=False)
    objective = make_objective("perplexity", windows, tolerance=10.0)
    outcome = laser_loop(model, analysis, objective, max_changes=4, progress=False)
    kept = [s for s in outcome.steps if s.accepted]
    assert len(kept) == 4 and len(outcome.steps) == 4
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 4
    assert outcome.plan.params_removed() == sum(s.params_removed for s in kept)
    # The loop tried candidates in score order.
    order = [r["module"] for r in rank_candidates(analysis, "snr")]
    assert [s.module for s in outcome.steps] == order[:4]


def test_loop_measures_params_in_the_model(windows):
    model = planted()
    names = [t.name for t in find_targets(model)]
    before = count_parameters(model, names)["params_targets"]
    model, result = compress(
        model,
        tiny_tokenizer(),
        select="loop",
        objective="perplexity",
        tolerance=10.0,
        target_params=0.5,
        calibration_windows=2,
        window=64,
        progress=False,
    )
    after = count_parameters(model, names)["params_targets"]
    assert before - after == result.plan.params_removed()
    assert result.plan.params_removed() >= 0.5 * before


def test_reproduce_laserrmt_preset():
    settings = CompressSettings.reproduce_laserrmt_preset()
    assert (settings.threshold, settings.mode, settings.select, settings.max_candidates) == (
        "laserrmt",
        "denoise",
        "loop",
        15,
    )
    assert settings.tolerance == 0.0 and settings.reproduce_laserrmt


def test_denoise_with_a_parameter_target_is_refused():
    analysis = analyze_model(planted(), progress=False)
    with pytest.raises(InvalidOptionError, match="denoise"):
        oneshot_plan(analysis, mode="denoise", target_params=0.2)


def test_loop_without_tokenizer_is_refused():
    with pytest.raises(InvalidOptionError, match="tokenizer"):
        compress(planted(), select="loop", progress=False)


# ---------------------------------------------------------------------------------------------
# Oracles for the selection loop: perplexity and KL computed here from the logits, the loop's
# keep/revert decisions checked against them at the edge of the tolerance.


def own_perplexity(model, windows):
    """exp of the mean next-token NLL over every predicted token of every window."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            out = model(window.unsqueeze(0)).logits[0, :-1].double()
            total += float(F.cross_entropy(out, window[1:], reduction="sum"))
            count += window.shape[0] - 1
    return math.exp(total / count)


def own_kl(model, reference, windows):
    """Mean KL(reference ‖ model) per token, in nats."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            teacher = torch.log_softmax(reference(window.unsqueeze(0)).logits[0].double(), -1)
            student = torch.log_softmax(model(window.unsqueeze(0)).logits[0].double(), -1)
            total += float((teacher.exp() * (teacher - student)).sum())
            count += window.shape[0]
    return total / count


def sharp_model_and_text():
    """The planted model with a 10× sharper head, and two windows sampled from it: on its own
    text any change costs (the loop's first change: +0.9 % perplexity, 0.018 nats/token)."""
    model = planted()
    model.lm_head.weight.data *= 10
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(63):
            probabilities = torch.softmax(model(ids).logits[:, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(probabilities, 1, generator=generator)], 1)
    return model, ids


def first_change(model, analysis):
    """The model with the loop's first candidate truncated (dense rank-k, computed here)."""
    record = rank_candidates(analysis, "snr")[0]
    changed = copy.deepcopy(model)
    layer = changed.get_submodule(record["module"])
    u, s, vh = torch.linalg.svd(layer.weight.data.double(), full_matrices=False)
    k = max(1, record["rank_kept"])
    layer.weight.data = ((u[:, :k] * s[:k]) @ vh[:k]).float()
    return changed


def test_objectives_measure_perplexity_and_kl_as_defined():
    model, windows = sharp_model_and_text()
    changed = first_change(model, analyze_model(model, progress=False))
    perplexity = make_objective("perplexity", windows, 0.02)
    assert perplexity.calibrate(model) == pytest.approx(own_perplexity(model, windows), rel=1e-6)
    assert perplexity(changed) == pytest.approx(own_perplexity(changed, windows), rel=1e-6)
    kl = make_objective("kl", windows, 0.01)
    assert kl.calibrate(model) == pytest.approx(0.0, abs=1e-6)
    assert kl(changed) == pytest.approx(own_kl(changed, model, windows), rel=1e-4)
    assert kl(changed) > 1e-3  # the change is visible, so the comparisons above can fail


@pytest.mark.parametrize("inside", [True, False])
@pytest.mark.parametrize("name", ["perplexity", "kl"])
def test_a_change_just_inside_the_tolerance_is_kept_and_just_outside_reverted(name, inside):
    model, windows = sharp_model_and_text()
    analysis = analyze_model(model, keep_vectors=True, progress=False)
    changed = first_change(model, analysis)
    if name == "perplexity":
        effect = own_perplexity(changed, windows) / own_perplexity(model, windows) - 1
    else:
        effect = own_kl(changed, model, windows)
    assert effect > 1e-3  # a real cost, far above the float noise of the measurement
    tolerance = effect * (1.01 if inside else 0.99)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    objective = make_objective(name, windows, tolerance)
    outcome = laser_loop(model, analysis, objective, max_candidates=1, progress=False)
    assert [step.accepted for step in outcome.steps] == [inside]
    state = model.state_dict()
    reverted = state.keys() == original.keys() and all(
        torch.equal(v, original[k]) for k, v in state.items()
    )
    assert reverted == (not inside)


@pytest.mark.parametrize(
    ("name", "tolerance", "reference", "edge"),
    [("perplexity", 0.02, 10.0, 10.2), ("kl", 0.05, 0.0, 0.05)],
)
def test_the_acceptance_rule_at_the_edge(windows, name, tolerance, reference, edge):
    objective = make_objective(name, windows, tolerance)
    objective.reference = objective.best = reference
    assert objective.accepts(edge)
    assert not objective.accepts(math.nextafter(edge, math.inf) * (1 + 1e-9))
    strict = make_objective(name, windows, tolerance, strict=True)
    strict.reference = strict.best = reference + 1.0
    assert strict.accepts(reference + 0.5) and not strict.accepts(reference + 1.0)
    strict.record(reference + 0.5)
    assert not strict.accepts(reference + 0.75)  # better than the reference, not than the best


def test_reproduce_laserrmt_keeps_only_strict_improvements():
    """The preset, run end to end: every step kept exactly when it beat the best so far."""
    settings = CompressSettings.reproduce_laserrmt_preset(calibration_windows=2, window=64, seed=0)
    model = planted()
    reference_model = copy.deepcopy(model)
    model, result = compress(model, tiny_tokenizer(), settings=settings, progress=False)
    windows = calibration_windows(tiny_tokenizer(), n_windows=2, window=64, seed=0)
    assert result.objective_reference == pytest.approx(
        own_perplexity(reference_model, windows), rel=1e-6
    )
    best = result.objective_reference
    between = 0  # rejected although below the reference: what only the strict rule rejects
    for step in result.steps:
        assert step.mode == "denoise"
        assert step.accepted == (step.objective < best), step
        between += not step.accepted and step.objective < result.objective_reference
        best = min(best, step.objective) if step.accepted else best
    assert any(step.accepted for step in result.steps)
    assert between >= 1
    assert own_perplexity(model, windows) == pytest.approx(best, rel=1e-6)
