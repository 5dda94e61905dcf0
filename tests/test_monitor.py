"""Spectral monitoring during training: records, events, report, advice plan (tiny models)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from laserrmt.cli import main
from laserrmt.errors import DataError, InvalidOptionError, OutputExistsError
from laserrmt.monitor import (
    PLAN_FILE,
    RECORDS_FILE,
    REPORT_FILE,
    SpectralMonitor,
    SpectralMonitorCallback,
    advice_plan,
    detect_events,
    read_run,
    render_report,
    watch,
)
from laserrmt.monitor.run import MonitorRun
from laserrmt.monitor.summary import mp_noise_entropy
from laserrmt.plan import CompressionPlan
from laserrmt.rmt import spectral_entropy
from laserrmt.surgery.apply import apply_plan
from tests.tiny_models import tiny_llama

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _teacher_run(run_dir: Path, *, rank: int = 3, steps: int = 40) -> nn.Sequential:
    """A linear student trained by SGD on a rank-``rank`` linear teacher, monitored every 2
    steps. Batches are whitened (XᵀX = 64·I), so from a random (MP-noise) initialisation the
    error W − T shrinks by the same factor in every direction: the bulk stays MP noise and the
    teacher's ``rank`` directions rise out of it one by one."""
    g = torch.Generator().manual_seed(1)
    n_in, n_out = 48, 32
    u = torch.linalg.qr(torch.randn(n_out, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n_in, rank, generator=g))[0]
    teacher = u @ torch.diag(torch.linspace(3.0, 2.0, rank)) @ v.T
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(n_in, n_out))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.02)
    monitor = SpectralMonitor(run_dir, every=2)
    for step in range(steps + 1):
        monitor.step(student, step)
        x = torch.linalg.qr(torch.randn(64, n_in, generator=g))[0] * 8.0
        y = x @ teacher.T + 0.1 * torch.randn(64, n_out, generator=g)
        loss = ((student(x) - y) ** 2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    monitor.close()
    return student


def test_planted_teacher_rank_rises_out_of_the_bulk(tmp_path: Path) -> None:
    _teacher_run(tmp_path)
    run = read_run(tmp_path)
    steps = [r["step"] for r in run.weights()]
    series = [r["n_tw"] for r in run.weights()]
    assert series[0] == 0  # the random initialisation is pure noise
    assert series[-1] == 3  # the teacher's rank, planted
    # An event at exactly the steps where the count of significant spikes went up.
    rises = [steps[i] for i in range(1, len(steps)) if series[i] > series[i - 1]]
    events = detect_events(run)
    assert [e["step"] for e in events if e["kind"] == "spike_emerged"] == rises
    assert rises and rises[0] > 0 and rises[-1] < steps[-1]


def test_advice_plan_loads_and_applies_at_the_planted_rank(tmp_path: Path) -> None:
    model = _teacher_run(tmp_path)
    plan = CompressionPlan.load(tmp_path / PLAN_FILE)
    assert [(d.module, d.rank, d.mode) for d in plan] == [("0", 3, "factorize")]
    layer = model[0]
    u, s, vt = np.linalg.svd(layer.weight.detach().double().numpy())
    truncated = (u[:, :3] * s[:3]) @ vt[:3]
    x = torch.randn(5, 48)
    expected = x.double().numpy() @ truncated.T + layer.bias.detach().double().numpy()
    apply_plan(model, plan, progress=False)
    np.testing.assert_allclose(model(x).detach().double().numpy(), expected, atol=1e-4)


def test_trainer_callback_records_every_target(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = tiny_llama().train()
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (8, 16), generator=g)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = SpectralMonitorCallback(tmp_path / "run", every=2)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    run = read_run(tmp_path / "run")
    assert run.ended and not run.truncated
    targets = run.modules()
    assert len(targets) == 14  # 2 blocks × (q, k, v, o, gate, up, down)
    assert sorted({r["step"] for r in run.weights()}) == [0, 2, 4]
    assert all(sum(r["step"] == s for r in run.weights()) == len(targets) for s in (0, 2, 4))
    # The last records hold the trained weights: the top singular value from numpy's SVD.
    for record in run.weights()[-len(targets) :]:
        w = model.get_submodule(record["module"]).weight.detach().double().numpy()
        assert record["s_max"] == pytest.approx(np.linalg.svd(w, compute_uv=False)[0], rel=1e-5)
    assert len(CompressionPlan.load(tmp_path / "run" / PLAN_FILE)) == len(targets)


def test_plain_loop_budget_shards_matrices_round_robin(tmp_path: Path) -> None:
    model = nn.Sequential(*[nn.Linear(12, 12) for _ in range(5)])
    monitor = SpectralMonitor(tmp_path, every=1, budget=2, keep_spectra=False)
    assert [monitor.step(model, s) for s in range(5)] == [2] * 5
    monitor.close()
    run = read_run(tmp_path)
    order = [r["module"] for r in run.weights()]
    assert order == ["0", "1", "2", "3", "4", "0", "1", "2", "3", "4"]
    assert all("singular_values" not in r for r in run.weights())


def test_steps_off_the_interval_record_nothing(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    monitor = SpectralMonitor(tmp_path, every=3)
    assert [monitor.step(model, s) for s in range(7)] == [1, 0, 0, 1, 0, 0, 1]
    assert monitor.step(model, 6) == 0  # the same step twice is recorded once


@pytest.mark.slow
def test_killed_run_keeps_its_records(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from torch import nn
        from laserrmt.monitor import SpectralMonitor
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
        monitor = SpectralMonitor({str(tmp_path)!r}, every=1)
        for step in range(3):
            monitor.step(model, step)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    run = read_run(tmp_path)
    assert not run.ended and not run.truncated
    assert [(r["step"], r["module"]) for r in run.weights()] == [
        (s, m) for s in range(3) for m in ("0", "1")
    ]
    # A kill in the middle of a write leaves half a line: it is dropped, the rest is kept.
    with (tmp_path / RECORDS_FILE).open("a") as handle:
        handle.write('{"type": "weight", "step": 3, "mod')
    cut = read_run(tmp_path)
    assert cut.truncated and len(cut.weights()) == 6
    report = render_report(tmp_path).read_text()
    assert "running or killed" in report and "cut short" in report


def test_damaged_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / RECORDS_FILE
    path.write_text('{"type": "header", "targets": [], "settings": {}}\nnot json\n{}\n')
    with pytest.raises(DataError, match="line 2"):
        read_run(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        read_run(tmp_path / "missing")


def test_report_renders_with_figures_and_events(tmp_path: Path) -> None:
    _teacher_run(tmp_path, steps=20)
    assert main(["monitor", str(tmp_path), "--steps", "0", "20"]) == 0
    html = (tmp_path / REPORT_FILE).read_text()
    # time series, heatmap, and two spectra for the one matrix
    assert html.count("data:image/png;base64,") == 4
    assert "spike_emerged" in html and "Compression advice" in html


def test_live_mode_stops_when_the_run_ended_or_went_idle(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    monitor = SpectralMonitor(tmp_path, every=1)
    monitor.step(model, 0)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    # Running, file not growing: one render, then it stops after `idle` seconds.
    renders = watch(tmp_path, interval=5, idle=20, clock=lambda: now[0], sleep=sleep)
    assert renders == 1 and now[0] == 20
    monitor.close()
    assert watch(tmp_path, interval=5, idle=20, clock=lambda: now[0], sleep=sleep) == 1
    with pytest.raises(InvalidOptionError):
        watch(tmp_path, interval=0)


def test_activation_spectra_of_a_probe_batch_find_planted_directions(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    d, n, rank = 24, 512, 2
    directions = torch.linalg.qr(torch.randn(d, rank, generator=g))[0]
    probe = torch.randn(n, d, generator=g) + 4.0 * torch.randn(n, rank, generator=g) @ directions.T
    layer = nn.Linear(d, d)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(d))
        layer.bias.zero_()
    monitor = SpectralMonitor(tmp_path, every=1, probe=[probe])
    monitor.step(nn.Sequential(layer), 0)
    (record,) = read_run(tmp_path).activations()
    assert record["n_mp"] == rank and record["shape"] == [d, n]


def test_events_from_hand_made_records(tmp_path: Path) -> None:
    def record(step: int, n_tw: int | None, alpha: float, status: str, erank: float) -> dict:
        return {
            "type": "weight",
            "step": step,
            "module": "m",
            "shape": [20, 10],
            "n_tw": n_tw,
            "alpha": alpha,
            "status": status,
            "kept_fraction": 1.0 if status != "ok" else 0.1,
            "effective_rank": erank,
            "spectral_entropy": 0.5,
            "entropy_mp": 0.9,
        }

    rows = [
        record(0, 0, 3.0, "ok", 9.0),
        record(10, 2, 1.5, "ok", 9.0),  # spikes up, α leaves [2, 6]
        record(20, 2, 3.0, "ok", 1.5),  # α back in, entropy collapse
        record(30, None, 3.0, "no_bulk", 1.5),  # bulk lost: kept fraction jumps to 1
    ]
    run = MonitorRun(tmp_path, {"targets": [{"name": "m"}], "settings": {"alpha": 0.05}}, rows)
    kinds = [(e["step"], e["kind"]) for e in detect_events(run)]
    assert kinds == [
        (10, "spike_emerged"),
        (10, "alpha_left_range"),
        (20, "alpha_entered_range"),
        (20, "entropy_collapse"),
        (30, "kept_fraction_jump"),
    ]
    (decision,) = advice_plan(run)
    assert decision.mode == "keep"  # the last spectrum cannot be judged


def test_mp_noise_entropy_matches_simulated_noise() -> None:
    rng = np.random.default_rng(0)
    for shape in ((300, 300), (150, 600)):
        simulated = np.mean(
            [
                spectral_entropy(np.linalg.svd(rng.standard_normal(shape), compute_uv=False))
                for _ in range(4)
            ]
        )
        assert mp_noise_entropy(shape) == pytest.approx(simulated, abs=2e-3)


def test_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError):
        SpectralMonitor(tmp_path, every=0)
    with pytest.raises(InvalidOptionError):
        SpectralMonitor(tmp_path, budget=0)
    monitor = SpectralMonitor(tmp_path, every=1)
    monitor.step(nn.Sequential(nn.Linear(8, 8)), 0)
    with pytest.raises(OutputExistsError):
        SpectralMonitor(tmp_path)
    header = json.loads((tmp_path / RECORDS_FILE).read_text().splitlines()[0])
    assert header["settings"]["every"] == 1 and header["targets"][0]["name"] == "0"


def test_compress_accepts_the_advice_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.test_analyze import PLANTED_RANK, plant_low_rank
    from tests.tiny_models import save_tiny, tiny_tokenizer

    model = plant_low_rank(tiny_llama(tie_word_embeddings=False))
    save_tiny(model, tmp_path / "model", tiny_tokenizer())
    monitor = SpectralMonitor(tmp_path / "run", every=1)
    monitor.step(model, 0)
    plan = CompressionPlan.load(monitor.close())
    assert {d.rank for d in plan} == {PLANTED_RANK}
    assert plan.counts()["factorize"] > 0  # the planted low ranks are worth factorizing
    code = main(
        [
            "--quiet",
            "compress",
            str(tmp_path / "model"),
            "--plan",
            str(tmp_path / "run" / PLAN_FILE),
            "--no-eval",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "laserrmt.json").read_text())
    assert saved["plan"]["method"] == "monitor"
    assert saved["plan"]["modules"] == plan.to_dict()["modules"]
