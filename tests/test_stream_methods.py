"""The laser method and int8 quantization through the streaming pipeline (``--stream``).

The streamed laser one-shot run is checked against the in-memory one (same plan, same logits,
same perplexities), a streamed denoise decision against the rank-k truncation computed here by
brute force, and the streamed int8 quantization against the in-memory one.
"""

from __future__ import annotations

import json

import pytest
import torch

from laserrmt.cli import main
from laserrmt.errors import InvalidOptionError
from laserrmt.evaluate import perplexity
from laserrmt.models.checkpoint import open_checkpoint
from laserrmt.models.streaming import BlockStream
from laserrmt.pipeline import CompressSettings, compress, streamed_laser_plan
from laserrmt.sequential import compress_streaming
from laserrmt.surgery.io import load, weight_bytes, write_compressed
from laserrmt.surgery.quantize import Int8Linear, Int8LowRankLinear
from tests.tiny_models import (
    TINY_VOCAB_SIZE,
    save_tiny,
    tiny_bert,
    tiny_gemma,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
    tiny_tokenizer,
)


def windows(n: int, seed: int, length: int = 24) -> torch.Tensor:
    return torch.randint(
        0, TINY_VOCAB_SIZE, (n, length), generator=torch.Generator().manual_seed(seed)
    )


def streamed_laser(model, tmp_path, settings, evaluation=None):
    """The streamed laser run (analysis, plan, cut) of a saved ``model``, loaded back."""
    model.save_pretrained(tmp_path / "m")
    stream = BlockStream(open_checkpoint(tmp_path / "m"))
    plan, _ = streamed_laser_plan(stream, settings, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    outcome = compress_streaming(
        stream,
        None,
        out,
        target_params=None,
        plan=plan,
        evaluation=evaluation,
        quantize=settings.quantize,
        progress=False,
    )
    write_compressed(stream.model, out, plan=outcome.plan, weights_written=True)
    return outcome, load(out)[0]


@pytest.mark.parametrize(
    ("build", "mode", "target_params", "quantize"),
    [
        (tiny_llama, "factorize", 0.3, None),
        (tiny_gpt2, "factorize", None, None),  # HF Conv1D layers
        (tiny_qwen2, "denoise", None, None),
        (tiny_gemma, "factorize", None, "int8"),
    ],
)
def test_streamed_laser_oneshot_equals_the_in_memory_method(
    tmp_path, build, mode, target_params, quantize
):
    settings = CompressSettings(
        method="laser", mode=mode, target_params=target_params, quantize=quantize, stream=True
    )
    settings.validate()
    evaluation = windows(3, 2)
    model = build()
    dense_ppl = perplexity(model, evaluation, progress=False).perplexity
    streamed, loaded = streamed_laser(build(), tmp_path, settings, evaluation)

    in_memory, result = compress(
        model,
        None,
        settings=CompressSettings(
            method="laser", mode=mode, target_params=target_params, quantize=quantize
        ),
        progress=False,
    )
    decisions = {d.module: (d.mode, d.rank) for d in result.plan}
    assert decisions == {d.module: (d.mode, d.rank) for d in streamed.plan}
    assert any(m == mode for m, _ in decisions.values())
    if target_params is not None:  # the target stops the cut before every matrix is reduced
        assert any(m == "keep" for m, _ in decisions.values())
    ids = evaluation[:2]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, in_memory(ids).logits, atol=1e-5)
    assert streamed.perplexity_before.perplexity == pytest.approx(dense_ppl, rel=1e-6)
    after = perplexity(in_memory, evaluation, progress=False).perplexity
    assert streamed.perplexity_after.perplexity == pytest.approx(after, rel=1e-6)
    assert streamed.weight_bytes == weight_bytes(loaded) == weight_bytes(in_memory)
    if quantize:
        assert any(isinstance(m, Int8LowRankLinear) for m in loaded.modules())


def test_a_streamed_denoise_decision_is_the_rank_k_truncation(tmp_path):
    model = tiny_llama()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if "proj" in n}
    settings = CompressSettings(method="laser", mode="denoise", stream=True)
    streamed, loaded = streamed_laser(model, tmp_path, settings)
    denoised = [d for d in streamed.plan if d.mode == "denoise"]
    assert denoised and all(d.rank < d.rank_full for d in denoised)
    for decision in denoised:
        u, s, vh = torch.linalg.svd(original[decision.module].double(), full_matrices=False)
        k = decision.rank
        expected = (u[:, :k] * s[:k]) @ vh[:k]
        weight = loaded.get_submodule(decision.module).weight
        assert weight.shape == expected.shape  # dense: no parameter saved
        assert torch.allclose(weight.double(), expected, atol=1e-6), decision.module
        assert not torch.allclose(weight.double(), original[decision.module].double(), atol=1e-4)


