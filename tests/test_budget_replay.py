"""A saved budget plan rebuilds the run's model, or refuses with one line.

The ranks alone do not fix a whitened factorization: the factors come from calibration
statistics. A replayed plan once got plain-SVD factors at the same ranks (max |Δlogit| 0.37 on
the tiny Llama); these tests compare the replayed model's logits with the run's own.
"""

from __future__ import annotations

import json

import pytest
import torch

import laserrmt
from laserrmt.cli import main
from laserrmt.errors import PlanError
from laserrmt.pipeline import CompressSettings, compress
from laserrmt.plan import CompressionPlan
from tests.small_text import small_calibration_split
from tests.tiny_models import save_tiny, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _small_split():
    """Calibration windows from a small split (see tests/small_text.py)."""
    with small_calibration_split():
        yield


IDS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(7))
RUN = {"method": "budget", "target_params": 0.3, "calibration_windows": 2, "window": 64}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def svdllm_run(tmp_path_factory):
    """A budget run with a seed other than the default, and its plan saved as JSON."""
    model, result = compress(
        tiny_llama(), tiny_tokenizer(), whiten="svdllm", seed=3, progress=False, **RUN
    )
    path = result.plan.save(tmp_path_factory.mktemp("plan") / "plan.json")
    return logits(model), path, result.plan


def replay(plan, **settings):
    """Replay as the CLI does: its own settings (here the defaults: seed 0, 16 windows of 512)
    next to the plan."""
    model, _ = compress(
        tiny_llama(),
        tiny_tokenizer(),
        settings=CompressSettings(**settings),
        plan=plan,
        progress=False,
    )
    return model


def test_a_saved_svdllm_plan_replays_the_same_model(svdllm_run):
    expected, path, plan = svdllm_run
    assert plan.counts()["factorize"] >= 3  # the ranks alone would not fix the factors
    replayed = replay(CompressionPlan.load(path))
    assert torch.allclose(logits(replayed), expected, atol=1e-5, rtol=0)


def test_plain_svd_at_the_same_ranks_is_a_different_model(svdllm_run):
    """The replay test above can fail: factors without whitening differ by far more than 1e-5."""
    expected, path, _ = svdllm_run
    data = json.loads(path.read_text())
    data["factors"] = {"whiten": "none"}
    plain = replay(CompressionPlan.from_dict(data))
    assert (logits(plain) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("whiten", ["asvd", "fisher"])
def test_other_whitenings_replay_the_same_model(whiten, tmp_path):
    model, result = compress(
        tiny_llama(),
        tiny_tokenizer(),
        whiten=whiten,
        seed=5,
        fisher_windows=1,
        progress=False,
        **RUN,
    )
    path = result.plan.save(tmp_path / "plan.json")
    replayed = replay(CompressionPlan.load(path), seed=0, fisher_windows=4)
    assert torch.allclose(logits(replayed), logits(model), atol=1e-5, rtol=0)


def _edited(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    return data


def _drop(*keys):
    def edit(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return edit


def _set(value, *keys):
    def edit(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        # a plan saved before plans recorded their factors
        (_drop("factors"), ["'svdllm'", "do not record the calibration"]),
        (_set(None, "factors", "calibration"), ["do not record the calibration"]),
        (_drop("factors", "calibration", "seed"), ["lack seed"]),
        (_drop("factors", "floor"), ["lack floor"]),
        (_set("my notes.txt", "factors", "calibration", "source"), ["'my notes.txt'"]),
        # a seed edited by hand draws other windows than the ones the factors came from
        (_set(4, "factors", "calibration", "seed"), ["differ from those it was made with"]),
    ],
)
def test_a_plan_that_cannot_rebuild_its_factors_is_refused_with_one_line(
    svdllm_run, edit, fragments
):
    _, path, _ = svdllm_run
    plan = CompressionPlan.from_dict(_edited(path, edit))
    model = tiny_llama()
    before = logits(model)
    with pytest.raises(PlanError) as caught:
        compress(model, tiny_tokenizer(), plan=plan, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert torch.equal(logits(model), before)  # refused before any surgery


def test_a_laser_plan_replays_the_same_model(tmp_path):
    """Plain-SVD plans need no data; the analysis' cached SVD and a fresh one agree."""
    model, result = compress(tiny_llama(), tiny_tokenizer(), threshold="mp", progress=False)
    assert result.plan.counts()["factorize"] >= 1
    path = result.plan.save(tmp_path / "plan.json")
    replayed = replay(CompressionPlan.load(path))
    assert torch.allclose(logits(replayed), logits(model), atol=1e-5, rtol=0)


def test_compress_plan_from_the_command_line_rebuilds_the_model(capsys, tmp_path):
    folder = save_tiny(tiny_llama(tie_word_embeddings=False), tmp_path / "tiny", tiny_tokenizer())
    common = ["--quiet", "compress", str(folder), "--no-eval"]
    first = tmp_path / "first"
    budget = ["--whiten", "svdllm", "--target-params", "0.3", "--calibration-windows", "1"]
    assert main([*common, *budget, "--seed", "2", "--out", str(first)]) == 0
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(json.loads((first / "laserrmt.json").read_text())["plan"]))
    second = tmp_path / "second"
    assert main([*common, "--plan", str(plan_file), "--out", str(second)]) == 0, capsys
    run_model, _ = laserrmt.load(first)
    replayed_model, _ = laserrmt.load(second)
    assert torch.allclose(logits(replayed_model), logits(run_model), atol=1e-5, rtol=0)


def test_refusal_is_a_laserrmt_error_on_the_command_line(capsys, tmp_path, svdllm_run):
    _, path, _ = svdllm_run
    folder = save_tiny(tiny_llama(tie_word_embeddings=False), tmp_path / "tiny", tiny_tokenizer())
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(_edited(path, _drop("factors"))))
    code = main(["--quiet", "compress", str(folder), "--no-eval", "--plan", str(edited),
                 "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("laserrmt: error:")]
    assert len(errors) == 1 and "calibration" in errors[0], err
    assert "Traceback" not in err


def test_healing_and_int8_after_a_replay_follow_the_same_settings():
    """Healing and quantization are not in the plan; with the run's settings a replay heals
    and quantizes to the identical model (healing is seeded)."""
    settings = CompressSettings(seed=3, heal_steps=2, quantize="int8", **RUN)
    model, result = compress(tiny_llama(), tiny_tokenizer(), settings=settings, progress=False)
    plan = CompressionPlan.from_dict(json.loads(result.plan.to_json()))
    replayed, _ = compress(
        tiny_llama(), tiny_tokenizer(), settings=settings, plan=plan, progress=False
    )
    assert torch.equal(logits(replayed), logits(model))
