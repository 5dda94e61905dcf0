"""benchmarks/frontier.py's three readings of the goal, on planted points."""

from __future__ import annotations

import math

from benchmarks.frontier import CORRECTED, DENSE, QUANT_ONLY, frontier_check


def _row(family: str, label: str, mib: float, ppl: float) -> dict[str, object]:
    return {"family": family, "label": label, "short": label, "bytes": mib * 2**20, "ppl": ppl}


def test_each_reading_compares_with_the_points_it_names():
    rows = [
        _row(QUANT_ONLY, "q10", 10, 100.0),
        _row(QUANT_ONLY, "q20", 20, 10.0),
        _row(QUANT_ONLY, "q40", 40, 5.0),
        _row(DENSE, "dense", 80, 4.0),  # never one of ours, never a quantization point
        # At 15 MiB the log line from q10 to q20 gives sqrt(100 · 10) ≈ 31.6: 30 is below it,
        # but above q20 (nearest at least as large) and q40 (best at least as large).
        _row(CORRECTED, "a", 15, 30.0),
        # At 20 MiB exactly: q20 is nearest; 9 beats it but not q40's 5.
        _row(CORRECTED, "b", 20, 9.0),
        # At 30 MiB: 4.5 beats every quantization point at least as large.
        _row(CORRECTED, "c", 30, 4.5),
        _row(CORRECTED, "d", 50, 4.2),  # larger than every quantization point
    ]
    table, literal, nearest, between = frontier_check(rows)
    assert (literal, nearest) == (1, 2)
    # a: 30 < 31.62; b: the q10-q20 line ends at q20's 10 > 9; c: the q20-q40 line at 30 MiB is
    # sqrt(10 · 5) ≈ 7.07 > 4.5.
    assert between == 3
    lines = {line.split(":")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(lines) == {"a", "b", "c", "d"}  # dense and quantization rows are not judged
    assert f"{math.sqrt(1000):.2f} (q10–q20)" in lines["a"]
    assert "none as large" in lines["d"]
