"""LaserRMT decisions: one-shot plans, the selection loop, reverts, the reproduction preset."""

from __future__ import annotations

import pytest
import torch

from laserrmt.analyze import analyze_model
from laserrmt.pipeline import CompressSettings, compress
from laserrmt.data.text import calibration_windows
from laserrmt.errors import InvalidOptionError
from laserrmt.evaluate import count_parameters
from laserrmt.methods.laser import laser_loop, oneshot_plan, rank_candidates
from laserrmt.methods.objectives import make_objective
from laserrmt.models.targets import find_targets
from laserrmt.surgery.lowrank import LowRankLinear
from tests.test_analyze import PLANTED_RANK, plant_low_rank
from tests.tiny_models import tiny_llama, tiny_tokenizer


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
