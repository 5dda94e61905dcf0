"""CompressionPlan: JSON round trip, validation, parameter arithmetic and the mode rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from laserrmt.errors import LaserRMTError, PlanError
from laserrmt.plan import (
    CompressionPlan,
    FactorSource,
    ModuleDecision,
    factorize_pays,
    resolve_mode,
)


def _plan() -> CompressionPlan:
    return CompressionPlan.from_decisions(
        [
            ModuleDecision("model.layers.1.mlp.down_proj", (64, 128), 64, 8, "factorize", "mp"),
            ModuleDecision("model.layers.0.self_attn.q_proj", (64, 64), 64, 40, "denoise"),
            ModuleDecision(
                "model.layers.0.mlp.up_proj", (128, 64), 64, 64, "keep", extras={"snr": 0.5}
            ),
        ],
        method="laser",
        settings={"threshold": "mp", "sigma": np.float64(0.25)},
    )


def test_json_round_trip_keeps_everything_and_order(tmp_path):
    plan = _plan()
    path = plan.save(tmp_path / "sub" / "plan.json")
    loaded = CompressionPlan.load(path)
    assert list(loaded.decisions) == list(plan.decisions)
    assert loaded.decisions == plan.decisions
    assert loaded.method == "laser"
    assert loaded.settings == {"threshold": "mp", "sigma": 0.25}
    text = path.read_text(encoding="utf-8")
    assert '\n  "modules": {' in text  # indented for editing by hand
    assert not [p for p in path.parent.iterdir() if p.name != "plan.json"]  # no temp file left


def test_hand_edit_is_picked_up(tmp_path):
    path = _plan().save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    data["modules"]["model.layers.1.mlp.down_proj"]["rank"] = 4
    path.write_text(json.dumps(data, indent=2))
    assert CompressionPlan.load(path)["model.layers.1.mlp.down_proj"].rank == 4


def _write(tmp_path, data) -> str:
    path = tmp_path / "plan.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(mode="shrink"), "unknown mode 'shrink'"),
        (lambda d: d.update(rank=65), "rank 65 is outside 1..64"),
        (lambda d: d.update(rank=0), "rank 0 is outside 1..64"),
        (lambda d: d.update(rank_full=50), "rank_full is 50"),
        (lambda d: d.update(shape=[64]), "is not a pair of positive integers"),
        (lambda d: d.update(colour="red"), "unknown field(s) colour"),
        (lambda d: d.pop("mode"), "missing field(s) mode"),
    ],
)
def test_load_rejects_bad_decisions_with_one_line(tmp_path, edit, message):
    data = _plan().to_dict()
    edit(data["modules"]["model.layers.1.mlp.down_proj"])
    with pytest.raises(PlanError) as info:
        CompressionPlan.load(_write(tmp_path, data))
    text = str(info.value)
    assert message in text
    assert "model.layers.1.mlp.down_proj" in text
    assert "\n" not in text


def test_load_rejects_bad_json_and_versions(tmp_path):
    with pytest.raises(PlanError, match=r"not valid JSON \(line 1"):
        CompressionPlan.load(_write(tmp_path, "{not json"))
    with pytest.raises(PlanError, match="format_version 7"):
        CompressionPlan.load(_write(tmp_path, {"format_version": 7, "modules": {}}))
    with pytest.raises(PlanError, match="no 'modules'"):
        CompressionPlan.load(_write(tmp_path, {"format_version": 1}))
    with pytest.raises(PlanError, match="does not exist"):
        CompressionPlan.load(tmp_path / "absent.json")
    assert issubclass(PlanError, LaserRMTError)


def test_keep_allows_rank_zero_but_factorize_does_not():
    ModuleDecision("a", (8, 4), 4, 0, "keep")
    with pytest.raises(PlanError, match=r"outside 1\.\.4"):
        ModuleDecision("a", (8, 4), 4, 0, "denoise")


def test_numpy_integers_become_plain_ints(tmp_path):
    d = ModuleDecision("a", (np.int64(8), np.int32(4)), np.int64(4), np.int64(2), "denoise")
    assert type(d.rank) is int and type(d.rank_full) is int and type(d.shape[0]) is int
    with pytest.raises(PlanError, match="not an integer"):
        ModuleDecision("a", (8, 4), 4, 2.0, "denoise")
    with pytest.raises(PlanError, match="not an integer"):
        ModuleDecision("a", (8, 4), 4, True, "denoise")


def test_duplicate_module_is_refused():
    d = ModuleDecision("a", (8, 4), 4, 2, "denoise")
    with pytest.raises(PlanError, match="appears twice"):
        CompressionPlan.from_decisions([d, d])


def test_unserializable_extras_raise_plan_error(tmp_path):
    plan = CompressionPlan.from_decisions(
        [ModuleDecision("a", (8, 4), 4, 2, "denoise", extras={"f": object()})]
    )
    with pytest.raises(PlanError, match="cannot be written as JSON"):
        plan.save(tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_parameter_arithmetic():
    plan = _plan()
    # factorize 64×128 at 8: 8·192; denoise and keep stay dense.
    assert plan.params_before() == 64 * 128 + 64 * 64 + 128 * 64
    assert plan.params_after() == 8 * 192 + 64 * 64 + 128 * 64
    assert plan.params_removed() == 64 * 128 - 8 * 192
    assert plan.counts() == {"factorize": 1, "denoise": 1, "keep": 1}
    rows = plan.summary()
    assert [r["mode"] for r in rows] == ["factorize", "denoise", "keep"]
    assert rows[0]["params_after"] == 1536 and rows[0]["shape"] == "64×128"


def test_factorize_pays_at_the_break_even_point():
    # 64×128: m·n/(m+n) = 42.67, so rank 42 pays and 43 does not.
    assert factorize_pays((64, 128), 42)
    assert not factorize_pays((64, 128), 43)
    # square 64×64: break-even exactly 32, where k(m+n) == m·n does not pay.
    assert factorize_pays((64, 64), 31)
    assert not factorize_pays((64, 64), 32)


def test_resolve_mode_rule():
    assert resolve_mode((64, 128), 8, "factorize")[0] == "factorize"
    mode, reason = resolve_mode((64, 128), 50, "factorize")
    assert mode == "keep"
    assert "9600 ≥ 8192" in reason and "below rank 43" in reason
    assert resolve_mode((64, 128), 50, "factorize", fallback="denoise")[0] == "denoise"
    assert resolve_mode((64, 128), 64, "factorize")[0] == "keep"
    assert resolve_mode((64, 128), 64, "denoise")[0] == "keep"
    assert resolve_mode((64, 128), 50, "denoise")[0] == "denoise"
    assert resolve_mode((64, 128), 8, "keep")[0] == "keep"
    with pytest.raises(PlanError, match=r"outside 1\.\.64"):
        resolve_mode((64, 128), 65, "factorize")
    with pytest.raises(PlanError, match="unknown mode"):
        resolve_mode((64, 128), 8, "prune")


@given(
    m=st.integers(1, 300),
    n=st.integers(1, 300),
    data=st.data(),
)
def test_resolve_mode_factorizes_exactly_when_it_saves(m, n, data):
    k = data.draw(st.integers(1, min(m, n)))
    mode, _ = resolve_mode((m, n), k, "factorize")
    assert (mode == "factorize") == (k * (m + n) < m * n and k < min(m, n))
    if mode == "factorize":
        d = ModuleDecision("x", (m, n), min(m, n), k, mode)
        assert d.params_after < d.params_before


def test_factor_source_round_trips_and_rejects_unknown_fields(tmp_path):
    calibration = {"source": "s", "n_windows": 2, "window": 64, "seed": 3, "tokens_sha256": "ab"}
    plan = _plan()
    plan.factors = FactorSource("svdllm", 1e-8, calibration)
    loaded = CompressionPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.factors == plan.factors and loaded.factors.missing() is None
    data = plan.to_dict()
    data["factors"]["cache"] = {}
    with pytest.raises(PlanError, match="unknown field"):
        CompressionPlan.from_dict(data)
    data["factors"] = {"whiten": "svdllm", "floor": 2.0}
    with pytest.raises(PlanError, match="floor"):
        CompressionPlan.from_dict(data)


def test_a_plan_without_factors_is_plain_svd_unless_its_decisions_were_whitened():
    data = _plan().to_dict()
    del data["factors"]
    assert CompressionPlan.from_dict(data).factors == FactorSource()
    data["modules"]["model.layers.1.mlp.down_proj"]["extras"] = {"whiten": "asvd"}
    factors = CompressionPlan.from_dict(data).factors
    assert factors.whiten == "asvd" and "do not record the calibration" in factors.missing()
    # a kept matrix has no factors, whatever its extras say
    data["modules"]["model.layers.1.mlp.down_proj"]["mode"] = "keep"
    assert CompressionPlan.from_dict(data).factors == FactorSource()
