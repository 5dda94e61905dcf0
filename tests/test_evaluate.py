"""Measurements: perplexity against a hand computation, parameter counting, latency fields."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laserrmt.errors import NumericalError
from laserrmt.evaluate import (
    count_parameters,
    evaluate_model,
    measure_latency,
    perplexity,
    size_on_disk,
    track_peak_memory,
    weights_bytes,
)
from laserrmt.surgery.quantize import quantize_model_int8
from tests.tiny_models import TINY_VOCAB_SIZE, save_tiny, tiny_llama, tiny_tokenizer


class Output:
    def __init__(self, logits):
        self.logits = logits


class Uniform(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return Output(torch.zeros(*ids.shape, self.vocab))


def test_perplexity_matches_cross_entropy():
    model = tiny_llama()
    windows = torch.randint(0, 200, (3, 20))
    with torch.no_grad():
        logits = model(windows).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    result = perplexity(model, windows, progress=False)
    assert result.tokens == 3 * 19
    assert result.perplexity == pytest.approx(math.exp(expected.item()), rel=1e-5)


def test_uniform_model_has_the_vocabulary_size_as_perplexity():
    assert perplexity(Uniform(50), torch.randint(0, 50, (2, 9)), progress=False).perplexity == pytest.approx(50)


def test_nan_logits_are_an_error():
    class Broken(Uniform):
        def forward(self, ids):
            return Output(torch.full((*ids.shape, self.vocab), float("nan")))

    with pytest.raises(NumericalError):
        perplexity(Broken(5), torch.zeros(1, 4, dtype=torch.long), progress=False)


def test_tied_weights_count_once_and_int8_weights_count():
    model = tiny_llama(tie_word_embeddings=True)
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert count_parameters(model)["params_total"] == sum(unique.values())
    names = ["model.layers.0.mlp.up_proj"]
    assert count_parameters(model, names)["params_targets"] == 128 * 64
    before = count_parameters(model)["params_total"]
    quantize_model_int8(model, names)
    assert count_parameters(model)["params_total"] == before  # int8 buffers are still weights
    assert weights_bytes(model) < sum(t.numel() * 4 for t in tiny_llama().state_dict().values())


def test_latency_reports_medians_of_the_runs():
    result = measure_latency(tiny_llama(), prompt_tokens=8, new_tokens=4, repeats=3, warmup=1)
    assert len(result.prefill_ms_runs) == 3 and len(result.decode_runs) == 3
    assert sorted(result.prefill_ms_runs)[1] == result.prefill_ms
    assert result.decode_tokens_per_s > 0


def test_evaluate_model_fields(tmp_path):
    model = tiny_llama(tie_word_embeddings=False)
    folder = save_tiny(model, tmp_path / "m", tiny_tokenizer())
    result = evaluate_model(
        model, tiny_tokenizer(), n_windows=2, saved_path=folder, latency_repeats=1, progress=False
    ).to_dict()
    assert result["eval_tokens"] == 2 * 511 and result["eval_windows"] == 2
    assert result["size_bytes"] == size_on_disk(folder) > 0
    assert result["perplexity"] > 1 and result["prefill_ms"] > 0
    assert result["protocol"]["name"] == "wikipedia-gensim-v1"
    assert TINY_VOCAB_SIZE == model.config.vocab_size


def test_peak_memory_tracks_an_allocation():
    with track_peak_memory() as mem:
        # Larger than anything earlier tests freed, so the allocator must ask the OS for it.
        block = torch.ones(2**30 // 4)
        block += 1
    assert mem["growth_bytes"] >= 2**29
