"""The libraries heavylift is bounded to are the ones installed and the ones the Makefile pins."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> dict[str, Requirement]:
    listed = PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["run"]
    found = [Requirement(text) for text in listed]
    return {r.name.lower(): r for r in found if r.marker is None or r.marker.evaluate()}


def test_installed_libraries_are_within_their_bounds():
    outside = {name: version(name) for name, r in _requirements().items()
               if not r.specifier.contains(version(name), prereleases=True)}
    assert outside == {}


def test_the_makefiles_pins_are_within_pyprojects_bounds():
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([^\s]+)", re.search(r"^PINS :=(.*)$", (ROOT / "Makefile").read_text(),
                                                                   re.MULTILINE).group(1)))
    bounds = _requirements()
    assert {"torch", "transformers", "accelerate", "bitsandbytes", "torchao"} <= pins.keys()
    assert {name: pin for name, pin in pins.items() if not bounds[name].specifier.contains(pin)} == {}

