"""Measurements: perplexity against a hand computation, parameter counting, size, memory and
latency on tiny models built here."""

from __future__ import annotations

import importlib.util
import json
import math
import mmap
import statistics
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laserrmt.data.text import PROTOCOL, evaluation_windows
from laserrmt.errors import (
    DataError,
    InvalidOptionError,
    ModelLoadError,
    NumericalError,
    TargetSelectionError,
)
from laserrmt.evaluate import (
    count_parameters,
    evaluate_model,
    measure_forward_latency,
    measure_latency,
    peak_memory_bytes,
    perplexity,
    size_on_disk,
    track_peak_memory,
)
from laserrmt.surgery.io import weight_bytes
from tests.tiny_models import (
    TINY_VOCAB_SIZE,
    save_tiny,
    tiny_bert,
    tiny_cnn,
    tiny_llama,
    tiny_tokenizer,
)

needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None, reason="gensim (the data extra) is not installed"
)


class ConstantLogits(nn.Module):
    """Logits filled with ``value`` everywhere: ``value = 0`` is the uniform distribution."""

    def __init__(self, vocab: int, value: float = 0.0) -> None:
        super().__init__()
        self.vocab, self.value = vocab, value
        self.config = SimpleNamespace(vocab_size=vocab)

    def forward(self, ids, **_):
        return SimpleNamespace(
            logits=torch.full((*ids.shape, self.vocab), self.value), past_key_values=None
        )


def random_windows(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, TINY_VOCAB_SIZE, (n, length), generator=torch.Generator().manual_seed(seed)
    )


# ---------------------------------------------------------------------------------------------
# perplexity


def test_perplexity_is_exp_of_the_mean_shifted_cross_entropy():
    model = tiny_llama()
    windows = random_windows(3, 20)
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="mean"
    ).item()
    result = perplexity(model, windows, progress=False)
    assert result.tokens == 3 * 19
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    batched = perplexity(model, windows, batch_size=2, progress=False)
    assert batched.perplexity == pytest.approx(result.perplexity, rel=1e-5)
    assert batched.tokens == result.tokens


def test_uniform_logits_give_the_vocabulary_size():
    result = perplexity(ConstantLogits(50), random_windows(2, 9) % 50, progress=False)
    assert result.perplexity == pytest.approx(50, rel=1e-6)
    assert result.nll == pytest.approx(math.log(50), rel=1e-6)
    assert result.tokens == 2 * 8


def test_perplexity_runs_in_eval_mode_and_restores_training():
    model = tiny_llama(attention_dropout=0.5)
    windows = random_windows(2, 16)
    reference = perplexity(model, windows, progress=False).perplexity
    model.train()
    assert perplexity(model, windows, progress=False).perplexity == pytest.approx(reference)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_are_a_numerical_error(value):
    with pytest.raises(NumericalError, match="NaN or Inf"):
        perplexity(ConstantLogits(5, value), torch.zeros(1, 4, dtype=torch.long), progress=False)


@pytest.mark.parametrize(
    "windows",
    [
        torch.zeros(4, dtype=torch.long),  # one dimension
        torch.zeros(2, 1, dtype=torch.long),  # nothing to predict
        torch.zeros(0, 8, dtype=torch.long),  # no windows
        torch.zeros(2, 8),  # not token ids
    ],
)
def test_malformed_windows_are_a_data_error(windows):
    with pytest.raises(DataError):
        perplexity(ConstantLogits(5), windows, progress=False)


def test_batch_size_must_be_positive():
    with pytest.raises(InvalidOptionError):
        perplexity(ConstantLogits(5), torch.zeros(1, 4, dtype=torch.long), batch_size=0)


# ---------------------------------------------------------------------------------------------
# parameters and size


def test_tied_head_is_counted_once():
    tied, untied = tiny_llama(tie_word_embeddings=True), tiny_llama(tie_word_embeddings=False)
    embedding = TINY_VOCAB_SIZE * 64
    total_tied = count_parameters(tied)["params_total"]
    assert total_tied == count_parameters(untied)["params_total"] - embedding
    assert total_tied == sum(p.numel() for p in tied.parameters())
    both = count_parameters(tied, ["model.embed_tokens", "lm_head"])
    assert both["params_targets"] == embedding
    assert (
        count_parameters(untied, ["model.embed_tokens", "lm_head"])["params_targets"]
        == 2 * embedding
    )
    assert weight_bytes(tied) == 4 * total_tied


def test_distinct_parameters_sharing_memory_count_once_and_disjoint_views_both():
    shared = nn.Module()
    shared.a = nn.Linear(4, 3, bias=False)
    shared.b = nn.Linear(4, 3, bias=False)
    shared.b.weight = nn.Parameter(shared.a.weight.data)  # another Parameter, same memory
    assert count_parameters(shared)["params_total"] == 12

    halves = nn.Module()
    base = torch.zeros(8, 4)
    halves.first = nn.Parameter(base[:4])
    halves.second = nn.Parameter(base[4:])
    assert count_parameters(halves)["params_total"] == 32


