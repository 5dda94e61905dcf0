"""Shared fixtures. The real default model is loaded once per test session (it is large)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Shared 2-core machines make wall-clock deadlines flaky: property tests have none.
settings.register_profile("laserrmt", deadline=None)
settings.load_profile("laserrmt")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_model():
    """The packaged SmolLM2 (converted once into the user cache). Tests must not modify it:
    load a private copy with ``load_model(default_model.path)`` for surgery."""
    from laserrmt.models.loading import load_model

    return load_model(None)
