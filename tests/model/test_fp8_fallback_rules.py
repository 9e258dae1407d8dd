"""Where heavylift's torch block-FP8 matmuls apply and how much of a weight they dequantize at once: the rules
the runtime and the planner share (model/prequantized.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from heavylift.model.prequantized import FALLBACK_TRANSFORMERS, fallback_serves, fallback_tile_rows

ROOT = Path(__file__).resolve().parents[2]


def test_the_fallback_answers_the_transformers_release_pyproject_allows_and_no_other():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["run"]]
    (bound,) = [r for r in listed if r.name == "transformers"]
    major, minor = FALLBACK_TRANSFORMERS
    for release in (f"{major}.{minor}.0", f"{major}.{minor}.3", f"{major}.{minor}.1.dev0"):
        assert bound.specifier.contains(release, prereleases=True) and fallback_serves(release)
    for release in (f"{major}.{minor + 1}.0", f"{major}.{minor - 1}.9", f"{major + 1}.{minor}.0"):
        assert not bound.specifier.contains(release, prereleases=True) and not fallback_serves(release)
    assert not fallback_serves("none") and not fallback_serves("5")


def test_a_tile_is_the_most_whole_row_blocks_of_16_mi_padded_weights():
    # DeepSeek-V3, blocks of 128 x 128: 7168-wide inputs take 18 row blocks (18 x 128 x 7168 = 16.5 Mi weights)
    assert fallback_tile_rows(18432, 7168, (128, 128)) == 2304  # the dense MLP's gate: 8 tiles
    assert fallback_tile_rows(576, 7168, (128, 128)) == 640  # kv_a_proj_with_mqa: its 4.5 row blocks, padded
    assert fallback_tile_rows(7168, 18432, (128, 128)) == 896  # the dense MLP's down: 7 row blocks
    assert fallback_tile_rows(4096, 2048, (128, 128)) == 4096  # an expert's gate_up: 64 blocks fit, 32 there are
    assert fallback_tile_rows(8, 200_000, (128, 128)) == 128  # one row block at least
    assert fallback_tile_rows(96, 100, (64, 64)) == 128  # 100 columns pad to 128