def test_targets_count_their_own_parameters_including_bias():
    model = tiny_llama()
    counts = count_parameters(
        model, ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    )
    assert counts["params_targets"] == 128 * 64 + 64 * 64
    assert counts["params_total"] == sum(p.numel() for p in model.parameters())
    linear = nn.Sequential(nn.Linear(5, 3))
    assert count_parameters(linear, ["0"])["params_targets"] == 5 * 3 + 3
    assert count_parameters(model)["params_targets"] == 0


def test_unknown_target_name_is_a_selection_error():
    with pytest.raises(TargetSelectionError, match=r"model\.layers\.7\.mlp"):
        count_parameters(tiny_llama(), ["model.layers.7.mlp"])


def test_int8_weight_buffers_count_as_weights():
    from laserrmt.surgery.quantize import quantize_model_int8

    model = tiny_llama()
    names = ["model.layers.0.mlp.up_proj"]
    before = count_parameters(model, names)
    quantize_model_int8(model, names)
    after = count_parameters(model, names)
    assert after["params_total"] == before["params_total"]
    assert after["params_targets"] == before["params_targets"] == 128 * 64
    assert weight_bytes(model) < weight_bytes(tiny_llama())


def test_size_on_disk_of_a_file_a_folder_and_its_weight_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"w" * 1000)
    (tmp_path / "config.json").write_bytes(b"c" * 30)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "extra.bin").write_bytes(b"x" * 200)
    assert size_on_disk(tmp_path / "config.json") == 30
    assert size_on_disk(tmp_path) == 1230
    assert size_on_disk(tmp_path, weights_only=True) == 1200
    with pytest.raises(ModelLoadError, match="does not exist"):
        size_on_disk(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------
# memory


def test_peak_memory_is_at_least_the_current_resident_set():
    with open("/proc/self/statm") as handle:
        resident = int(handle.read().split()[1]) * 4096
    assert peak_memory_bytes() >= resident * 0.9  # page size is 4 KiB on the machines we test


def _allocate_and_free(size: int, hold_s: float = 0.0) -> None:
    # An anonymous mapping: fresh pages that count once written to, whatever the allocator
    # holds (a tensor may reuse freed, still-resident heap that earlier tests left behind).
    with mmap.mmap(-1, size) as mapping:
        pages = torch.frombuffer(mapping, dtype=torch.uint8)
        pages.fill_(1)
        time.sleep(hold_s)
        del pages


def test_track_peak_memory_sees_a_short_lived_allocation_through_the_kernel_counter():
    import laserrmt.evaluate as evaluate

    if not evaluate._reset_high_water_mark():
        pytest.skip("this kernel refuses to reset VmHWM (/proc/self/clear_refs)")
    size = 256 * 2**20
    with track_peak_memory() as memory:
        _allocate_and_free(size)
    assert memory["source"] == "VmHWM"
    assert memory["growth_bytes"] >= 0.75 * size
    assert memory["peak_bytes"] == memory["start_bytes"] + memory["growth_bytes"]


def test_track_peak_memory_samples_when_the_kernel_counter_cannot_be_reset(monkeypatch):
    import laserrmt.evaluate as evaluate

    monkeypatch.setattr(evaluate, "_reset_high_water_mark", lambda: False)
    size = 256 * 2**20
    with track_peak_memory(interval_s=0.005) as memory:
        _allocate_and_free(size, hold_s=0.2)  # held for 40 sampling intervals
    assert memory["source"] == "/proc/self/statm"
    assert memory["growth_bytes"] >= 0.75 * size
    assert memory["peak_bytes"] == memory["start_bytes"] + memory["growth_bytes"]


def test_track_peak_memory_rejects_a_non_positive_interval():
    with pytest.raises(InvalidOptionError), track_peak_memory(interval_s=0):
        pass


# ---------------------------------------------------------------------------------------------
# latency


class InputRecorder:
    """Records the token ids each forward pass receives."""

    def __init__(self, model: nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.prompts: list[torch.Tensor] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.shapes.append(tuple(ids.shape))
        if ids.shape[1] > 1:
            self.prompts.append(ids.clone())


def test_latency_prefills_once_then_decodes_one_cached_token_at_a_time():
    model = tiny_llama()
    calls = InputRecorder(model)
    result = measure_latency(model, prompt_tokens=8, new_tokens=4, repeats=3, warmup=1)
    assert calls.shapes == ([(1, 8)] + [(1, 1)] * 4) * 4
    assert result.prefill_ms == statistics.median(result.prefill_ms_runs)
    assert result.decode_tokens_per_s == statistics.median(result.decode_runs)
    assert len(result.prefill_ms_runs) == len(result.decode_runs) == result.repeats == 3
    assert all(t > 0 for t in result.prefill_ms_runs + result.decode_runs)
    assert (result.prompt_tokens, result.new_tokens, result.warmup) == (8, 4, 1)


def test_latency_prompt_is_seeded():
    model = tiny_llama()
    calls = InputRecorder(model)
    for seed in (0, 0, 1):
        measure_latency(model, prompt_tokens=6, new_tokens=1, repeats=1, warmup=0, seed=seed)
    first, again, other = calls.prompts
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert int(first.max()) < TINY_VOCAB_SIZE


def test_latency_errors():
    with pytest.raises(InvalidOptionError, match="no KV cache"):
        measure_latency(ConstantLogits(7), prompt_tokens=4, new_tokens=2, repeats=1)
    with pytest.raises(InvalidOptionError, match="vocab_size"):
        measure_latency(nn.Linear(2, 2), repeats=1)
    for option in ({"repeats": 0}, {"new_tokens": 0}, {"prompt_tokens": 0}, {"warmup": -1}):
        with pytest.raises(InvalidOptionError):
            measure_latency(tiny_llama(), **option)


def test_forward_latency_of_an_encoder_and_of_a_cnn():
    model = tiny_bert()
    calls = InputRecorder(model)
    ms = measure_forward_latency(model, seq_len=16, batch_size=2, repeats=3, warmup=2)
    assert ms > 0
    assert calls.shapes == [(2, 16)] * 5
    assert measure_forward_latency(tiny_cnn(), inputs=torch.zeros(1, 1, 8, 8), repeats=2) > 0


# ---------------------------------------------------------------------------------------------
# evaluate_model


def test_evaluate_model_on_given_windows(tmp_path):
    model = tiny_llama(tie_word_embeddings=False)
    folder = save_tiny(model, tmp_path / "m")
    windows = random_windows(2, 24)
    names = ["model.layers.0.mlp.up_proj"]
    result = evaluate_model(
        model,
        None,
        windows=windows,
        target_names=names,
        saved_path=folder,
        latency_repeats=1,
        progress=False,
    )
    assert result.perplexity == pytest.approx(perplexity(model, windows, progress=False).perplexity)
    assert result.nll == pytest.approx(math.log(result.perplexity))
    assert (result.eval_tokens, result.eval_windows) == (2 * 23, 2)
    assert result.params_total == count_parameters(model)["params_total"]
    assert result.params_targets == 128 * 64
    assert result.size_bytes == (folder / "model.safetensors").stat().st_size
    assert result.size_bytes == size_on_disk(folder, weights_only=True) < size_on_disk(folder)
    assert result.prefill_ms > 0 and result.decode_tokens_per_s > 0
    assert result.latency["repeats"] == 1
    assert result.peak_memory_bytes > 0
    assert result.protocol == {
        "name": "custom-windows",
        "window": 24,
        "n_windows": 2,
        "pinned": False,
    }
    data = json.loads(json.dumps(result.to_dict()))
    assert data["perplexity"] == result.perplexity


def test_evaluate_model_without_latency_uses_the_state_dict_size():
    model = tiny_llama()
    result = evaluate_model(
        model, None, windows=random_windows(1, 8), latency=False, progress=False
    )
    assert (
        result.prefill_ms is None and result.decode_tokens_per_s is None and result.latency is None
    )
    assert result.size_bytes == weight_bytes(model)
    assert result.size_source == "state dict in memory"


@needs_gensim
def test_evaluate_model_defaults_to_the_pinned_evaluation_windows():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    result = evaluate_model(model, tokenizer, n_windows=2, latency=False, progress=False)
    expected = perplexity(model, evaluation_windows(tokenizer, n_windows=2), progress=False)
    assert result.perplexity == pytest.approx(expected.perplexity)
    assert (result.eval_windows, result.eval_tokens) == (2, 2 * 511)
    assert result.protocol["name"] == PROTOCOL["name"] == "wikipedia-gensim-enwiki-v1"
    assert result.protocol["n_windows"] == 2 and result.protocol["pinned"] is False


def test_evaluate_model_on_a_text_file_uses_the_windows_it_has(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(
        "the quick brown fox jumps over the lazy dog. " * 30, encoding="utf-8"
    )  # 1350 bytes
    result = evaluate_model(
        tiny_llama(), tiny_tokenizer(), text_file=path, n_windows=32, latency=False, progress=False
    )
    assert result.eval_windows == 2  # 1350 byte tokens hold two windows of 512
    assert result.protocol["name"] == "text-file"
    assert result.protocol["text_file"] == str(path)


def test_evaluate_model_argument_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer"):
        evaluate_model(tiny_llama(), None, latency=False, progress=False)
    with pytest.raises(InvalidOptionError, match="not both"):
        evaluate_model(
            tiny_llama(),
            None,
            windows=random_windows(1, 8),
            text_file=tmp_path / "x.txt",
            latency=False,
            progress=False,
        )
