"""heavylift: plan, load and run the largest open LLMs on the GPUs you actually have."""

from __future__ import annotations

from .api import plan
from .errors import HeavyliftError
from .planner.plan import Plan

__all__ = ["plan", "load", "Plan", "HeavyliftError"]
__version__ = "0.1.0"


def load(model: str, **options):
    """Load `model` exactly as planned and return a Session (needs `pip install 'heavylift[run]'`)."""
    from .runtime.session import load as _load  # torch is imported only here

    return _load(model, **options)
