"""The allocator settings of the streaming pipeline, checked in fresh processes (process-wide)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Allocates and frees a 24 MiB tensor three times; prints the resident growth after each free.
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from laserrmt.memory import map_large_allocations

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    if sys.argv[1] == "mapped":
        map_large_allocations()
    torch.ones(8)  # torch's own start-up allocations, outside the measurement
    before = rss()
    left = []
    for _ in range(3):
        block = torch.ones(6 * 2**20)  # 24 MiB, touched
        del block
        left.append(rss() - before)
    print(json.dumps(left))
    """
)


def _left_resident(mode: str) -> list[int]:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/proc/self/status").exists(),
    reason="glibc's allocator and /proc/self/status: Linux only",
)
def test_map_large_allocations_returns_freed_blocks_at_once():
    # glibc's own rule raises its map threshold to a freed block's size, so the second 24 MiB
    # block comes from the heap and stays resident after it is freed (the control shows that
    # the measurement sees it); with the fixed 16 MiB threshold every freed block leaves.
    assert max(_left_resident("default")[1:]) > 16 * 2**20
    assert max(_left_resident("mapped")) < 4 * 2**20
