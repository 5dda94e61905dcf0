"""Shared parts of the benchmarks: machine description, timing, and Markdown result files."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_description() -> list[tuple[str, str]]:
    """What a reader needs to judge the numbers: hardware, software, threads, date."""
    import numpy
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    return [
        ("date", _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("cpu", f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"),
        ("python", sys.version.split()[0]),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        ("numpy", numpy.__version__),
        ("laserrmt commit", commit or "unknown"),
        (
            "load average at write time (1/5/15 min)",
            " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        ),
    ]


def write_result(name: str, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write ``benchmarks/results/<name>.md``: a title, the machine, then (heading, body) sections."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine_description()]
    for heading, body in sections:
        lines += ["", f"## {heading}", "", body.rstrip()]
    path = RESULTS / f"{name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def merge_result(
    name: str, title: str, sections: list[tuple[str, str]], order: tuple[str, ...] = ()
) -> Path:
    """Write the new sections, keeping every other section of an existing result file.

    Sections are sorted by their place in ``order``; those not in it keep their order, last.
    """
    path = RESULTS / f"{name}.md"
    kept: list[tuple[str, str]] = []
    if path.is_file():
        chunks = re.split(r"^## (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
        new = {heading for heading, _ in sections}
        for heading, body in zip(chunks[1::2], chunks[2::2], strict=True):
            if heading != "Machine" and heading not in new:
                kept.append((heading, body.strip()))
    place = {h: i for i, h in enumerate(order)}
    merged = sorted(kept + sections, key=lambda hb: place.get(hb[0], len(place)))
    return write_result(name, title, merged)
