"""Data-parallel healing and distillation: two CPU processes (gloo, launched by torchrun)
end with the student a single process gets from the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_worker import distilled_classifier, healed_llama
from tiny_models import save_tiny, tiny_llama, tiny_tokenizer

TESTS = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _torchrun(*args: str) -> tuple[list[str], dict[str, str]]:
    """A two-process launch on the loopback interface, and its environment."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS.parent / "src"), str(TESTS), env.get("PYTHONPATH", "")]
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        *args,
    ]
    return command, env


@pytest.mark.slow  # two torchrun processes
def test_two_processes_heal_to_the_single_process_result(tmp_path):
    command, env = _torchrun(str(TESTS / "distributed_worker.py"), str(tmp_path))
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as launch:
        # The single-process reference, computed while the two processes start.
        single = {"llama": healed_llama(), "classifier": distilled_classifier()}
        _, stderr = launch.communicate(timeout=240)
    assert launch.returncode == 0, stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all("fewer than the 2 processes" in r["refusal"] for r in ranks)
    for model, expected in single.items():
        for name, value in expected.items():
            # DDP keeps the processes identical: the same all-reduced gradients, the same steps.
            assert torch.equal(ranks[0][model][name], ranks[1][model][name]), name
            # Against one process: the forward passes of 1 + 2 rows and the two-term gradient
            # sum round differently in float32 (relative 1e-7 per operation); Adam's update is
            # scale-free, so a step moves a weight by at most lr·(that relative error) more,
            # and 3-4 steps at lr 1e-3..1e-2 stay far below 1e-6 (the weights are O(0.1-1)).
            torch.testing.assert_close(ranks[0][model][name], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compress_under_torchrun_heals_in_both_and_writes_from_process_zero(tmp_path):
    folder = save_tiny(tiny_llama(), tmp_path / "tiny", tiny_tokenizer())
    out = tmp_path / "out"
    command, env = _torchrun(
        *("-m", "laserrmt.cli", "compress", str(folder), "--method", "budget"),
        *("--target-params", "0.3", "--calibration-windows", "2", "--no-eval"),
        *("--heal-steps", "2", "--heal-batch-size", "2", "--out", str(out)),
    )
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved: ") == 1  # process 1 neither prints nor writes
    healing = json.loads((out / "laserrmt.json").read_text())["settings"]["compress"]["healing"]
    assert healing["batch_size"] == 2 and healing["teacher"] == "top-64 cache"