def test_streamed_budget_with_int8_equals_the_in_memory_method(tmp_path):
    from laserrmt.methods.budget import budget_plan
    from laserrmt.models.targets import find_targets
    from laserrmt.pipeline import _cut
    from laserrmt.surgery.quantize import quantize_model_int8

    model = tiny_llama()
    calibration = windows(4, 1)
    save_tiny(model, tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    stream = BlockStream(open_checkpoint(tmp_path / "m"))
    streamed = compress_streaming(
        stream, calibration, out, target_params=0.3, quantize="int8", progress=False
    )
    write_compressed(stream.model, out, plan=streamed.plan, weights_written=True)
    with budget_plan(
        model, find_targets(model), calibration, target_params=0.3, progress=False
    ) as outcome:
        _cut(model, outcome.plan, outcome.svd_cache, calibration, 0.0, False)
    quantize_model_int8(model)
    loaded = load(out)[0]
    kinds = {type(m) for m in loaded.modules()}
    assert Int8Linear in kinds and Int8LowRankLinear in kinds
    ids = windows(2, 3)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert streamed.weight_bytes == weight_bytes(model)


def test_int8_is_refused_where_it_would_quantize_a_layer_outside_the_blocks(tmp_path):
    model = tiny_bert()  # its pooler is a linear layer outside the encoder blocks
    model.save_pretrained(tmp_path / "m")
    stream = BlockStream(open_checkpoint(tmp_path / "m"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidOptionError, match="pooler") as error:
        compress_streaming(
            stream,
            windows(2, 1),
            out,
            target_params=0.3,
            targets=["block:0-1"],
            quantize="int8",
            progress=False,
        )
    assert len(str(error.value).splitlines()) == 1
    assert not any(out.iterdir())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--select", "loop"], "--select loop re-evaluates the whole model after each change"),
        (["--quantize", "int3"], "does not take --quantize int3"),
        (["--sequential"], "does not take --sequential/--refine-steps with --method laser"),
    ],
)
def test_what_the_streamed_laser_method_cannot_do_is_refused_in_one_line(
    tmp_path, capsys, extra, message
):
    folder = save_tiny(tiny_llama(), tmp_path / "tiny", tiny_tokenizer())
    capsys.readouterr()
    args = ["-q", "compress", str(folder), "--method", "laser", "--stream", "--out"]
    assert main([*args, str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_laser_streams_from_the_command_line(tmp_path, capsys):
    folder = save_tiny(tiny_llama(tie_word_embeddings=False), tmp_path / "tiny", tiny_tokenizer())
    common = [
        "--method",
        "laser",
        "--target-params",
        "0.3",
        "--eval-windows",
        "2",
        "--quantize",
        "int8",
    ]
    for name, extra in (("memory", ["--no-latency"]), ("stream", ["--stream"])):
        code = main(["-q", "compress", str(folder), *common, *extra, "--out", str(tmp_path / name)])
        assert code == 0, capsys.readouterr().err
    results = {
        name: json.loads((tmp_path / name / "evaluation.json").read_text())
        for name in ("memory", "stream")
    }
    for when in ("before", "after"):
        assert results["stream"][when]["perplexity"] == pytest.approx(
            results["memory"][when]["perplexity"], rel=1e-6
        )
    # The whole model's count, embeddings and head included, as the in-memory run reports it
    # (after the cut the stream counts stored numbers: int8 scales too).
    assert (
        results["stream"]["before"]["params_total"] == results["memory"]["before"]["params_total"]
    )
    assert results["stream"]["after"]["params_total"] < results["stream"]["before"]["params_total"]
    plans = [
        json.loads((tmp_path / name / "laserrmt.json").read_text())["plan"]["modules"]
        for name in ("memory", "stream")
    ]
    ranks = [{n: (d["mode"], d["rank"]) for n, d in plan.items()} for plan in plans]
    assert ranks[0] == ranks[1]
    assert {mode for mode, _ in ranks[0].values()} == {"factorize", "keep"}
    streamed, in_memory = load(tmp_path / "stream")[0], load(tmp_path / "memory")[0]
    ids = windows(1, 9)
    with torch.no_grad():
        assert torch.allclose(streamed(ids).logits, in_memory(ids).logits, atol=1e-5)
    assert any(isinstance(m, Int8Linear) for m in streamed.modules())
