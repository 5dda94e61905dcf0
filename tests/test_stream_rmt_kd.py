"""RMT-KD through the streaming pipeline (``compress --stream --method rmt-kd``).

The streamed cuts are checked against the in-memory schedule with no distillation and a
tolerance no cut exceeds (each site measured on the model the earlier cuts left, which is what
the stream carries from block to block): same records, same kept units, same logits of the
written folder; and from the command line against the in-memory replay of its width plan.
"""

from __future__ import annotations

import json

import pytest
import torch

import laserrmt
from laserrmt.cli import main
from laserrmt.errors import InvalidOptionError
from laserrmt.evaluate import count_parameters, perplexity
from laserrmt.methods.rmt_kd import rmt_kd
from laserrmt.models.checkpoint import open_checkpoint
from laserrmt.models.streaming import BlockStream
from laserrmt.sequential import streamed_rmt_kd
from laserrmt.surgery.io import weight_bytes, write_compressed
from tests.small_text import small_calibration_split
from tests.tiny_models import (
    TINY_VOCAB_SIZE,
    save_tiny,
    tiny_bert,
    tiny_llama,
    tiny_tokenizer,
)


def planted_llama(**overrides):
    """A tiny Llama whose MLPs have 5 loud units each: the rank rule cuts both blocks, so the
    second block's cut depends on what the first one's cut passes on."""
    model = tiny_llama(**overrides)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:5] *= 8.0
            layer.mlp.up_proj.weight[:5] *= 8.0
    return model


def windows(n: int, seed: int, length: int = 64) -> torch.Tensor:
    return torch.randint(
        0, TINY_VOCAB_SIZE, (n, length), generator=torch.Generator().manual_seed(seed)
    )


def test_the_streamed_cuts_are_the_in_memory_schedule_without_distillation(tmp_path):
    model = planted_llama()  # tied head, as SmolLM2
    calibration, validation = windows(12, 1), windows(3, 2)
    stream = BlockStream(open_checkpoint(save_tiny(model, tmp_path / "m")))
    out = tmp_path / "out"
    out.mkdir()
    streamed = streamed_rmt_kd(stream, calibration, out, validation=validation, progress=False)
    write_compressed(stream.model, out, weights_written=True)

    def negative_nll(m):
        return -perplexity(m, validation, progress=False).nll

    expected = rmt_kd(
        model,
        [w.unsqueeze(0) for w in calibration],
        [],
        negative_nll,
        task="causal-lm",
        steps_per_cut=0,
        tolerance=1e9,
        progress=False,
    )
    got = streamed.result
    cut = [(r.site, r.d, r.k, r.status) for r in expected.records]
    assert [(r.site, r.d, r.k, r.status) for r in got.records] == cut
    assert [status for *_, status in cut] == ["kept", "kept"] and all(k < d for _, d, k, _ in cut)
    assert [(d.site, d.kept_width, d.kept) for d in got.plan] == [
        (d.site, d.kept_width, d.kept) for d in expected.plan
    ]
    for mine, theirs in zip(got.records, expected.records, strict=True):
        assert (mine.sigma, mine.edge) == pytest.approx((theirs.sigma, theirs.edge), rel=1e-9)
        assert (mine.parameters_before, mine.parameters_after) == (
            theirs.parameters_before,
            theirs.parameters_after,
        )
    assert got.plan.calibration["fingerprint"] == expected.plan.calibration["fingerprint"]
    loaded, _ = laserrmt.load(out)
    ids = windows(2, 3)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected.model(ids).logits, atol=1e-5)
    assert got.parameters_after == expected.parameters_after
    assert got.parameters_after == count_parameters(loaded)["params_total"]
    assert got.baseline_metric == pytest.approx(expected.baseline_metric, rel=1e-6)
    assert got.final_metric == pytest.approx(expected.final_metric, rel=1e-6)
    assert got.final_metric != pytest.approx(got.baseline_metric, rel=1e-6)
    assert streamed.weight_bytes == weight_bytes(loaded)


def test_an_encoders_attention_and_mlp_widths_stream_as_they_are_cut_in_memory(tmp_path):
    """Several sites in one block (BERT's value/output and query/key widths, then its MLP):
    each is measured on the block as its earlier sites' cuts left it."""
    model = tiny_bert(initializer_range=0.2)  # every site cut, each cut felt downstream
    calibration = windows(12, 1, length=32)
    stream = BlockStream(open_checkpoint(save_tiny(model, tmp_path / "m")))
    out = tmp_path / "out"
    out.mkdir()
    got = streamed_rmt_kd(stream, calibration, out, progress=False).result
    write_compressed(stream.model, out, weights_written=True)
    expected = rmt_kd(
        model,
        [{"input_ids": w.unsqueeze(0)} for w in calibration],
        [],
        lambda m: 0.0,
        task="classification",
        steps_per_cut=0,
        tolerance=1e9,
        progress=False,
    )
    records = [(r.site, r.kind, r.k, r.status) for r in expected.records]
    assert [(r.site, r.kind, r.k, r.status) for r in got.records] == records
    assert [status for *_, status in records] == ["kept"] * 6
    assert [(d.site, d.kept_width) for d in got.plan] == [
        (d.site, d.kept_width) for d in expected.plan
    ]
    loaded, _ = laserrmt.load(out)
    ids = calibration[:2]
    with torch.no_grad():
        want = expected.model(ids).last_hidden_state
        assert torch.allclose(loaded(ids).last_hidden_state, want, atol=1e-5)


