"""A matrix the rank rule cannot judge is reported as such and left whole (issue 10, items 10-11).

Planted cases: a noise-free rank-70 ``Linear(200, 100)`` (rank ≥ p/2: no noise bulk; median
matching used to keep 31), a ``Linear(300, 1)`` (one singular value: used to keep 0) and a
noisy rank-3 ``Linear(120, 80)`` that the rule does judge.
"""

from __future__ import annotations

import csv
import json

import torch
from torch import nn

from laserrmt.analyze import analyze_model, write_analysis
from laserrmt.methods.laser import oneshot_plan


def planted_model() -> nn.Sequential:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 200), nn.Linear(300, 1), nn.Linear(80, 120))
    with torch.no_grad():
        model[0].weight.copy_(
            torch.randn(200, 70, generator=gen) @ torch.randn(70, 100, generator=gen)
        )
        u, _ = torch.linalg.qr(torch.randn(120, 3, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(80, 3, generator=gen))
        noise = 0.02 * torch.randn(120, 80, generator=gen)
        model[2].weight.copy_(u @ torch.diag(torch.tensor([3.0, 2.5, 2.0])) @ v.T + noise)
    return model


def test_records_say_which_matrices_the_rule_could_not_judge(tmp_path) -> None:
    result = analyze_model(planted_model(), progress=False)
    by_name = {r["module"]: r for r in result.records}
    assert (by_name["0"]["status"], by_name["0"]["rank_kept"]) == ("no_bulk", 100)
    assert (by_name["1"]["status"], by_name["1"]["rank_kept"]) == ("too_short", 1)
    assert (by_name["2"]["status"], by_name["2"]["rank_kept"]) == ("ok", 3)
    assert result.summary()["not_judged"] == 2

    out = write_analysis(result, tmp_path / "a", model_source="planted")
    records = json.loads((out / "spectra.json").read_text())
    assert [r["status"] for r in records] == ["no_bulk", "too_short", "ok"]
    with open(out / "spectra.csv") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["no_bulk", "too_short", "ok"]
    html = (out / "report.html").read_text()
    assert "no_bulk" in html and "too_short" in html
    assert "could not judge" in html


def test_compress_leaves_a_matrix_the_rule_could_not_judge_whole() -> None:
    result = analyze_model(planted_model(), progress=False)
    plan = oneshot_plan(result, mode="denoise")
    modes = {d.module: (d.mode, d.rank) for d in plan.decisions.values()}
    assert modes["0"] == ("keep", 100)
    assert modes["1"] == ("keep", 1)
    assert modes["2"] == ("denoise", 3)
    reasons = {d.module: d.reason for d in plan.decisions.values()}
    assert "no_bulk" in reasons["0"] and "too_short" in reasons["1"]
