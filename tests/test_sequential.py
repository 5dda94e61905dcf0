"""The streaming pipeline (laserrmt.sequential) and its error-compensated fit.

The streamed budget method is checked against the in-memory one (same plan, same outputs), the
streamed Fisher against the whole-model backward, the carried hidden states against the model's
own forward, and the compensated factorization against brute-force least squares.
"""

from __future__ import annotations

import math

import pytest
import torch

from laserrmt.cli import main
from laserrmt.evaluate import perplexity
from laserrmt.methods.budget import budget_plan
from laserrmt.models.blockrun import BlockRunner
from laserrmt.models.checkpoint import open_checkpoint
from laserrmt.models.streaming import BlockStream
from laserrmt.models.targets import find_targets
from laserrmt.pipeline import _cut
from laserrmt.sequential import (
    compress_streaming,
    streamed_fisher_rows,
    streamed_perplexity,
)
from laserrmt.stats.calibration import collect_fisher_diagonal
from laserrmt.surgery.io import load, weight_bytes, write_compressed
from laserrmt.surgery.whiten import compensated_svd, weighted_svd
from tests.tiny_models import TINY_VOCAB_SIZE, tiny_bert, tiny_gemma, tiny_llama, tiny_qwen2

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def windows(n: int, seed: int, length: int = 24) -> torch.Tensor:
    return torch.randint(
        0, TINY_VOCAB_SIZE, (n, length), generator=torch.Generator().manual_seed(seed)
    )


def stream_of(model, folder, **kwargs) -> BlockStream:
    model.save_pretrained(folder)
    return BlockStream(open_checkpoint(folder), **kwargs)


