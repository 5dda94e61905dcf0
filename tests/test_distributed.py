"""Data-parallel healing and distillation, replicated (DDP) and sharded (FSDP): two CPU
processes (gloo, launched by torchrun) end with the student a single process gets from the
same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_worker import _mlp, distilled_classifier, healed_llama
from laserrmt.cli import main
from laserrmt.distill import distill
from laserrmt.errors import InvalidOptionError
from laserrmt.pipeline import CompressSettings
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
        for run in (model, f"{model}_fsdp"):
            for name, value in expected.items():
                # DDP keeps the processes identical (the same all-reduced gradients, the same
                # steps); FSDP's final all-gather gives both the same full tensors.
                assert torch.equal(ranks[0][run][name], ranks[1][run][name]), (run, name)
                # Against one process: the forward passes of 1 + 2 rows and the two-term
                # gradient sum (all-reduced or reduce-scattered, both in float32) round
                # differently (relative 1e-7 per operation); Adam's update is scale-free, so a
                # step moves a weight by at most lr·(that relative error) more, and 3-4 steps at
                # lr 1e-3..1e-2 stay far below 1e-6 (the weights are O(0.1-1)).
                torch.testing.assert_close(ranks[0][run][name], value, rtol=0, atol=1e-6)
    # Sharded, not replicated: the optimizer of each FSDP run (healing, then the classifier)
    # held a part of the trainable elements in each process, and the two parts are the whole.
    assert len(ranks[0]["held"]) == len(ranks[1]["held"]) == 2
    for (held_0, total), (held_1, _) in zip(ranks[0]["held"], ranks[1]["held"], strict=True):
        assert 0 < held_0 < total and 0 < held_1 < total and held_0 + held_1 == total


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True])
def test_compress_under_torchrun_heals_in_both_and_writes_from_process_zero(tmp_path, sharded):
    folder = save_tiny(tiny_llama(), tmp_path / "tiny", tiny_tokenizer())
    out = tmp_path / "out"
    command, env = _torchrun(
        *("-m", "laserrmt.cli", "compress", str(folder), "--method", "budget"),
        *("--target-params", "0.3", "--calibration-windows", "2", "--no-eval"),
        *("--heal-steps", "2", "--heal-batch-size", "2", "--out", str(out)),
        *(["--heal-fsdp"] if sharded else []),
    )
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved: ") == 1  # process 1 neither prints nor writes
    healing = json.loads((out / "laserrmt.json").read_text())["settings"]["compress"]["healing"]
    assert healing["batch_size"] == 2 and healing["teacher"] == "top-64 cache"
    assert healing["sharded"] is sharded


def test_sharding_without_a_process_group_is_refused(tmp_path, capsys):
    batches = [(torch.randn(2, 6), torch.tensor([0, 1]))]
    with pytest.raises(InvalidOptionError, match=r"shard=True .* launch with torchrun"):
        distill(_mlp(1), _mlp(0), batches, steps=1, lr=1e-2, task="classification", shard=True)
    with pytest.raises(InvalidOptionError, match="add --heal-steps or --heal-tokens"):
        CompressSettings(heal_fsdp=True).validate()
    folder = save_tiny(tiny_llama(), tmp_path / "tiny", tiny_tokenizer())
    for method, fragment in (("budget", "launch with torchrun"), ("rmt-kd", "drop --heal-fsdp")):
        code = main(
            [
                *("--quiet", "compress", str(folder), "--method", method, "--no-eval"),
                *("--target-params", "0.3", "--heal-steps", "2", "--heal-fsdp"),
                *("--out", str(tmp_path / "out")),
            ]
        )
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.startswith("laserrmt: error:")]
        assert code == 2 and len(lines) == 1 and fragment in lines[0], err
        assert "Traceback" not in err and not (tmp_path / "out").exists()
