"""The dependency versions pyproject.toml declares are the ones the code was measured with."""

from __future__ import annotations

import tomllib
from pathlib import Path

import transformers
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _declared(name: str) -> Requirement:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    (requirement,) = (r for r in map(Requirement, project["dependencies"]) if r.name == name)
    return requirement


def test_transformers_range_is_the_measured_one():
    spec = _declared("transformers").specifier
    # 4.55.4: from_pretrained(dtype=...) raises TypeError (the keyword was torch_dtype).
    assert not spec.contains("4.55.4")
    # The fast tests of loading, saving, evaluation and width cuts passed on these.
    for version in ("4.56.0", "4.57.6", "5.0.0", "5.24.0"):
        assert spec.contains(version), version
    assert spec.contains(Version(transformers.__version__).base_version)
