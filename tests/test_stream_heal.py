"""Healing under ``compress --stream``: the teacher taken block by block, the written model healed.

The streamed teacher is checked against the top-k of the whole dense model's logits, the
healed folder against the unhealed one (closer to the dense model) and against the in-memory
path (same weights), and the command line end to end.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from laserrmt.cli import main
from laserrmt.evaluate import _windows_and_protocol, perplexity
from laserrmt.models.checkpoint import open_checkpoint
from laserrmt.models.streaming import BlockStream
from laserrmt.pipeline import (
    CompressSettings,
    _calibration_record,
    _calibration_windows,
    _healing_windows,
    compress,
    heal_saved,
)
from laserrmt.sequential import compress_streaming, streamed_teacher
from laserrmt.surgery.io import load, write_compressed
from tests.small_text import small_calibration_split
from tests.tiny_models import TINY_VOCAB_SIZE, save_tiny, tiny_llama, tiny_tokenizer


def windows(n: int, seed: int, length: int = 24) -> torch.Tensor:
    return torch.randint(
        0, TINY_VOCAB_SIZE, (n, length), generator=torch.Generator().manual_seed(seed)
    )


def stream_of(model, folder) -> BlockStream:
    model.save_pretrained(folder)
    return BlockStream(open_checkpoint(folder))


def test_the_streamed_teacher_is_the_top_k_of_the_dense_models_logits(tmp_path):
    model = tiny_llama(tie_word_embeddings=False)
    ids = windows(5, 3)
    k = CompressSettings().heal_top_k  # the in-memory path's k
    teacher = streamed_teacher(stream_of(model, tmp_path / "m"), ids, batch_size=2, progress=False)
    # Batches of 2 consecutive windows, the last shorter, as healing visits them.
    assert [t.indices.shape[0] for t in teacher] == [2, 2, 1]
    with torch.no_grad():
        log_p = F.log_softmax(model(ids).logits[:, :-1].double(), dim=-1)
    values, indices = log_p.topk(k, dim=-1)
    assert torch.equal(torch.cat([t.indices for t in teacher]).long(), indices)
    assert torch.allclose(torch.cat([t.log_probs for t in teacher]).double(), values, atol=1e-5)
    tail = torch.log1p(-values.exp().sum(-1))
    assert torch.allclose(torch.cat([t.log_tail for t in teacher]).double(), tail, atol=1e-5)


def _compressed(model, folder, calibration, heal_windows, batch_size=1, **options):
    """The streamed teacher on ``heal_windows`` (taken before the cut, as the CLI does) and the
    folder the streamed cut writes."""
    stream = stream_of(model, folder / "dense")
    teacher = streamed_teacher(stream, heal_windows, batch_size=batch_size, progress=False)
    out = folder / "out"
    out.mkdir()
    outcome = compress_streaming(stream, calibration, out, progress=False, **options)
    write_compressed(stream.model, out, plan=outcome.plan, weights_written=True)
    return teacher, out, outcome


def _kl_to(dense, model, ids) -> float:
    with torch.no_grad():
        p = F.log_softmax(dense(ids).logits, dim=-1)
        q = F.log_softmax(model(ids).logits, dim=-1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))


def test_streamed_healing_brings_the_written_model_closer_to_the_dense_one(tmp_path):
    # Weights drawn wider than the default: peaked next-token distributions that a cut of 40 %
    # visibly damages (at the default scale they are near uniform and the damage is tiny).
    model = tiny_llama(initializer_range=0.1)
    calibration = windows(6, 5)
    teacher, out, _ = _compressed(
        model, tmp_path, calibration, calibration, target_params=0.4, max_shard_size=40_000
    )
    unhealed = shutil.copytree(out, tmp_path / "unhealed")
    settings = CompressSettings(heal_steps=16, heal_lr=1e-3)
    healing, after = heal_saved(
        out, teacher, calibration, settings, evaluation=calibration, progress=False
    )
    healed = load(out)[0]
    before = load(unhealed)[0]
    assert healing["steps"] == 16 and len(healing["losses"]) == 16
    assert _kl_to(model, healed, calibration) < 0.9 * _kl_to(model, before, calibration)
    # The perplexity reported after healing is the written folder's.
    assert after.perplexity == pytest.approx(
        perplexity(healed, calibration, progress=False).perplexity, rel=1e-6
    )
    assert after.perplexity < perplexity(before, calibration, progress=False).perplexity
    # The shards as the stream wrote them (the tied head still an alias): only values changed.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in unhealed.iterdir())
    index = "model.safetensors.index.json"
    assert len(list(out.glob("model-*.safetensors"))) > 2
    assert (out / index).read_text() == (unhealed / index).read_text()
    assert healed.lm_head.weight is healed.model.embed_tokens.weight


def test_streamed_healing_gives_the_weights_of_the_in_memory_path(tmp_path):
    model = tiny_llama()
    tokenizer = tiny_tokenizer()
    settings = CompressSettings(
        method="budget",
        target_params=0.3,
        calibration_windows=4,
        window=48,
        heal_steps=4,
        heal_batch_size=2,
        heal_accumulate=2,
        heal_lr=1e-3,
        seed=3,
    )
    with small_calibration_split():
        calibration = _calibration_windows(tokenizer, settings)
        heal_windows = _healing_windows(tokenizer, settings)
        teacher, out, outcome = _compressed(
            model,
            tmp_path,
            calibration,
            heal_windows,
            batch_size=2,
            target_params=settings.target_params,
            calibration_source=_calibration_record(settings),
        )
        streamed_log, _ = heal_saved(out, teacher, heal_windows, settings, progress=False)
        # The in-memory path: the same plan replayed, the top-k teacher taken before the cut.
        in_memory, result = compress(
            tiny_llama(), tokenizer, settings=settings, plan=outcome.plan, progress=False
        )
    assert result.healing["teacher"] == streamed_log["teacher"] == "top-64 cache"
    healed = load(out)[0].state_dict()
    expected = in_memory.state_dict()
    assert healed.keys() == expected.keys()
    # Healing moves the factors by up to 2e-3 here (4 steps at lr 1e-3): another teacher,
    # schedule, trainable set or batch order shows at that scale. The two cuts agree to float32
    # rounding (Grams summed window by window in both; equal bit for bit on the CPU) and Adam's
    # step, about lr · sign(gradient), does not amplify a rounding-level difference, hence 1e-5.
    for name, tensor in expected.items():
        assert torch.allclose(healed[name], tensor, atol=1e-5, rtol=0), name
    assert streamed_log["losses"] == pytest.approx(result.healing["losses"], rel=1e-4)


def test_compress_stream_heals_from_the_command_line(tmp_path, capsys):
    folder = save_tiny(tiny_llama(tie_word_embeddings=False), tmp_path / "tiny", tiny_tokenizer())
    out = tmp_path / "o"
    with small_calibration_split():
        code = main(
            [
                *("-q", "compress", str(folder), "--stream", "--target-params", "0.3"),
                *("--calibration-windows", "2", "--eval-windows", "2", "--heal-steps", "2"),
                *("--out", str(out)),
            ]
        )
        assert code == 0, capsys.readouterr().err
        ids, _ = _windows_and_protocol(tiny_tokenizer(), None, 2, None)
    meta = json.loads((out / "laserrmt.json").read_text())["settings"]
    healing = meta["compress"]["healing"]
    assert healing["steps"] == 2 and len(healing["losses"]) == 2 and healing["tokens"] == 2 * 512
    model, _ = load(out)
    after = json.loads((out / "evaluation.json").read_text())["after"]["perplexity"]
    assert after == pytest.approx(perplexity(model, ids, progress=False).perplexity, rel=1e-6)
    assert after != meta["stream"]["perplexity_before_healing"]
    assert "healing KL" in (out / "report.html").read_text()


def test_rewriting_weights_of_another_shape_is_refused_before_any_file_changes(tmp_path):
    from laserrmt.errors import InvalidOptionError
    from laserrmt.surgery.shards import WeightFiles, rewrite_weights

    model = tiny_llama()
    folder = tmp_path / "m"
    model.save_pretrained(folder, max_shard_size="40KB")
    stored = {p: p.read_bytes() for p in folder.glob("*.safetensors")}
    last = WeightFiles(folder).names()[-1]  # in the file rewritten last
    state = {name: tensor + 1 for name, tensor in model.state_dict().items()}  # new values
    state[last] = torch.ones(3)
    with pytest.raises(InvalidOptionError, match=re.escape(last)):
        rewrite_weights(folder, state)
    assert {p: p.read_bytes() for p in folder.glob("*.safetensors")} == stored


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_streamed_healing_runs_on_cuda(tmp_path):
    model = tiny_llama(initializer_range=0.1)
    calibration = windows(4, 6)
    stream = BlockStream(open_checkpoint(save_tiny(model, tmp_path / "m")), device="cuda")
    teacher = streamed_teacher(stream, calibration, progress=False)
    assert teacher[0].log_probs.device.type == "cuda"
    out = tmp_path / "out"
    out.mkdir()
    outcome = compress_streaming(stream, calibration, out, target_params=0.4, progress=False)
    write_compressed(stream.model, out, plan=outcome.plan, weights_written=True)
    unhealed = load(out)[0]
    settings = CompressSettings(heal_steps=8, heal_lr=1e-3, device="cuda")
    _, after = heal_saved(out, teacher, calibration, settings, evaluation=calibration)
    assert after.perplexity == pytest.approx(
        perplexity(load(out)[0], calibration, progress=False).perplexity, rel=1e-4
    )
    assert _kl_to(model, load(out)[0], calibration) < _kl_to(model, unhealed, calibration)
