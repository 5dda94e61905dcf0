"""The public names of ``laserrmt`` do not depend on which submodules were imported first.

Importing a submodule ``laserrmt.x`` sets the package attribute ``x`` to that module, so a
submodule named like a public function (``laserrmt.compress`` once was) replaces the function
as soon as anything imports it. Checked in fresh interpreters: the test session itself has
imported modules in whatever order the other tests ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Each public name and what it must be: (kind, the object's __name__).
EXPECTED = {
    "LaserRMTError": ("class", "LaserRMTError"),
    "__version__": ("str", None),
    "load": ("function", "load"),
    "save": ("function", "save_compressed"),
    "compress": ("function", "compress"),
    "CompressSettings": ("class", "CompressSettings"),
    "CompressionPlan": ("class", "CompressionPlan"),
    "analyze_model": ("function", "analyze_model"),
    "evaluate_model": ("function", "evaluate_model"),
    "load_model": ("function", "load_model"),
    "choose_rank": ("function", "choose_rank"),
}

_PROBE = """
import inspect, json, pkgutil, sys, importlib
import laserrmt

def walk():
    for info in pkgutil.walk_packages(laserrmt.__path__, "laserrmt."):
        importlib.import_module(info.name)

def describe():
    out = {}
    for name in laserrmt.__all__:
        value = getattr(laserrmt, name)
        kind = (
            "module" if inspect.ismodule(value)
            else "class" if inspect.isclass(value)
            else "function" if inspect.isfunction(value)
            else type(value).__name__
        )
        out[name] = [kind, getattr(value, "__name__", None) if kind != "str" else None]
    return out

if sys.argv[1] == "submodules-first":
    walk()
    result = describe()
else:
    describe()
    walk()
    result = describe()
print(json.dumps({"all": sorted(laserrmt.__all__), "names": result}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", ["submodules-first", "names-first"])
def test_public_names_survive_importing_every_submodule(order):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, order], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["all"] == sorted(EXPECTED)
    assert {name: tuple(value) for name, value in found["names"].items()} == EXPECTED
