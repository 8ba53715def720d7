"""Shared fixtures: the tiny model built once per session into a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny model, built into a session cache that subprocesses also use."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["ASYNC_RL_CACHE_DIR"] = str(cache)
    from async_rl.tiny_model import ensure_tiny_model

    return ensure_tiny_model(0)
