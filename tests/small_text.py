"""A small calibration split for tests of methods that draw calibration windows.

A few thousand seeded random words (every printable character) stand in for the pinned calibration split: windows are
drawn from it exactly as from the real one (same seed rule, same cut), without tokenizing 85
articles per call (about 5 s each with the byte-level test tokenizer).
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from laserrmt.data import text


def _words(rng: np.random.Generator, count: int) -> str:
    # every printable ASCII character, so the byte-level inputs span more than a hidden size
    letters = np.array(list(string.printable[:94]))
    lengths = rng.integers(1, 9, size=count)
    return " ".join("".join(rng.choice(letters, size=length)) for length in lengths)


_RNG = np.random.default_rng(0)
SMALL_SPLIT = [_words(_RNG, 1500), _words(_RNG, 1500)]


@contextmanager
def small_calibration_split() -> Iterator[None]:
    """Within the block, the calibration split is :data:`SMALL_SPLIT`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text, "calibration_texts", lambda: list(SMALL_SPLIT))
        yield