def test_a_site_outside_the_blocks_is_refused_before_anything_is_written(tmp_path):
    stream = BlockStream(open_checkpoint(save_tiny(tiny_llama(), tmp_path / "m")))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidOptionError, match="not inside one transformer block") as error:
        streamed_rmt_kd(stream, windows(2, 1), out, sites=["residual_stream"], progress=False)
    assert len(str(error.value).splitlines()) == 1
    assert not any(out.iterdir())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted")
    return save_tiny(planted_llama(tie_word_embeddings=False), path / "m", tiny_tokenizer())


def test_compress_stream_rmt_kd_writes_a_folder_its_width_plan_replays(folder, tmp_path, capsys):
    stream, replay = tmp_path / "stream", tmp_path / "replay"
    with small_calibration_split():
        common = ["-q", "compress", str(folder), "--no-eval", "--out"]
        argv = [*common, str(stream), "--method", "rmt-kd", "--stream", "--steps-per-cut", "0"]
        assert main(argv) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        assert main([*common, str(replay), "--plan", str(stream / "width_plan.json")]) == 0
    assert f"replay: --plan {stream}/width_plan.json" in printed
    plan = json.loads((stream / "width_plan.json").read_text())
    assert plan["trained"] == "" and plan["calibration"]["recipe"]["n_windows"] == 32
    kept = {s["site"]: s["kept_width"] for s in plan["sites"]}
    assert kept and all(width < 128 for width in kept.values())
    streamed, _ = laserrmt.load(stream)
    for site, width in kept.items():
        assert streamed.get_submodule(site).down_proj.in_features == width
    in_memory, _ = laserrmt.load(replay)
    ids = windows(2, 4)
    with torch.no_grad():
        assert torch.allclose(streamed(ids).logits, in_memory(ids).logits, atol=1e-5)
    settings = json.loads((stream / "laserrmt.json").read_text())["settings"]
    assert settings["rmt_kd"]["settings"]["stream"] is True
    assert settings["stream"]["peak_memory_bytes"] > 0
    assert (stream / "report.html").exists() and (stream / "evaluation.json").exists()


def test_compress_stream_rmt_kd_heals_the_written_model(folder, tmp_path, capsys):
    out = tmp_path / "o"
    with small_calibration_split():
        argv = ["-q", "compress", str(folder), "--method", "rmt-kd", "--stream", "--out", str(out)]
        code = main([*argv, "--eval-windows", "2", "--heal-steps", "2"])
        assert code == 0, capsys.readouterr().err
        from laserrmt.evaluate import _windows_and_protocol

        ids, _ = _windows_and_protocol(tiny_tokenizer(), None, 2, None)
    settings = json.loads((out / "laserrmt.json").read_text())["settings"]
    healing = settings["stream"]["healing"]
    assert healing["steps"] == 2 and len(healing["losses"]) == 2
    assert "healed for 2 steps" in settings["rmt_kd"]["plan"]["trained"]
    model, _ = laserrmt.load(out)
    after = json.loads((out / "evaluation.json").read_text())["after"]["perplexity"]
    assert after == pytest.approx(perplexity(model, ids, progress=False).perplexity, rel=1e-6)
    assert after != settings["stream"]["perplexity_before_healing"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps-per-cut", "5"], "so --steps-per-cut has nothing to act on"),
        (["--distill-lr", "1e-3"], "so --distill-lr has nothing to act on"),
        (["--temperature", "2"], "so --temperature has nothing to act on"),
        (["--tolerance", "0.1"], "so --tolerance has nothing to act on"),
        (["--checkpoint-dir", "ckpt"], "so --checkpoint-dir has nothing to act on"),
        (["--resume"], "so --resume has nothing to act on"),
        (["--dataset", "bbc-news"], "compresses causal language models"),
        (["--quantize", "int8"], "--quantize/--sequential/--refine-steps with --method rmt-kd"),
        (["--sites", "residual_stream"], "not inside one transformer block"),
    ],
)
def test_what_the_streamed_rmt_kd_cannot_do_is_refused_in_one_line(
    folder, tmp_path, capsys, extra, message
):
    argv = ["-q", "compress", str(folder), "--method", "rmt-kd", "--stream", "--no-eval"]
    with small_calibration_split():
        assert main([*argv, "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_the_streamed_cuts_on_cuda_are_those_on_the_cpu(tmp_path):
    folder = save_tiny(planted_llama(), tmp_path / "m")
    calibration = windows(12, 1)
    plans = []
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        out.mkdir()
        stream = BlockStream(open_checkpoint(folder), device=device)
        result = streamed_rmt_kd(stream, calibration, out, progress=False).result
        plans.append([(d.site, d.kept_width, d.kept) for d in result.plan])
    assert plans[0] == plans[1] and plans[0]
    on_cpu, on_gpu = laserrmt.load(tmp_path / "cpu")[0], laserrmt.load(tmp_path / "cuda")[0]
    ids = windows(2, 3)
    with torch.no_grad():
        assert torch.allclose(on_gpu(ids).logits, on_cpu(ids).logits, atol=1e-4)


def test_the_distillation_options_still_reach_the_in_memory_run(folder, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["-q", "compress", str(folder), "--method", "rmt-kd", "--no-eval", "--out", str(out)]
    options = ["--steps-per-cut", "1", "--distill-lr", "1e-3", "--kd-alpha", "0.5"]
    with small_calibration_split():
        assert main([*argv, *options, "--temperature", "2"]) == 0, capsys.readouterr().err
    settings = json.loads((out / "laserrmt.json").read_text())["settings"]["rmt_kd"]["settings"]
    assert (settings["steps_per_cut"], settings["lr"]) == (1, 1e-3)
    assert (settings["alpha"], settings["temperature"]) == (0.5, 2.0)