@pytest.mark.parametrize(
    ("build", "share"), [(tiny_llama, 0.0), (tiny_gemma, 0.0), (tiny_qwen2, 0.0), (tiny_llama, 0.3)]
)
def test_streamed_budget_equals_the_in_memory_method(tmp_path, build, share):
    model = build()
    calibration, evaluation = windows(6, 1), windows(3, 2)
    stream = stream_of(model, tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    streamed = compress_streaming(
        stream,
        calibration,
        out,
        target_params=0.3,
        sparse_share=share,
        evaluation=evaluation,
        progress=False,
    )
    write_compressed(stream.model, out, plan=streamed.plan, weights_written=True)

    dense_ppl = perplexity(model, evaluation, progress=False).perplexity
    targets = find_targets(model)
    with budget_plan(model, targets, calibration, target_params=0.3, progress=False) as outcome:
        # The in-memory cut, sparse entries included when asked for.
        _cut(model, outcome.plan, outcome.svd_cache, calibration, share, False)
    ranks = {d.module: (d.mode, d.rank) for d in outcome.plan}
    assert ranks == {d.module: (d.mode, d.rank) for d in streamed.plan}
    assert any(mode == "factorize" for mode, _ in ranks.values())

    loaded = load(out)[0]
    ids = evaluation[:1]
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert streamed.perplexity_before.perplexity == pytest.approx(dense_ppl, rel=1e-6)
    in_memory = perplexity(model, evaluation, progress=False).perplexity
    assert streamed.perplexity_after.perplexity == pytest.approx(in_memory, rel=1e-6)
    assert streamed.weight_bytes == weight_bytes(loaded) == weight_bytes(model)


def test_blocks_carried_one_at_a_time_give_the_models_hidden_states(tmp_path):
    model = tiny_bert()  # an encoder: its blocks return tuples in some versions, masks differ
    stream = stream_of(model, tmp_path / "b")
    ids = windows(2, 3)
    runner = BlockRunner(stream, ids)
    hidden = list(runner.hidden)
    for index in range(len(stream.blocks)):
        with stream.block(index) as block:
            hidden = [runner.call(index, block, w, h) for w, h in enumerate(hidden)]
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    assert torch.allclose(torch.cat(hidden), expected, atol=1e-5)


def test_streamed_perplexity_and_fisher_equal_the_whole_model(tmp_path):
    model = tiny_llama(tie_word_embeddings=False)
    stream = stream_of(model, tmp_path / "m")
    ids = windows(3, 4)
    assert streamed_perplexity(stream, ids, progress=False).perplexity == pytest.approx(
        perplexity(model, ids, progress=False).perplexity, rel=1e-6
    )
    names = [t.name for t in find_targets(model)]
    streamed = streamed_fisher_rows(stream, ids, names, progress=False)
    whole = collect_fisher_diagonal(model, list(ids.split(1)), names, rows=True, progress=False)
    for name in names:
        assert torch.allclose(streamed[name], whole[name], rtol=1e-4, atol=1e-12), name


def test_a_tied_head_is_read_once_and_saved_as_an_alias(tmp_path):
    model = tiny_llama()  # tied embedding and head
    stream = stream_of(model, tmp_path / "m")
    with stream.outer() as skeleton:
        assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight


# ------------------------------------------------------------------ compensated factorization


def planted_shift(seed: int = 0, n: int = 24, m: int = 16, tokens: int = 400):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mixing
    # The compressed model's inputs: the dense ones, distorted by earlier errors.
    x_tilde = x @ (
        torch.eye(n, dtype=torch.float64)
        + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    )
    x_tilde = x_tilde + 0.05 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    return w, x, x_tilde


def rank_k(svd, k):
    return svd.U[:, :k] @ torch.diag(svd.s[:k]) @ svd.Vh[:k]


def test_full_rank_compensation_is_the_least_squares_solution():
    w, x, xt = planted_shift()
    svd = compensated_svd(w, xt.T @ xt, x.T @ xt, n_samples=x.shape[0], floor=1e-14)
    # argmin_W' Σ ||W x − W' x̃||²: least squares of x̃ W'ᵀ = x Wᵀ, solved independently.
    expected = torch.linalg.lstsq(xt, x @ w.T).solution.T
    assert torch.allclose(rank_k(svd, min(w.shape)), expected, atol=1e-8)


def test_the_truncated_fit_beats_the_uncompensated_one_and_its_right_factor_is_least_squares():
    w, x, xt = planted_shift(seed=1)
    k = 5
    svd = compensated_svd(w, xt.T @ xt, x.T @ xt, n_samples=x.shape[0], floor=1e-14)
    plain = weighted_svd(w, whiten="svdllm", gram=x.T @ x, n_samples=x.shape[0], floor=1e-14)

    def error(approx):
        return float((x @ w.T - xt @ approx.T).square().sum())

    assert error(rank_k(svd, k)) < 0.9 * error(rank_k(plain, k))
    # Brute force: no rank-k matrix found by gradient descent from the plain fit does better.
    a = (plain.U[:, :k] * plain.s[:k]).clone().requires_grad_(True)
    b = plain.Vh[:k].clone().requires_grad_(True)
    optimiser = torch.optim.Adam([a, b], lr=1e-2)
    for _ in range(3000):
        loss = (x @ w.T - xt @ (a @ b).T).square().sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert error(rank_k(svd, k)) <= float(loss.detach()) * (1 + 1e-6)
    # With U_k fixed, the right factor is the closed-form least-squares update.
    u = svd.U[:, :k]
    right = torch.diag(svd.s[:k]) @ svd.Vh[:k]
    target = (x @ w.T) @ u  # tokens × k
    assert torch.allclose(right.T, torch.linalg.lstsq(xt, target).solution, atol=1e-7)


def test_compensation_without_a_shift_is_svdllm():
    w, x, _ = planted_shift(seed=2)
    gram = x.T @ x
    ours = compensated_svd(w, gram, gram, n_samples=x.shape[0])
    svdllm = weighted_svd(w, whiten="svdllm", gram=gram, n_samples=x.shape[0])
    assert torch.allclose(ours.s, svdllm.s, rtol=1e-8)
    assert torch.allclose(rank_k(ours, 4), rank_k(svdllm, 4), atol=1e-8)


def test_sequential_fit_and_refinement_bring_the_compressed_model_closer(tmp_path):
    model = tiny_llama()
    calibration = windows(8, 5)
    errors = {}
    for variant, options in {
        "plain": {},
        "sequential": {"compensate": True},
        "refined": {"compensate": True, "refine_steps": 30, "refine_lr": 1e-3},
    }.items():
        stream = stream_of(model, tmp_path / f"m-{variant}")
        out = tmp_path / variant
        out.mkdir()
        result = compress_streaming(
            stream, calibration, out, target_params=0.4, progress=False, **options
        )
        write_compressed(stream.model, out, plan=result.plan, weights_written=True)
        compressed = load(out)[0]
        with torch.no_grad():
            errors[variant] = float(
                (compressed(calibration).logits - model(calibration).logits).square().mean()
            )
        if variant == "refined":
            assert all(r["error_after"] <= r["error_before"] for r in result.refinement)
            assert any(r["error_after"] < r["error_before"] for r in result.refinement)
    assert errors["sequential"] < errors["plain"]
    assert errors["refined"] <= errors["sequential"]


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sequential"], "add --stream"),
        (["--stream", "--quantize", "int4"], "does not take --quantize int4"),
        (["--stream"], "needs --target-params"),
    ],
)
def test_streaming_options_are_checked_first(tmp_path, capsys, extra, message):
    args = ["compress", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "-q", *extra]
    if "--target-params" not in extra and extra != ["--stream"]:
        args += ["--target-params", "0.2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.gpu
@CUDA
def test_the_streamed_budget_runs_on_cuda(tmp_path):
    model = tiny_llama()
    stream = stream_of(model, tmp_path / "m", device="cuda")
    out = tmp_path / "out"
    out.mkdir()
    result = compress_streaming(
        stream, windows(4, 1), out, target_params=0.3, evaluation=windows(2, 2), progress=False
    )
    assert math.isfinite(result.perplexity_after.perplexity)


def test_compress_and_evaluate_stream_from_the_command_line(tmp_path, capsys):
    import json

    from tests.small_text import small_calibration_split
    from tests.tiny_models import save_tiny, tiny_tokenizer

    folder = tmp_path / "tiny"
    save_tiny(tiny_llama(tie_word_embeddings=False), folder, tiny_tokenizer())
    common = ["--target-params", "0.3", "--calibration-windows", "2", "--eval-windows", "2"]
    with small_calibration_split():
        for name, extra in (
            ("memory", ["--method", "budget", "--no-latency"]),
            ("stream", ["--stream"]),
        ):
            code = main(
                ["-q", "compress", str(folder), *common, *extra, "--out", str(tmp_path / name)]
            )
            assert code == 0, capsys.readouterr().err
    results = {
        name: json.loads((tmp_path / name / "evaluation.json").read_text())
        for name in ("memory", "stream")
    }
    for when in ("before", "after"):
        assert results["stream"][when]["perplexity"] == pytest.approx(
            results["memory"][when]["perplexity"], rel=1e-6
        )
    streamed, _ = load(tmp_path / "stream")
    in_memory, _ = load(tmp_path / "memory")
    ids = windows(1, 9)
    assert torch.allclose(streamed(ids).logits, in_memory(ids).logits, atol=1e-5)

    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(folder),
                "--stream",
                "--eval-windows",
                "2",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    assert json.loads(report.read_text())["perplexity"] == pytest.approx(
        results["memory"]["before"]["perplexity"], rel=1e-6
    )


def test_a_plan_replayed_with_compensation_equals_the_full_run(tmp_path):
    model = tiny_llama()
    calibration = windows(6, 7)
    results, outputs = {}, {}
    for name, options in (("full", {}), ("replay", {"plan": "full"})):
        stream = stream_of(model, tmp_path / f"m-{name}")
        out = tmp_path / name
        out.mkdir()
        plan = results["full"].plan if options else None
        results[name] = compress_streaming(
            stream, calibration, out, target_params=0.3, compensate=True, plan=plan, progress=False
        )
        write_compressed(stream.model, out, plan=results[name].plan, weights_written=True)
        with torch.no_grad():
            outputs[name] = load(out)[0](calibration).logits
    assert results["replay"].timings["fisher"] < results["full"].timings["fisher"]
    assert torch.equal(outputs["full"], outputs["replay"])


def test_a_plan_the_streaming_cut_cannot_apply_is_refused(tmp_path):
    from dataclasses import replace

    from laserrmt.errors import InvalidOptionError
    from laserrmt.plan import CompressionPlan

    model = tiny_llama()
    stream = stream_of(model, tmp_path / "m")
    out = tmp_path / "o"
    out.mkdir()
    plan = compress_streaming(stream, windows(2, 1), out, target_params=0.3, progress=False).plan
    first = next(d for d in plan if d.mode == "factorize")
    denoising = CompressionPlan.from_decisions(
        [replace(d, mode="denoise") if d is first else d for d in plan], method="laser"
    )
    with pytest.raises(InvalidOptionError, match="denoise"):
        compress_streaming(
            stream_of(model, tmp_path / "m2"),
            windows(2, 1),
            tmp_path,
            target_params=0.3,
            compensate=True,
            plan=denoising,
            progress=False,
        )


def test_damping_pulls_the_compensated_fit_toward_the_dense_weight():
    w, x, xt = planted_shift(seed=3)
    n = x.shape[0]
    gram, cross = xt.T @ xt, x.T @ xt
    full = min(w.shape)
    lam = 0.5 * float(torch.diagonal(gram / n).mean())
    damped = rank_k(compensated_svd(w, gram, cross, n_samples=n, damping=0.5, floor=1e-14), full)
    # argmin Σ‖W x − W′ x̃‖²/n + λ‖W′ − W‖²: least squares with λ^{1/2} I rows appended.
    rows = torch.cat([xt / math.sqrt(n), math.sqrt(lam) * torch.eye(w.shape[1], dtype=w.dtype)])
    targets = torch.cat([x @ w.T / math.sqrt(n), math.sqrt(lam) * w.T])
    assert torch.allclose(damped, torch.linalg.lstsq(rows, targets).solution.T, atol=1e-8)
    strong = rank_k(compensated_svd(w, gram, cross, n_samples=n, damping=1e6), full)
    assert torch.allclose(strong, w, atol=1e-3)


def test_layers_are_grouped_by_the_input_they_share_in_the_order_they_run(tmp_path):
    from laserrmt.sequential import _input_groups

    stream = stream_of(tiny_llama(), tmp_path / "m")
    runner = BlockRunner(stream, windows(1, 2))
    names = [
        "mlp.down_proj", "mlp.up_proj", "self_attn.o_proj", "mlp.gate_proj",
        "self_attn.v_proj", "self_attn.q_proj", "self_attn.k_proj",
    ]  # fmt: skip
    with stream.block(1) as block, torch.no_grad():
        groups = _input_groups(runner, 1, block, runner.hidden[0], names)
    assert [sorted(g) for g in groups] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_a_refinement_that_does_not_help_is_reverted(tmp_path):
    model = tiny_llama()
    calibration = windows(4, 11)
    outputs = {}
    for name, options in (
        ("fit", {}),
        ("diverged", {"refine_steps": 5, "refine_lr": 1e3}),  # steps that can only hurt
    ):
        stream = stream_of(model, tmp_path / f"m-{name}")
        out = tmp_path / name
        out.mkdir()
        result = compress_streaming(
            stream, calibration, out, target_params=0.3, compensate=True, progress=False, **options
        )
        write_compressed(stream.model, out, plan=result.plan, weights_written=True)
        with torch.no_grad():
            outputs[name] = load(out)[0](calibration).logits
        if options:
            assert all(r["error_after"] == r["error_before"] for r in result.refinement)
    # The reverted parameters are the closed-form fit's, not merely reported as such.
    assert torch.equal(outputs["fit"], outputs["diverged"])


@pytest.mark.parametrize("tied", [True, False])
def test_the_stream_counts_the_parts_outside_the_blocks_once(tmp_path, tied):
    from laserrmt.sequential import _outer_numbers

    model = tiny_llama(tie_word_embeddings=tied)
    stream = stream_of(model, tmp_path / "m")
    # Counted from the model itself: every distinct parameter outside the two blocks.
    outside = {
        p.data_ptr(): p.numel()
        for name, p in model.named_parameters(remove_duplicate=False)
        if not name.startswith("model.layers.")
    }
    assert _outer_numbers(stream) == sum(outside.values())
