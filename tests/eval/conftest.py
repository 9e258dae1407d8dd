"""The eval tests' model: bench/train_small.py's CPU size, trained once per session into a temp folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

WINDOW = 128  # the CPU model's training length and max_position_embeddings
TOKENS = 2048  # 16 windows, 1,008 scored positions


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    import train_small

    folder = tmp_path_factory.mktemp("small-kjv")
    train_small.train_small(folder, "cpu", seed=0, device="cpu")
    return folder


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Saved references go to the test's temp dir."""
    monkeypatch.setenv("HEAVYLIFT_CACHE", str(tmp_path / "cache"))
