"""Layer-importance scores: normalisation, Fisher, spectral entropy and attention entropy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from laserrmt.errors import InvalidOptionError, NumericalError
from laserrmt.stats.importance import (
    attention_entropies,
    attention_entropy_importance,
    entropy_importance,
    fisher_importance,
    layer_importance,
    normalize_scores,
)
from tiny_models import tiny_llama


def test_normalize_scores_gives_mean_one_and_keeps_ratios():
    scores = normalize_scores({"a": 1.0, "b": 3.0, "c": 2.0})
    assert np.mean(list(scores.values())) == pytest.approx(1.0)
    assert scores["b"] / scores["a"] == pytest.approx(3.0)
    assert normalize_scores({"a": 0.0, "b": 0.0}) == {"a": 1.0, "b": 1.0}
    with pytest.raises(NumericalError, match="score of b"):
        normalize_scores({"a": 1.0, "b": float("nan")})


@dataclass
class _Stats:
    fisher: torch.Tensor | None


def test_fisher_importance_is_per_parameter():
    scores = fisher_importance(
        {
            "small": torch.full((4, 4), 2.0, dtype=torch.float64),
            "large": _Stats(torch.full((16, 8), 2.0, dtype=torch.float64)),
            "sensitive": np.full((4, 8), 6.0),
        }
    )
    # Same Fisher per parameter → same score whatever the size; three times as much → ×3.
    assert scores["small"] == pytest.approx(scores["large"])
    assert scores["sensitive"] == pytest.approx(3 * scores["small"])
    assert np.mean(list(scores.values())) == pytest.approx(1.0)
    with pytest.raises(InvalidOptionError, match="fisher=True"):
        fisher_importance({"a": _Stats(None)})
    with pytest.raises(NumericalError, match="zero for every matrix"):
        fisher_importance({"a": torch.zeros(2, 2)})


def test_entropy_importance_scores_concentrated_spectra_higher():
    flat = np.ones(16)
    spiked = np.r_[10.0, np.full(15, 0.1)]
    rank_one = np.r_[1.0, np.zeros(15)]
    scores = entropy_importance({"flat": flat, "spiked": spiked, "rank_one": rank_one})
    assert scores["flat"] == pytest.approx(0.0, abs=1e-12)  # maximal entropy: raw score 0
    assert scores["rank_one"] > scores["spiked"] > scores["flat"]
    # Raw score of rank one is 1 and of spiked is 1 − H/log 16; their ratio survives.
    p = spiked**2 / (spiked**2).sum()
    raw_spiked = 1 + (p * np.log(p)).sum() / math.log(16)
    assert scores["spiked"] / scores["rank_one"] == pytest.approx(raw_spiked)
    assert np.mean(list(scores.values())) == pytest.approx(1.0)


def _batches(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 264, (2, 24), generator=generator) for _ in range(2)]


def test_attention_entropy_gives_one_score_per_layer_and_restores_the_model():
    model = tiny_llama()
    implementation = model.config._attn_implementation
    model.train()
    entropies = attention_entropies(model, _batches())
    assert sorted(entropies) == [0, 1]
    assert all(0.0 < h <= 1.0 + 1e-6 for h in entropies.values())
    assert model.config._attn_implementation == implementation
    assert model.training and all(m.training for m in model.modules())


def test_uniform_attention_has_maximal_entropy_and_sharp_attention_is_more_important():
    model = tiny_llama()
    with torch.no_grad():
        # Zero queries make every logit 0: each row is uniform over the keys it may attend.
        model.model.layers[0].self_attn.q_proj.weight.zero_()
        # Large queries make layer 1 attend sharply.
        model.model.layers[1].self_attn.q_proj.weight.mul_(50.0)
        model.model.layers[1].self_attn.k_proj.weight.mul_(50.0)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 18:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask} for ids in _batches()]
    entropies = attention_entropies(model, batches)
    assert entropies[0] == pytest.approx(1.0, abs=1e-6)
    assert entropies[1] < 0.8

    names = [name for name, _ in model.named_modules() if name.endswith("_proj")]
    scores = attention_entropy_importance(model, batches, names)
    assert set(scores) == set(names)
    assert scores["model.layers.0.mlp.down_proj"] == 1.0
    layer0 = {scores[f"model.layers.0.self_attn.{p}_proj"] for p in "qkvo"}
    layer1 = {scores[f"model.layers.1.self_attn.{p}_proj"] for p in "qkvo"}
    assert len(layer0) == 1 and len(layer1) == 1  # one score per layer, shared by q/k/v/o
    assert layer0.pop() == pytest.approx(0.0, abs=1e-5)  # uniform → least important
    assert layer1.pop() == pytest.approx(2.0, abs=1e-5)  # mean 1 over the 8 attention matrices


def test_layer_importance_dispatches_and_rejects_unknown_kinds():
    names = ["a", "b"]
    assert layer_importance("none", names) == {"a": 1.0, "b": 1.0}
    spectra = {"a": np.ones(4), "b": np.r_[5.0, 1, 1, 1]}
    assert layer_importance("entropy", names, singular_values=spectra)["b"] > 1.0
    with pytest.raises(InvalidOptionError, match="unknown importance"):
        layer_importance("magic", names)
    with pytest.raises(InvalidOptionError, match="needs the Fisher information"):
        layer_importance("fisher", names)
    with pytest.raises(InvalidOptionError, match="no singular values for 1 targets"):
        layer_importance("entropy", names, singular_values={"a": np.ones(4)})
